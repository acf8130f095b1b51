"""SPP: common matrix, brute-force forward oracle on pruned bases (unstructured and 2:4), grouped ==
materialized (values and gradients), merge keeps the base's zero pattern exactly, exact unmerge,
pattern-checked loading, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adapterlab import prune_, sparsity_report
from adapterlab.models import tiny_llama
from adapterlab.pruning import check_nm, get_masks
from adapterlab.tuners.spp import SparsityViolation, SppConfig, SppLayer, spp_delta, spp_extra
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, TunerCase, TunerMatrix, batch, logits, train_step


class TestSppMatrix(TunerMatrix):
    cases = [
        TunerCase("spp", lambda: SppConfig(target_modules=TARGETS, lora_dropout=0.0), fresh_process=True),
        TunerCase(
            "spp_grouped_rslora_dropout",
            lambda: SppConfig(target_modules=TARGETS, forward_mode="grouped", use_rslora=True, lora_dropout=0.1),
        ),
    ]


def pruned(pattern: str | None = None, sparsity: float = 0.5) -> nn.Module:
    model = tiny_llama()
    prune_(model, "magnitude", sparsity, pattern=pattern)
    return model


def _spp(model: nn.Module, **kw):
    from peft import get_peft_model

    kw.setdefault("lora_dropout", 0.0)
    return get_peft_model(model, SppConfig(target_modules=TARGETS, init_weights=False, **kw))


def _layers(pm) -> list[SppLayer]:
    return [m for m in pm.modules() if isinstance(m, SppLayer)]


def brute_force_weight(w0: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, s: float) -> torch.Tensor:
    """``W0 + Delta W`` entry by entry of each row: row i uses alpha[i // (d_out / g)]."""
    d_out, g = w0.shape[0], alpha.shape[0]
    out = w0.clone()
    for i in range(d_out):  # a plain loop over rows (test oracle only)
        out[i] = w0[i] + s * beta[i, 0] * alpha[i // (d_out // g)] * w0[i]
    return out


@pytest.mark.parametrize("pattern", [None, "2:4"])
@pytest.mark.parametrize("mode", ["materialized", "grouped"])
def test_forward_equals_brute_force_masked_computation(pattern, mode):
    pm = _spp(pruned(pattern), forward_mode=mode, lora_alpha=8.0, r=2)
    ref = pruned(pattern)
    mods = dict(ref.named_modules())
    with torch.no_grad():
        for layer in _layers(pm):
            a, b = layer.spp_alpha["default"], layer.spp_beta["default"]
            mods[layer.key].weight.copy_(brute_force_weight(layer.base_weight(), a, b, 4.0))
    torch.testing.assert_close(logits(pm, batch()), logits(ref, batch()), **TOL[torch.float32])


def test_grouped_equals_materialized_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 24, generator=g, dtype=torch.float64) * (torch.rand(32, 24, generator=g) > 0.5)
    x0 = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    a0 = torch.randn(8, 24, generator=g, dtype=torch.float64)
    b0 = torch.randn(32, 1, generator=g, dtype=torch.float64)
    results = {}
    for mode in ("materialized", "grouped"):
        x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
        y = spp_extra(x, w, a, b, 1.5, mode)  # (3, 5, 32)
        y.pow(2).sum().backward()
        results[mode] = (y.detach(), x.grad, a.grad, b.grad)
    expected = x0 @ (brute_force_weight(w, a0, b0, 1.5) - w).T
    torch.testing.assert_close(results["materialized"][0], expected, **TOL[torch.float64])
    for got, want in zip(results["grouped"], results["materialized"]):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    assert torch.equal(spp_delta(w, a0, b0, 1.5)[w == 0], torch.zeros(int((w == 0).sum()), dtype=torch.float64))


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_merge_keeps_zero_pattern_and_nm(pattern):
    base = pruned(pattern)
    before = get_masks(base)
    base_sparsity = sparsity_report(base, pattern=pattern).global_sparsity
    pm = _spp(pruned(pattern))
    x = batch()
    train_step(pm, x, lr=5e-2, steps=3, weight_decay=0.1)
    unmerged = logits(pm, x)
    assert pm.check_sparsity()
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), unmerged, **TOL[torch.float32])
    after = get_masks(merged)
    changed = 0
    for name, keep in before.items():
        w = dict(merged.named_modules())[name].weight
        assert bool(((w == 0) | keep).all()), name  # (W_merged == 0) ⊇ (W_base == 0)
        if pattern:
            assert check_nm(w, 2, 4), name
        changed += int((after[name] != keep).sum())
    report = sparsity_report(merged, pattern=pattern)
    assert report.global_sparsity >= base_sparsity
    if pattern:
        assert report.nm_valid
    adapted = [k for k in before if k.rsplit(".", 1)[-1] in TARGETS]
    base_w = dict(base.named_modules())
    assert any(not torch.equal(dict(merged.named_modules())[k].weight, base_w[k].weight) for k in adapted)
    assert changed == 0  # the nonzero pattern is identical (no weight cancelled to exactly 0)


