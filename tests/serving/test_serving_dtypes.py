"""AdapterServer on bf16 / fp16 bases: a mixed LoRA + SHiRA batch matches the fp32 server within
the dtype's tolerance, and the fast plans match the reference loop in the same dtype."""

from __future__ import annotations

import pytest
import torch

from adapterlab.models import tiny_llama
from adapterlab.serving import AdapterServer
from tests.serving._helpers import make_lora, make_shira
from tests.tolerances import TOL


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("dtype_adapters")
    return {
        "a": make_lora(root / "a", r=4),
        "b": make_lora(root / "b", r=2, seed=1, rslora=True),
        "s": make_shira(root / "s"),
    }


@pytest.mark.parametrize("plan_mode", ["grouped", "gather"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_server_matches_fp32(adapters, dtype, plan_mode):
    ids = torch.randint(4, 100, (5, 7), generator=torch.Generator().manual_seed(0))
    names = ["a", "b", None, "s", "a"]
    want = AdapterServer(tiny_llama(seed=0), capacity=4, adapters=adapters).forward(ids, adapters=names)
    server = AdapterServer(tiny_llama(seed=0, dtype=dtype), capacity=4, plan_mode=plan_mode, adapters=adapters)
    got = server.forward(ids, adapters=names)
    ref = server.forward(ids, adapters=names, reference=True)
    for b in range(len(names)):
        assert got[b].dtype == dtype
        torch.testing.assert_close(got[b].float(), want[b], **TOL[dtype])
        torch.testing.assert_close(got[b].float(), ref[b].float(), **TOL[dtype])
    assert (want[0] - want[2]).abs().max() > 10 * TOL[dtype]["atol"]  # the adapters are visible in this dtype
