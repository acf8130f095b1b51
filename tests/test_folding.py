"""adapterlab.merge: masked (keep_sparsity) and quantization-aware merges into the base."""

from __future__ import annotations

import copy

import pytest
import torch

import adapterlab
from adapterlab.folding import IntoBaseReport
from adapterlab.models import tiny_llama
from adapterlab.pruning import check_nm, get_masks, prune_
from tests.merging._helpers import dyadic_
from tests.tolerances import assert_close

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _x() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _logits(model, x=None):
    model.eval()
    with torch.no_grad():
        return model(_x() if x is None else x).logits.float()


def _pruned(pattern=None, **kw):
    base = tiny_llama(**kw)
    prune_(base, "magnitude", None if pattern else 0.5, pattern=pattern)
    return base


def _randomize_(pm, std=0.05, seed=0):
    """Give every adapter factor random values (B = 0 at init would make the delta zero)."""
    g = torch.Generator().manual_seed(seed)
    for _n, p in pm.named_parameters():
        if p.requires_grad and p.is_floating_point():
            p.data = torch.randn(p.shape, generator=g) * std


def _lora(base, **kw):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))
    _randomize_(pm)
    return pm


def _expected_deltas(pm, adapter="default"):
    """Brute-force oracle: s * B @ A per layer from peft's own attributes."""
    out = {}
    for name, m in pm.named_modules():
        if hasattr(m, "lora_A") and adapter in m.lora_A:
            a, b = m.lora_A[adapter].weight.detach().double(), m.lora_B[adapter].weight.detach().double()
            out[name.removeprefix("base_model.model.")] = (b @ a) * m.scaling[adapter]
    return out


def _weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def test_keep_sparsity_oracle_and_anchor():
    base = _pruned()
    before = _weights(base)
    pm = _lora(base)
    deltas = _expected_deltas(pm)
    anchor = copy.deepcopy(pm).merge_and_unload()  # peft: dense delta, sparsity lost
    merged, report = adapterlab.merge(pm, keep_sparsity=True, return_report=True)
    assert isinstance(report, IntoBaseReport) and len(report.layers) == 10
    for name, delta in deltas.items():
        w0 = before[name].double()
        expected = w0 + delta * (w0 != 0)  # W + s (BA) ⊙ M
        got = merged.get_submodule(name).weight.detach()
        assert_close(got, expected.float())
        assert bool((got[w0 == 0] == 0).all())  # (W_merged == 0) ⊇ (W_base == 0)
        # anchor: peft's merge fills the pruned entries
        assert int((anchor.get_submodule(name).weight[w0 == 0] != 0).sum()) > 0
    assert report.sparsity_after >= report.sparsity_before == pytest.approx(0.5, abs=0.01)
    assert not hasattr(merged, "peft_config") and type(merged).__name__ == "LlamaForCausalLM"


def test_without_keep_sparsity_equals_peft_merge():
    pm = _lora(_pruned())
    anchor = _logits(copy.deepcopy(pm).merge_and_unload())
    unmerged = _logits(pm)
    merged, report = adapterlab.merge(pm, return_report=True)
    assert_close(_logits(merged), anchor)
    assert_close(_logits(merged), unmerged)
    assert report.output_rel_change < 1e-5


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds(pattern):
    pm = _lora(_pruned(pattern))
    merged, report = adapterlab.merge(pm, keep_sparsity=True, return_report=True)
    assert report.pattern == pattern and report.nm_valid is True
    n, m = (int(v) for v in pattern.split(":"))
    for name in [r.name for r in report.layers]:
        assert check_nm(merged.get_submodule(name).weight, n, m)


def _configs():
    from peft import LoraConfig

    return {
        "rslora": lambda: LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=TARGETS),
        "dylora": lambda: adapterlab.DyLoraConfig(r=4, target_modules=TARGETS),
        "lori": lambda: adapterlab.LoriConfig(r=4, task="q", target_modules=TARGETS),
    }


