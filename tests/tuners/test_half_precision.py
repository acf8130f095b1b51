"""Half-precision regressions of the low-rank tuners (issue 14): LoRI on bf16/fp16 bases, exact
unmerge and its opt-out, mixed adapter dtypes, and the rounding of merges into 4/8-bit bases."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from adapterlab.models import tiny_llama
from adapterlab.tuners import DyLoraConfig, LoriConfig, LorsConfig
from adapterlab.tuners._lowrank import LowRankLayer
from adapterlab.tuners.lori.functional import layer_seed, random_a
from adapterlab.tuners.lori.layer import LoriLayer
from tests.tuners.matrix import TARGETS, batch, logits

HALF = [torch.bfloat16, torch.float16]


def _layers(pm, cls=LowRankLayer):
    return [m for m in pm.modules() if isinstance(m, cls)]


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_lori_on_half_base_with_zero_b_forward_and_merge(dtype):
    """Used to raise 'expected m1 and m2 to have the same dtype' (A cast to the base dtype, B fp32)."""
    from peft import get_peft_model

    import adapterlab

    x = batch()
    base = tiny_llama(dtype=dtype)
    ref = logits(base, x)
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    pm = get_peft_model(base, LoriConfig(r=4, task="h", target_modules=TARGETS))
    torch.testing.assert_close(logits(pm, x), ref, rtol=0, atol=0)  # B = 0: exactly the base
    for layer in _layers(pm, LoriLayer):
        a = layer.lori_A["default"].weight
        assert a.dtype == torch.float32  # the frozen A keeps its drawn values
        cfg = pm.peft_config["default"]
        assert torch.equal(a, random_a(4, layer.in_features, layer_seed(cfg.a_seed, layer.key)))
    merged = adapterlab.merge(pm, probe=False)
    for n, p in merged.named_parameters():
        assert torch.equal(p, weights[n]), n  # a zero delta leaves every bit of the base


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_lori_merge_into_half_base_rounds_once(dtype):
    from peft import get_peft_model

    import adapterlab

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(dtype=dtype), LoriConfig(r=4, task="h", init_weights=False, target_modules=TARGETS))
    cfg = pm.peft_config["default"]
    expected = {}
    for layer in _layers(pm, LoriLayer):
        a = random_a(4, layer.in_features, layer_seed(cfg.a_seed, layer.key))  # (r, d_in) fp32
        b = layer.lori_B["default"].weight.detach()  # (d_out, r) fp32
        w = layer.get_base_layer().weight.detach()
        expected[layer.key] = (w.float() + (b @ a) * (cfg.lora_alpha / 4)).to(dtype)
    merged = adapterlab.merge(pm, probe=False)
    for key, want in expected.items():
        got = merged.get_submodule(key).weight
        assert got.dtype == dtype and torch.equal(got, want), key


@pytest.mark.parametrize(
    "make",
    [
        lambda: DyLoraConfig(r=4, exact_unmerge=False, init_weights=False, target_modules=TARGETS),
        lambda: LoriConfig(r=4, task="o", exact_unmerge=False, init_weights=False, target_modules=TARGETS),
        lambda: LorsConfig(r=4, exact_unmerge=False, init_weights=False, target_modules=TARGETS),
    ],
    ids=["dylora", "lori", "lors"],
)
def test_exact_unmerge_opt_out_warns_and_subtracts(make):
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(dtype=torch.bfloat16), make())
    layers = _layers(pm)
    w0 = [m.get_base_layer().weight.detach().clone() for m in layers]
    deltas = [m.delta_weight("default") for m in layers]
    with pytest.warns(UserWarning, match="exact_unmerge=False"):
        pm.base_model.merge_adapter()
    merged = [m.get_base_layer().weight.detach().clone() for m in layers]
    assert all(m._pre_merge is None for m in layers)  # no copy kept
    pm.base_model.unmerge_adapter()
    for m, w, d, mw in zip(layers, w0, deltas, merged):
        assert torch.equal(mw, (w.float() + d).to(torch.bfloat16))
        assert torch.equal(m.get_base_layer().weight, (mw.float() - d).to(torch.bfloat16))  # subtraction
    assert any(not torch.equal(m.get_base_layer().weight, w) for m, w in zip(layers, w0))  # and why it is opt-in


def test_exact_unmerge_holds_one_copy_only_while_merged():
    from peft import get_peft_model

    pm = get_peft_model(tiny_llama(dtype=torch.bfloat16), DyLoraConfig(r=4, init_weights=False, target_modules=TARGETS))
    layer = _layers(pm)[0]
    original = layer.get_base_layer().weight.data
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default path is silent
        pm.base_model.merge_adapter()
    assert layer._pre_merge is not None and layer._pre_merge[1].data_ptr() == original.data_ptr()  # no copy
    pm.base_model.unmerge_adapter()
    assert layer._pre_merge is None and layer.get_base_layer().weight.data_ptr() == original.data_ptr()
    with pytest.raises(ValueError, match="exact_unmerge must be True or False"):
        DyLoraConfig(exact_unmerge="yes")


def test_mixed_exact_and_subtracting_adapters_unmerge_in_order():
    """adapter 1 opts out, adapter 2 keeps the weight: unmerge restores 2's snapshot then subtracts 1."""
    from peft import get_peft_model

    dt = torch.bfloat16
    pm = get_peft_model(
        tiny_llama(dtype=dt), DyLoraConfig(r=4, exact_unmerge=False, init_weights=False, target_modules=TARGETS)
    )
    pm.add_adapter("two", DyLoraConfig(r=2, init_weights=False, target_modules=TARGETS))
    layer = _layers(pm)[0]
    w0 = layer.get_base_layer().weight.detach().clone()
    d1, d2 = layer.delta_weight("default"), layer.delta_weight("two")
    with pytest.warns(UserWarning, match="exact_unmerge=False"):
        layer.merge(adapter_names=["default"])
    w1 = layer.get_base_layer().weight.detach().clone()
    layer.merge(adapter_names=["two"])
    assert torch.equal(layer.get_base_layer().weight, (w1.float() + d2).to(dt))
    layer.unmerge()
    assert layer.merged_adapters == []
    assert torch.equal(layer.get_base_layer().weight, (w1.float() - d1).to(dt))
    assert torch.equal((w0.float() + d1).to(dt), w1)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_mixed_adapter_dtypes_never_raise(dtype):
    """autocast_adapter_dtype=False keeps B in the base dtype; LoRI's A stays fp32: forward, train, merge."""
    from peft import get_peft_model

    for make in (
        lambda: LoriConfig(r=4, task="m", target_modules=TARGETS),
        lambda: DyLoraConfig(r=4, target_modules=TARGETS),
    ):
        pm = get_peft_model(tiny_llama(dtype=dtype), make(), autocast_adapter_dtype=False)
        assert {p.dtype for p in pm.parameters() if p.requires_grad} == {dtype}
        x = batch()
        before = logits(pm, x)
        pm.train()
        pm(x, labels=x).loss.backward()  # plain SGD: AdamW's eps underflows in pure fp16
        with torch.no_grad():
            for p in pm.parameters():
                if p.grad is not None:
                    p -= 0.5 * p.grad
        after = logits(pm, x)
        assert (after.float() - before.float()).abs().max() > 1e-3
        layer = _layers(pm)[0]
        w = layer.get_base_layer().weight.detach().clone()
        pm.base_model.merge_adapter()
        pm.base_model.unmerge_adapter()
        assert torch.equal(layer.get_base_layer().weight, w)


