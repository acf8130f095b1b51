"""PHLoRA on bf16 / fp16 checkpoints: the SVD runs in fp32 on the exact difference of the stored
weights, the saved adapter keeps the checkpoint's dtype, and ``apply_`` rounds once (issue 14)."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterlab
from adapterlab.io import load_tensors
from adapterlab.models import tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_extract_from_half_checkpoints(dtype, tmp_path):
    base = tiny_llama(dtype=dtype)
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n.endswith(("q_proj.weight", "down_proj.weight")):
                p.add_((torch.randn(p.shape, generator=g) * 0.02).to(dtype))
    res = adapterlab.extract_lora(base, tuned, rank=3, target_modules=["q_proj", "down_proj"])
    assert res.dtype == dtype
    tuned_w = dict(tuned.named_parameters())
    for name, (b, a) in res.factors.items():
        assert b.dtype == a.dtype == torch.float32
        w0 = base.get_submodule(name).weight
        diff = tuned_w[f"{name}.weight"].double() - w0.double()  # exact: both are stored values
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]  # Eckart-Young optimum of rank 3
        torch.testing.assert_close((b @ a).double(), best, rtol=1e-4, atol=1e-5 * float(s[0]))
    res.save(tmp_path / "x")
    assert {t.dtype for t in load_tensors(tmp_path / "x" / "adapter_model.safetensors").values()} == {dtype}
    target = tiny_llama(dtype=dtype)
    want = {n: (target.get_submodule(n).weight.float() + res.delta(n)).to(dtype) for n in res.factors}
    res.apply_(target)
    for n, w in want.items():
        assert torch.equal(target.get_submodule(n).weight, w), n