def _factor_delta(kind, pm, layer):
    """``s B A`` from the layer's stored tensors and its config, not from the layer's own delta_weight."""
    from adapterlab.tuners.lori.functional import layer_seed, random_a

    cfg = pm.peft_config["default"]
    sd = layer.state_dict()
    if kind == "dylora":  # checkpoint layout: stacked components, rank cfg.r, scale alpha / r
        a, b = sd["dylora_A.default.weight"].double(), sd["dylora_B.default.weight"].double()
        return (b @ a) * (cfg.lora_alpha / cfg.r)
    a = random_a(cfg.r, layer.in_features, layer_seed(cfg.a_seed, layer.key)).double()  # A regenerated from the seed
    b = sd["lori_B.default.weight"].double()
    return (b @ a) * (cfg.lora_alpha / cfg.r)


@pytest.mark.parametrize("kind", ["rslora", "dylora", "lori"])
def test_other_low_rank_adapters(kind):
    from peft import get_peft_model

    base = _pruned()
    before = _weights(base)
    pm = get_peft_model(base, _configs()[kind]())
    _randomize_(pm)
    unmasked = _logits(copy.deepcopy(pm))
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if hasattr(m, "base_layer") and hasattr(m, "get_base_layer")
    }
    if kind == "rslora":
        deltas = _expected_deltas(pm)
        assert pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    else:
        deltas = {n: _factor_delta(kind, pm, m) for n, m in layers.items()}
    merged = adapterlab.merge(copy.deepcopy(pm), keep_sparsity=True)
    for name, delta in deltas.items():
        w0 = before[name].double()
        got = merged.get_submodule(name).weight.detach()
        assert_close(got, (w0 + delta * (w0 != 0)).float())
        assert bool((got[w0 == 0] == 0).all())
    dense = adapterlab.merge(pm)  # without masking: equals the unmerged model
    assert_close(_logits(dense), unmasked)


def test_bad_input_leaves_model_untouched():
    from peft import LoraConfig, get_peft_model

    dense = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    w = _weights(dense)
    with pytest.raises(ValueError, match="dense"):
        adapterlab.merge(dense, keep_sparsity=True)
    assert hasattr(dense, "peft_config") and all(torch.equal(w[k], v) for k, v in _weights(dense).items())

    pm = _lora(_pruned())
    w = _weights(pm)
    masks = get_masks(pm.get_base_model())
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=r"mask 'model.layers.0.self_attn.q_proj' has shape \(64, 32\).*\(64, 64\)"):
        adapterlab.merge(pm, keep_sparsity=True, masks={name: torch.ones(64, 32, dtype=torch.bool)})
    with pytest.raises(ValueError, match="does not touch"):
        adapterlab.merge(
            pm, keep_sparsity=True, masks={"model.layers.0.mlp.gate_proj": masks["model.layers.0.mlp.gate_proj"]}
        )
    with pytest.raises(ValueError, match="adapter_name='other'.*default"):
        adapterlab.merge(pm, adapter_name="other")
    with pytest.raises(ValueError, match="keep_sparsity must be"):
        adapterlab.merge(pm, keep_sparsity="yes")
    with pytest.raises(ValueError, match="PeftModel"):
        adapterlab.merge(tiny_llama())
    assert hasattr(pm, "peft_config") and all(torch.equal(w[k], v) for k, v in _weights(pm).items())


def test_explicit_masks_are_used():
    pm = _lora(_pruned())
    name = "model.layers.1.mlp.down_proj"
    keep = torch.zeros(64, 128, dtype=torch.bool)
    keep[:, :8] = True  # a stricter mask than W != 0 for this one layer
    w0 = pm.get_base_model().get_submodule(name).weight.detach().clone()
    merged = adapterlab.merge(pm, keep_sparsity=True, masks={name: keep})
    got = merged.get_submodule(name).weight.detach()
    assert torch.equal(got[:, 8:], w0[:, 8:])


def test_selects_one_adapter_of_several():
    from peft import LoraConfig

    pm = _lora(_pruned())
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize_(pm, seed=3)
    pm.set_adapter("default")
    expected = _logits(pm)
    merged = adapterlab.merge(pm, adapter_name="default")
    assert_close(_logits(merged), expected)


# ---------------------------------------------------------------------------------------------
# bitsandbytes bases


@pytest.fixture(scope="module")
def pruned_4bit():
    pytest.importorskip("bitsandbytes")
    from adapterlab.quant import quantize_model

    return quantize_model(_pruned(), 4, cpu_repack=True)