def test_unmerge_restores_exactly_and_multi_adapter_merge():
    pm = _spp(pruned())
    pm.add_adapter("b", SppConfig(target_modules=TARGETS, init_weights=False, groups=8, lora_dropout=0.0))
    x = batch()
    originals = {layer.key: layer.get_base_layer().weight.detach().clone() for layer in _layers(pm)}
    pm.base_model.set_adapter(["default", "b"])
    both = logits(pm, x)
    pm.base_model.merge_adapter(["default", "b"])
    torch.testing.assert_close(logits(pm, x), both, **TOL[torch.float32])  # deltas relative to W0, summed
    pm.base_model.unmerge_adapter()
    for layer in _layers(pm):
        assert torch.equal(layer.get_base_layer().weight, originals[layer.key])


def test_merge_refuses_to_fill_zeros():
    pm = _spp(pruned())
    layer = _layers(pm)[0]
    w_before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.spp_alpha["default"].fill_(float("inf"))  # 0 * inf = nan at the zeros
    with pytest.raises(SparsityViolation, match="would fill zeros of the sparse base"):
        layer.merge()
    assert torch.equal(layer.get_base_layer().weight, w_before) and not layer.merged


def test_save_load_on_pruned_base_and_pattern_check(tmp_path):
    from peft import PeftModel

    pm = _spp(pruned("2:4"))
    train_step(pm, batch(), lr=5e-2)
    pm.save_pretrained(tmp_path / "a")
    from adapterlab.io import load_tensors

    keys = set(load_tensors(tmp_path / "a" / "adapter_model.safetensors"))
    assert any(k.endswith("spp_alpha") for k in keys) and any(k.endswith("spp_beta") for k in keys)
    assert any(k.endswith("spp_pattern.digest") for k in keys)
    assert all(t.numel() <= 64 * 128 for t in load_tensors(tmp_path / "a" / "adapter_model.safetensors").values())
    loaded = PeftModel.from_pretrained(pruned("2:4"), str(tmp_path / "a"))
    torch.testing.assert_close(logits(loaded, batch()), logits(pm, batch()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="another sparsity pattern"):
        PeftModel.from_pretrained(pruned(None, 0.6), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="another sparsity pattern"):
        PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match=r"groups must be an integer >= 1"):
        SppConfig(groups=0)
    with pytest.raises(ValueError, match=r"forward_mode='fast'.*auto, materialized, grouped"):
        SppConfig(forward_mode="fast")
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        SppConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match=r"groups=3 does not divide the output size d_out=64.*q_proj"):
        _spp(pruned(), groups=3)


def test_only_factors_are_trainable():
    pm = _spp(pruned())
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all(("spp_alpha" in n) or ("spp_beta" in n) for n in names)
    layer = _layers(pm)[0]
    assert layer.spp_alpha["default"].shape == (16, layer.in_features)
    assert layer.spp_beta["default"].shape == (layer.out_features, 1)


def test_bf16_base_trains_and_merges_keeping_zeros():
    from peft import get_peft_model

    model = tiny_llama(dtype=torch.bfloat16)
    prune_(model, "magnitude", None, pattern="2:4")
    masks = get_masks(model)
    pm = get_peft_model(model, SppConfig(init_weights=False, lora_dropout=0.0, target_modules=TARGETS))
    x = batch()
    train_step(pm, x, lr=5e-2)
    before = logits(pm, x)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), before, **TOL[torch.bfloat16])
    mods = dict(merged.named_modules())
    for name, keep in masks.items():
        assert bool(((mods[name].weight == 0) | keep).all()) and check_nm(mods[name].weight, 2, 4), name