@pytest.fixture(scope="module")
def quantized():
    pytest.importorskip("bitsandbytes")
    from adapterlab.quant import quantize_model

    return {(bits, dt): quantize_model(tiny_llama(dtype=dt), bits) for bits in (4, 8) for dt in SOURCES.values()}


SOURCES = {"from_fp32": torch.float32, "from_bf16": torch.bfloat16, "from_fp16": torch.float16}


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_merge_is_dequantize_add_requantize(quantized, bits, source):
    """Tuner merge into a 4/8-bit base (quantized from an fp32, bf16 or fp16 checkpoint) ==
    bitsandbytes' own quantization of (dequantized W + fp32 delta); unmerge restores the codes."""
    import bitsandbytes.functional as bnbF
    from peft import get_peft_model

    from adapterlab.quant import dequantize_weight

    pm = get_peft_model(
        copy.deepcopy(quantized[bits, SOURCES[source]]), DyLoraConfig(r=4, init_weights=False, target_modules=TARGETS)
    )
    layers = _layers(pm)
    want = []
    for m in layers:
        base = m.get_base_layer()
        a = torch.stack([m.dylora_A["default"].part(i).detach() for i in range(4)])  # (r, d_in)
        b = torch.stack([m.dylora_B["default"].part(i).detach() for i in range(4)], dim=1)  # (d_out, r)
        target = dequantize_weight(base) + (b @ a) * (m.lora_alpha["default"] / 4)  # (d_out, d_in) fp32
        if bits == 8:
            cb, scb, _ = bnbF.int8_vectorwise_quant(target.to(torch.float16))
            want.append((cb, scb))
        else:
            qs = base.weight.quant_state
            codes, _ = bnbF.quantize_4bit(
                target.contiguous(),
                blocksize=qs.blocksize,
                quant_type=qs.quant_type,
                compress_statistics=bool(getattr(qs, "nested", False)),
            )
            want.append((codes, None))
    codes_before = [m.get_base_layer().weight.data.clone() for m in layers]
    pm.base_model.merge_adapter()
    for m, (cb, scb) in zip(layers, want):
        w = m.get_base_layer().weight
        assert torch.equal(w.data.view(-1), cb.view(-1))
        if bits == 8:
            got_scb = w.SCB if getattr(w, "SCB", None) is not None else m.get_base_layer().state.SCB
            assert torch.equal(got_scb, scb)
    pm.base_model.unmerge_adapter()
    for m, c in zip(layers, codes_before):
        assert torch.equal(m.get_base_layer().weight.data, c)
