"""SHiRA rapid switching and multi-adapter fusion: exactness oracles and bad input."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from adapterlab import fuse_adapters, switch_adapter
from adapterlab.models import tiny_llama
from adapterlab.tuners.shira import ShiraConfig, shira_layers, unfuse_adapters
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, batch, logits


def base_weights(pm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: layer.get_base_layer().weight.detach().clone() for k, layer in shira_layers(pm)}


def two_adapters(dtype: torch.dtype = torch.float32, mask_type: str = "random") -> torch.nn.Module:
    """Adapters "a" and "beta" with non-zero values (init_weights=False; different seeds)."""
    pm = get_peft_model(
        tiny_llama(dtype=dtype),
        ShiraConfig(r=2, mask_type=mask_type, target_modules=TARGETS, init_weights=False, random_seed=1),
    )
    pm.add_adapter(
        "beta", ShiraConfig(r=2, mask_type=mask_type, target_modules=TARGETS, init_weights=False, random_seed=2)
    )
    for _, layer in shira_layers(pm):
        for name in ("default", "beta"):
            with torch.no_grad():
                layer.adapterlab_shira_values[name].mul_(0.1 if dtype == torch.float32 else 1e-3)
    return pm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switch_a_b_a_is_bit_identical(dtype: torch.dtype) -> None:
    pm = two_adapters(dtype)
    w0 = base_weights(pm)
    switch_adapter(pm, "default")
    wa = base_weights(pm)
    for key, layer in shira_layers(pm):
        idx = layer.adapterlab_shira_indices["default"].long()
        expected = w0[key].clone().flatten()
        expected[idx] = (expected[idx].float() + layer.adapterlab_shira_values["default"].detach()).to(dtype)
        assert torch.equal(wa[key].flatten(), expected)  # the scatter, computed in fp32, cast once
    switch_adapter(pm, "beta")
    assert any(not torch.equal(wa[k], w) for k, w in base_weights(pm).items())
    switch_adapter(pm, "default")
    for key, w in base_weights(pm).items():
        assert torch.equal(w, wa[key])
    assert unfuse_adapters(pm) == len(shira_layers(pm))
    for key, w in base_weights(pm).items():
        assert torch.equal(w, w0[key])


def test_switched_model_equals_unmerged_adapter() -> None:
    pm = two_adapters()
    x = batch()
    want = {}
    for name in ("default", "beta"):
        pm.set_adapter(name)
        want[name] = logits(pm, x)
    for name in ("beta", "default", "beta"):
        switch_adapter(pm, name)
        torch.testing.assert_close(logits(pm, x), want[name], **TOL[torch.float32])


def test_fusion_equals_sum_of_scaled_deltas_with_overlap() -> None:
    pm = two_adapters(mask_type="wm")  # identical wm masks: every entry overlaps
    w0 = base_weights(pm)
    for _, layer in shira_layers(pm):
        layer.set_scale("beta", 2.0)
    report = fuse_adapters(pm, {"default": 0.7, "beta": 0.3})
    assert report.weights == {"default": 0.7, "beta": 0.3} and report.layers == 6
    for key, layer in shira_layers(pm):
        assert torch.equal(layer.adapterlab_shira_indices["default"], layer.adapterlab_shira_indices["beta"])
        expected = w0[key] + 0.7 * layer.delta_weight("default") + 0.3 * layer.delta_weight("beta")  # delta has alpha
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), expected, **TOL[torch.float32])
    unfuse_adapters(pm)
    for key, w in base_weights(pm).items():
        assert torch.equal(w, w0[key])


def test_fusion_of_disjoint_adapters_and_switch_from_fusion() -> None:
    pm = two_adapters()
    w0 = base_weights(pm)
    fuse_adapters(pm, {"default": 1.0, "beta": -0.5})
    for key, layer in shira_layers(pm):
        expected = w0[key] + layer.delta_weight("default") - 0.5 * layer.delta_weight("beta")
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), expected, **TOL[torch.float32])
    switch_adapter(pm, "beta", weight=1.0)
    for key, layer in shira_layers(pm):
        torch.testing.assert_close(
            layer.get_base_layer().weight.detach(), w0[key] + layer.delta_weight("beta"), **TOL[torch.float32]
        )


def test_switch_between_adapters_loaded_from_disk(tmp_path) -> None:
    pm = two_adapters()
    pm.save_pretrained(tmp_path)  # default -> tmp_path, beta -> tmp_path/beta
    x = batch()
    pm.set_adapter("beta")
    want_b = logits(pm, x)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "beta"), "beta")
    switch_adapter(loaded, "beta")
    torch.testing.assert_close(logits(loaded, x), want_b, **TOL[torch.float32])


def test_pruned_base_stays_sparse_through_switches() -> None:
    model = tiny_llama()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("q_proj"):
                mod.weight.mul_(torch.rand(mod.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    zeros = {n: (m.weight == 0).clone() for n, m in model.named_modules() if n.endswith("q_proj")}
    pm = get_peft_model(
        model, ShiraConfig(r=4, target_modules=["q_proj"], respect_base_sparsity=True, init_weights=False)
    )
    pm.add_adapter(
        "beta",
        ShiraConfig(r=4, mask_type="wm", target_modules=["q_proj"], respect_base_sparsity=True, init_weights=False),
    )
    for name in ("default", "beta", "default"):
        switch_adapter(pm, name)
        for key, layer in shira_layers(pm):
            z = zeros[key]
            assert (layer.get_base_layer().weight[z] == 0).all()


# ---------------------------------------------------------------------------------------------
# bad input: one clear error, weights untouched


def test_switch_to_unknown_adapter_is_refused_untouched() -> None:
    pm = two_adapters()
    switch_adapter(pm, "beta")
    wb = base_weights(pm)
    with pytest.raises(ValueError, match=r"adapter 'nope' is not loaded; loaded SHiRA adapters: beta, default"):
        switch_adapter(pm, "nope")
    for key, w in base_weights(pm).items():
        assert torch.equal(w, wb[key])


def test_switch_to_adapter_for_other_shapes_is_refused_untouched() -> None:
    pm = two_adapters()
    switch_adapter(pm, "default")
    before = base_weights(pm)
    _, last = shira_layers(pm)[-1]
    last._dims["beta"] = (7, 9)  # as if trained for another base (loading such a file fails earlier)
    with pytest.raises(ValueError, match=r"trained for a layer of shape \(7, 9\)"):
        switch_adapter(pm, "beta")
    for key, w in base_weights(pm).items():
        assert torch.equal(w, before[key])


@pytest.mark.parametrize(
    "weights, match",
    [({}, "no adapter to fuse"), ({"beta": float("nan")}, "finite number"), ({"beta": "1"}, "finite number")],
)
def test_fuse_bad_weights(weights: dict, match: str) -> None:
    pm = two_adapters()
    w0 = base_weights(pm)
    with pytest.raises(ValueError, match=match):
        fuse_adapters(pm, weights)
    for key, w in base_weights(pm).items():
        assert torch.equal(w, w0[key])


def test_switch_on_model_without_shira_layers() -> None:
    with pytest.raises(ValueError, match="no adapterlab SHiRA layers"):
        switch_adapter(tiny_llama(), "default")


def test_uncalibrated_grad_adapter_cannot_be_fused() -> None:
    pm = two_adapters()
    pm.add_adapter("g", ShiraConfig(r=2, mask_type="grad", target_modules=TARGETS))
    with pytest.raises(ValueError, match="uncalibrated"):
        switch_adapter(pm, "g")


# ---------------------------------------------------------------------------------------------
# one rounding rule (issue 14): fused = (W.float() + sum_i w_i delta_i).to(dtype), bit for bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def overlapping_adapters(dtype: torch.dtype) -> torch.nn.Module:
    """Adapters "default" and "beta": random masks of 25 % density (different seeds), so that about a
    quarter of each mask overlaps the other; values ~1e-3 against base weights ~2e-2 (the regime where
    rounding once per adapter in bf16/fp16 differs from rounding the sum once)."""
    cfgs = [
        ShiraConfig(density=0.25, mask_type="random", target_modules=TARGETS, init_weights=False, random_seed=s)
        for s in (1, 2)
    ]
    pm = get_peft_model(tiny_llama(dtype=dtype), cfgs[0])
    pm.add_adapter("beta", cfgs[1])
    g = torch.Generator().manual_seed(5)
    for _, layer in shira_layers(pm):
        for name in ("default", "beta"):
            v = layer.adapterlab_shira_values[name]
            with torch.no_grad():
                v.copy_(torch.randn(v.shape, generator=g) * 1e-3)
    return pm


def oracle_fused(w0: torch.Tensor, layer, weights: dict[str, float]) -> torch.Tensor:
    """``(W.float() + sum_i w_i * delta_i).to(W.dtype)`` with each delta scattered here (alpha = 1)."""
    m, n = w0.shape
    total = torch.zeros(m * n, dtype=torch.float32)
    for name, w in weights.items():
        delta = torch.zeros(m * n, dtype=torch.float32)
        delta[layer.adapterlab_shira_indices[name].long()] = (
            layer.adapterlab_shira_values[name].detach().float() * w
        )  # unique indices
        total = total + delta
    return (w0.float() + total.view(m, n)).to(w0.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fusion_rounds_the_sum_once_and_unfuse_restores_bits(dtype: torch.dtype) -> None:
    pm = overlapping_adapters(dtype)
    w0 = base_weights(pm)
    for _, layer in shira_layers(pm):
        both = set(layer.adapterlab_shira_indices["default"].tolist()) & set(
            layer.adapterlab_shira_indices["beta"].tolist()
        )
        assert len(both) > 100  # the masks overlap
    weights = {"default": 0.7, "beta": -0.3}
    fuse_adapters(pm, weights)
    for key, layer in shira_layers(pm):
        assert torch.equal(layer.get_base_layer().weight.detach(), oracle_fused(w0[key], layer, weights)), key
    assert unfuse_adapters(pm) == len(shira_layers(pm))
    for key, w in base_weights(pm).items():
        assert torch.equal(w, w0[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_switch_equals_fusing_the_new_adapter_alone_on_the_base(dtype: torch.dtype) -> None:
    pm = overlapping_adapters(dtype)
    w0 = base_weights(pm)
    fuse_adapters(pm, {"default": 0.7, "beta": -0.3})
    switch_adapter(pm, "default")  # from a fusion
    for key, layer in shira_layers(pm):
        assert torch.equal(layer.get_base_layer().weight.detach(), oracle_fused(w0[key], layer, {"default": 1.0}))
    switch_adapter(pm, "beta", weight=0.5)  # between two single adapters (overlapping masks)
    for key, layer in shira_layers(pm):
        assert torch.equal(layer.get_base_layer().weight.detach(), oracle_fused(w0[key], layer, {"beta": 0.5}))
    switch_adapter(pm, "default")
    switch_adapter(pm, "beta", weight=0.5)
    for key, layer in shira_layers(pm):
        assert torch.equal(layer.get_base_layer().weight.detach(), oracle_fused(w0[key], layer, {"beta": 0.5}))
    unfuse_adapters(pm)
    for key, w in base_weights(pm).items():
        assert torch.equal(w, w0[key])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_peft_merge_of_two_adapters_rounds_once(dtype: torch.dtype) -> None:
    """peft's ``merge_adapter([a, b])`` and a later ``merge_adapter([b])`` on top of ``a`` write the same
    one-rounding result as :func:`fuse_adapters`."""
    for steps in ([["default", "beta"]], [["default"], ["beta"]]):
        pm = overlapping_adapters(dtype)
        w0 = base_weights(pm)
        for names in steps:
            pm.base_model.merge_adapter(names)
        for key, layer in shira_layers(pm):
            assert torch.equal(
                layer.get_base_layer().weight.detach(), oracle_fused(w0[key], layer, {"default": 1.0, "beta": 1.0})
            )
        pm.base_model.unmerge_adapter()
        for key, w in base_weights(pm).items():
            assert torch.equal(w, w0[key])


def test_safe_merge_of_a_broken_adapter_leaves_the_previous_fusion() -> None:
    pm = overlapping_adapters(torch.bfloat16)
    _, layer = shira_layers(pm)[0]
    w0 = layer.get_base_layer().weight.detach().clone()
    layer.fuse_many_({"default": 1.0})
    fused = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.adapterlab_shira_values["beta"][0] = float("nan")
    with pytest.raises(ValueError, match=r"NaNs/Infs in the merged weights of adapter\(s\) \['beta'\]"):
        layer.fuse_many_({"beta": 1.0}, safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight.detach(), fused) and layer.merged_adapters == ["default"]
    layer.unmerge()
    assert torch.equal(layer.get_base_layer().weight.detach(), w0)