def _oracle_requant(w_deq: torch.Tensor, delta: torch.Tensor, quant_state) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    q, qs = bnbF.quantize_4bit(w_deq + delta, blocksize=quant_state.blocksize, quant_type=quant_state.quant_type)
    return bnbF.dequantize_4bit(q, qs).float()


@pytest.mark.parametrize("keep_sparsity", [True, False])
def test_4bit_merge_after_forward(pruned_4bit, keep_sparsity):
    from adapterlab import quant

    q = copy.deepcopy(pruned_4bit)
    names = [n for n, m in q.named_modules() if quant.is_4bit(m)]
    qstate = {n: q.get_submodule(n).weight.quant_state for n in names}
    pm = _lora(q, init_lora_weights=True)
    _randomize_(pm, std=0.02)
    deltas = {k: v.float() for k, v in _expected_deltas(pm).items()}
    unmerged = _logits(pm)  # this forward repacks the 4-bit weights in place (AVX512-BF16 CPUs)
    repacked = quant.quant_info(pm)["n_cpu_repacked"] > 0
    # the weights the model computes with now (the repack rounds absmax to bf16)
    w_deq = {n: quant.dequantize_weight(pm.get_base_model().get_submodule(n)) for n in names}
    anchor_model = copy.deepcopy(pm).merge_and_unload()  # peft reads the repacked layout as standard
    anchor = _logits(anchor_model)
    # probe=False: no forward after the merge, which would repack again (bf16 absmax) before we read
    merged, report = adapterlab.merge(pm, keep_sparsity=keep_sparsity, probe=False, return_report=True)
    for name, delta in deltas.items():
        w0 = w_deq[name]
        d = delta * (w0 != 0) if keep_sparsity else delta
        got = quant.dequantize_weight(merged.get_submodule(name))
        assert_close(got, _oracle_requant(w0, d, qstate[name]))  # same codes; absmax to fp32 rounding
        if keep_sparsity:
            assert bool((got[w0 == 0] == 0).all())  # zeros of a pruned + quantized base stay zero
    out = _logits(merged)
    rel = ((out - unmerged).norm() / unmerged.norm()).item()
    if not keep_sparsity:
        assert rel < 0.1  # requantization error only (tiny random model, 4-bit)
    assert report.output_rel_change is None
    if keep_sparsity:
        assert report.sparsity_after >= report.sparsity_before > 0.45
    if repacked:
        anchor_rel = ((anchor - unmerged).norm() / unmerged.norm()).item()
        assert anchor_rel > 3 * max(rel, 0.05)  # peft's merge after a forward is corrupt; ours is not


def test_4bit_merge_reports_output_change(pruned_4bit):
    pm = _lora(copy.deepcopy(pruned_4bit))
    _randomize_(pm, std=0.02)
    probe = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    unmerged = _logits(pm, probe)
    merged, report = adapterlab.merge(pm, probe=probe, return_report=True)
    out = _logits(merged, probe)
    rel = ((out - unmerged).norm() / unmerged.norm()).item()
    assert 0 < report.output_rel_change < 0.1
    assert report.output_rel_change == pytest.approx(rel, rel=0.05)  # the merged model repacks again on CPU
    assert report.output_max_abs_change > 0


