"""Shared-basis compression of bf16 / fp16 LoRA checkpoints: fp32 compute, exact at c = n·r
against the deltas of the stored half-precision factors (issue 14)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterlab.adapters import resolve_adapter
from adapterlab.compression import compress_adapters
from adapterlab.models import tiny_llama
from tests.tolerances import TOL

N, R = 3, 2
TARGETS = ["q_proj", "down_proj"]


def _half_lora_dirs(root: Path, dtype: torch.dtype) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    out = []
    for i in range(N):
        torch.manual_seed(100 + i)
        pm = get_peft_model(
            tiny_llama(dtype=dtype),
            LoraConfig(r=R, target_modules=TARGETS, init_lora_weights=False),
            autocast_adapter_dtype=False,
        )  # the factors are stored in the base dtype
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.1)
        pm.save_pretrained(str(root / f"t{i}"))
        out.append(root / f"t{i}")
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_checkpoints_compress_exactly_at_full_rank(dtype, tmp_path):
    dirs = _half_lora_dirs(tmp_path, dtype)
    bundle = compress_adapters(dirs, rank=N * R)
    for d in dirs:
        src = resolve_adapter(d)
        for mod in bundle.module_names:
            want = src.delta(mod).double()  # the fp32 product of the stored half factors
            got = bundle.delta(src.name, mod).double()
            torch.testing.assert_close(got, want, **TOL[torch.float32])
            assert float(want.abs().max()) > 1e-3  # not an empty adapter
    assert bundle.errors.mean < 1e-6
