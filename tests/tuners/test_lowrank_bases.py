"""DyLoRA and LoRI on pruned and bitsandbytes 4/8-bit bases: attach, forward, train, merge."""

from __future__ import annotations

import pytest
import torch

from adapterlab.models import tiny_llama
from adapterlab.tuners import DyLoraConfig, LoriConfig
from adapterlab.tuners._lowrank import LowRankLayer
from tests.tuners.matrix import TARGETS, batch, logits, train_step

CONFIGS = {
    "dylora": lambda: DyLoraConfig(r=4, target_modules=TARGETS),
    "lori": lambda: LoriConfig(r=4, task="q", target_modules=TARGETS),
}


@pytest.fixture(scope="module")
def quantized():
    pytest.importorskip("bitsandbytes")
    from adapterlab.quant import quantize_model

    return {bits: quantize_model(tiny_llama(), bits) for bits in (4, 8)}


def _base_weights(pm):
    return {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pruned_base_keeps_its_zeros_while_training(name):
    from peft import get_peft_model

    from adapterlab.pruning import prune_

    base = tiny_llama()
    prune_(base, "magnitude", 0.5)
    zeros = {
        n: (m.weight == 0).clone()
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n.endswith(tuple(TARGETS))
    }
    pm = get_peft_model(base, CONFIGS[name]())
    x = batch()
    before = logits(pm, x)
    train_step(pm, x, steps=2, weight_decay=0.1)
    after = logits(pm, x)
    assert (after - before).abs().max() > 1e-4
    for n, m in pm.get_base_model().named_modules():
        key = n.removesuffix(".base_layer")
        if n.endswith("base_layer") and key in zeros:
            assert bool((m.weight[zeros[key]] == 0).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantized_base_forward_train_merge(quantized, bits, name):
    import copy

    from peft import get_peft_model

    qbase = copy.deepcopy(quantized[bits])
    x = batch()
    ref = logits(qbase, x)
    pm = get_peft_model(qbase, CONFIGS[name]())
    torch.testing.assert_close(logits(pm, x), ref, rtol=0, atol=0)  # B = 0 at init
    train_step(pm, x, steps=2)
    grads_ok = [p for p in pm.parameters() if p.requires_grad]
    assert grads_ok and all(p.dtype == torch.float32 for p in grads_ok)
    after = logits(pm, x)
    assert (after - ref).abs().max() > 1e-4
    layer = next(m for m in pm.modules() if isinstance(m, LowRankLayer))
    codes = layer.get_base_layer().weight.data.clone()
    pm.base_model.merge_adapter()
    merged = logits(pm, x)
    rel = ((merged - after).norm() / after.norm()).item()
    # dequantize -> add in fp32 -> requantize: only the requantization rounding changes the output
    assert rel < (0.05 if bits == 8 else 0.1)
    pm.base_model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight.data, codes)  # exact unmerge: original codes restored
    torch.testing.assert_close(logits(pm, x), after, rtol=0, atol=0)