def test_4bit_bad_shape_clear_error(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from adapterlab import quant

    path = tmp_path / "odd"
    tiny_llama(hidden_size=192, num_attention_heads=12, num_key_value_heads=3).save_pretrained(path)
    q = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_4bit=True), device_map={"": "cpu"}
    )  # quantized by transformers directly: k_proj / v_proj have out_features 48
    if not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in q.modules()):
        pytest.skip("this CPU never repacks 4-bit weights")
    pm = get_peft_model(q, LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    with pytest.raises(ValueError, match=r"multiple of 32.*k_proj \(out_features=48.*load_quantized"):
        adapterlab.merge(pm)
    assert hasattr(pm, "peft_config")
    quant.set_cpu_repack_(pm, False)  # the way out named by the message
    assert not hasattr(adapterlab.merge(pm), "peft_config")


def test_lowrank_layer_4bit_merge_unmerge_exact(pruned_4bit):
    from peft import get_peft_model

    from adapterlab import quant
    from adapterlab.tuners._lowrank import LowRankLayer

    pm = get_peft_model(copy.deepcopy(pruned_4bit), adapterlab.DyLoraConfig(r=4, target_modules=TARGETS))
    _randomize_(pm, std=0.02)
    unmerged = _logits(pm)  # repacks
    layer = next(m for m in pm.modules() if isinstance(m, LowRankLayer))
    w_before = quant.dequantize_weight(layer.get_base_layer())
    pm.base_model.merge_adapter()
    merged = _logits(pm)
    assert ((merged - unmerged).norm() / unmerged.norm()).item() < 0.1
    pm.base_model.unmerge_adapter()
    torch.testing.assert_close(quant.dequantize_weight(layer.get_base_layer()), w_before, rtol=0, atol=0)
    torch.testing.assert_close(_logits(pm), unmerged, rtol=0, atol=0)


def _int8_codes(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(CB [out, in] int8, SCB [out] fp32)`` of a bitsandbytes Linear8bitLt (wherever it keeps them)."""
    from adapterlab.quant import _base_layer

    m = _base_layer(module)
    scb = getattr(m.weight, "SCB", None)
    if scb is None:
        scb = m.state.SCB
    return m.weight.data.clone(), scb.clone()


def test_8bit_merge_keeps_zeros():
    """Oracle: bitsandbytes' own dequantization of the base codes, + the fp32 masked delta, then its row-wise
    int8 quantization of the fp16 sum — the merged layer holds exactly those codes and scales."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbF

    from adapterlab import quant

    q = quant.quantize_model(_pruned(), 8)
    pm = _lora(q)
    dyadic_(pm, seed=4)  # grid factors: the fp64 oracle delta is the library's fp32 delta exactly
    layers = {
        n.removeprefix("base_model.model.").removesuffix(".base_layer"): m
        for n, m in pm.named_modules()
        if quant.is_8bit(m)
    }
    codes = {n: _int8_codes(m) for n, m in layers.items()}
    deltas = _expected_deltas(pm)
    merged = adapterlab.merge(pm, keep_sparsity=True, probe=False)
    assert len(layers) == 14 and len(deltas) == 10
    changed = 0
    for name, (cb0, scb0) in codes.items():
        got_cb, got_scb = _int8_codes(merged.get_submodule(name))
        if name not in deltas:  # layers the adapter does not touch keep their codes
            assert torch.equal(got_cb, cb0) and torch.equal(got_scb, scb0)
            continue
        w = bnbF.int8_vectorwise_dequant(cb0, scb0)  # [out, in] fp32
        zero = w == 0
        assert zero.float().mean() > 0.45
        d = deltas[name]
        assert torch.equal(d.float().double(), d)
        want_cb, want_scb, _ = bnbF.int8_vectorwise_quant((w + torch.where(zero, 0.0, d.float())).to(torch.float16))
        assert torch.equal(got_cb, want_cb), name
        assert torch.equal(got_scb, want_scb), name
        assert bool((got_cb[zero] == 0).all())  # zeros of the pruned 8-bit base stay zero
        changed += int((got_cb != cb0).sum())
    assert changed > 0


# ---------------------------------------------------------------------------------------------
# one rounding rule on fp32 / bf16 / fp16 bases (issue 14)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_merge_rounds_once(dtype: torch.dtype, pruned: bool) -> None:
    """merged == (W.float() + s·B@A·M).to(dtype) bit for bit, the delta brute-forced from peft's factors."""
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(dtype=dtype)
    if pruned:
        prune_(base, "magnitude", 0.5)
    before = _weights(base)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))  # fp32 adapter (autocast)
    dyadic_(pm, seed=2)
    deltas = _expected_deltas(pm)  # fp64 s * B @ A: exact for grid factors
    merged = adapterlab.merge(pm, keep_sparsity=pruned, probe=False)
    twice = 0
    for name, d in deltas.items():
        assert torch.equal(d.float().double(), d)
        w0 = before[name]
        masked = torch.where(w0 == 0, 0.0, d) if pruned else d  # M = 1[W != 0] with keep_sparsity
        want = (w0.float() + masked.float()).to(dtype)
        got = merged.get_submodule(name).weight.detach()
        assert got.dtype == dtype and torch.equal(got, want), name
        if pruned:
            assert bool((got[w0 == 0] == 0).all())
        twice += int((w0 + masked.to(dtype) != want).sum())
    if dtype != torch.float32:
        assert twice > 0  # the inputs tell one rounding from two
