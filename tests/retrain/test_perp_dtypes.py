"""PERP in fp32, bf16 and fp16: fp32 LoRA factors on a half base, training step, and a merge that
follows the one rounding rule (fp32 compute, one cast) bit for bit, zeros kept (issue 14)."""

from __future__ import annotations

import pytest
import torch

from adapterlab.models import tiny_llama
from adapterlab.pruning import prune_
from adapterlab.retrain import HeadLoRA, MaskLoRALinear, ScaleLoRALinear, merge_perp_, perp_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _expected(layer: torch.nn.Module) -> torch.Tensor:
    """The merged fp32 weight from the layer's stored tensors (an oracle of each PERP layer's rule)."""
    w = layer.base_layer.weight.detach().float()
    ba = layer.perp_B.detach().float() @ layer.perp_A.detach().float()  # (d_out, r) @ (r, d_in)
    if isinstance(layer, ScaleLoRALinear):
        return w * ba
    delta = ba * (layer.scale)
    if isinstance(layer, MaskLoRALinear):
        delta = delta * (w != 0)
    return w + delta


@pytest.mark.parametrize("scope", ["default", "scale_lora"])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_perp_merge_rounds_once_in_every_dtype(dname, scope):
    dtype = DTYPES[dname]
    model = tiny_llama(dtype=dtype)
    prune_(model, "magnitude", 0.5)
    zeros = {
        n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    }
    perp_(model, scope, r=4, alpha=8)
    factors = [p for n, p in model.named_parameters() if "perp_" in n]
    assert factors and {p.dtype for p in factors} == {torch.float32}
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    model.eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (MaskLoRALinear, ScaleLoRALinear, HeadLoRA))}
    expected = {n: _expected(m).to(dtype) for n, m in layers.items()}
    assert any(not torch.equal(expected[n], m.base_layer.weight) for n, m in layers.items())  # the step moved them
    merge_perp_(model)
    for n, want in expected.items():
        got = model.get_submodule(n).weight
        assert got.dtype == dtype and torch.equal(got, want), n
    for n, z in zeros.items():
        assert bool((model.get_submodule(n).weight[z] == 0).all()), n
