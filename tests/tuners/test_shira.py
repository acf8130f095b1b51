"""SHiRA: the common tuner matrix, mask-strategy oracles, the sparse op, storage, peft interop, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model

from adapterlab.io import load_tensors
from adapterlab.models import tiny_llama
from adapterlab.tuners.shira import (
    PendingMaskError,
    ShiraConfig,
    budget,
    calibrate_masks_,
    load_shira,
    mask_indices,
    random_indices,
    shira_layers,
    sparse_linear,
    struct_indices,
    topk_indices,
)
from adapterlab.tuners.shira.functional import flat_to_rowcol, index_dtype, rowcol_to_flat, scatter_delta
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, TunerCase, TunerMatrix, batch, logits, train_step


class TestShiraMatrix(TunerMatrix):
    cases = [
        TunerCase(
            "shira_random_r", lambda: ShiraConfig(r=2, mask_type="random", target_modules=TARGETS), fresh_process=True
        ),
        TunerCase("shira_wm_density", lambda: ShiraConfig(density=0.05, mask_type="wm", target_modules=TARGETS)),
        TunerCase("shira_struct", lambda: ShiraConfig(density=0.1, mask_type="struct", target_modules=TARGETS)),
    ]


# ---------------------------------------------------------------------------------------------
# budget and mask oracles


def test_budget_arithmetic() -> None:
    assert budget(64, 32, r=2) == 2 * (64 + 32)
    assert budget(100, 50, density=0.01) == 50
    assert budget(3, 3, density=1.0) == 9
    assert budget(10, 10, density=1e-6) == 1  # at least one entry


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of density or r"),
        ({"density": 0.1, "r": 2}, "exactly one of density or r"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": 40}, "larger than the matrix"),
    ],
)
def test_budget_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        budget(64, 32, **kwargs)


def test_wm_picks_largest_magnitudes() -> None:
    w = torch.tensor([[1.0, -5.0, 2.0], [0.5, 4.0, -3.0]])
    assert mask_indices("wm", w.shape, 2, weight=w).tolist() == [1, 4]  # -5 at (0,1), 4 at (1,1)
    assert mask_indices("wm", w.shape, 3, weight=w).tolist() == [1, 4, 5]


def test_grad_and_snip_pick_largest_scores() -> None:
    w = torch.tensor([[1.0, -5.0, 2.0], [0.5, 4.0, -3.0]])
    g = torch.tensor([[3.0, 0.1, -2.0], [10.0, 0.2, 0.5]])
    # |G| = [3, .1, 2, 10, .2, .5] -> top2 at 3 (10) and 0 (3)
    assert mask_indices("grad", w.shape, 2, weight=w, grad=g).tolist() == [0, 3]
    # |W*G| = [3, .5, 4, 5, .8, 1.5] -> top2 at 3 (5) and 2 (4)
    assert mask_indices("snip", w.shape, 2, weight=w, grad=g).tolist() == [2, 3]


def test_topk_exact_count_with_ties_and_allowed() -> None:
    score = torch.zeros(8, 8)  # all ties: exactly K, no overshoot
    assert topk_indices(score, 5).numel() == 5
    allowed = torch.zeros(8, 8, dtype=torch.bool)
    allowed[::2] = True
    idx = topk_indices(torch.rand(8, 8), 7, allowed=allowed)
    assert idx.numel() == 7 and allowed.flatten()[idx].all()
    with pytest.raises(ValueError, match="only 32 non-zero base entries"):
        topk_indices(score, 33, allowed=allowed)


def test_random_mask_exact_unique_sorted_reproducible() -> None:
    a = random_indices(20, 30, 77, seed=5)
    assert a.numel() == 77 and a.unique().numel() == 77 and torch.equal(a, a.sort().values)
    assert torch.equal(a, random_indices(20, 30, 77, seed=5))
    assert not torch.equal(a, random_indices(20, 30, 77, seed=6))
    allowed = torch.rand(20, 30) > 0.5
    b = random_indices(20, 30, 77, seed=5, allowed=allowed)
    assert b.numel() == 77 and allowed.flatten()[b].all()


def test_struct_hand_computed() -> None:
    # 4 x 6, K = 10: diagonal (0, 7, 14, 21), then row 0 without (0,0): 1..5, then row 1: 6 -> stop
    assert struct_indices(4, 6, 10).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 14, 21]
    assert struct_indices(4, 6, 3).tolist() == [0, 7, 14]


def _struct_reference(m: int, n: int, k: int, allowed: torch.Tensor | None) -> list[int]:
    d = min(m, n)
    rest = max(0, k - d)
    f = max(1, m // max(1, math.ceil(rest / n))) if rest else m
    strided = list(range(0, m, f))
    rows = strided + [r for r in range(m) if r not in strided]
    order = [i * n + i for i in range(d)] + [r * n + c for r in rows for c in range(n) if r != c]
    if allowed is not None:
        order = [p for p in order if bool(allowed.flatten()[p])]
    return sorted(order[:k])


@pytest.mark.parametrize("m, n, k", [(8, 5, 20), (5, 8, 17), (16, 16, 40), (7, 3, 21), (6, 9, 6)])
def test_struct_matches_reference_loop(m: int, n: int, k: int) -> None:
    assert struct_indices(m, n, k).tolist() == _struct_reference(m, n, k, None)
    allowed = torch.rand(m, n, generator=torch.Generator().manual_seed(m * n)) > 0.3
    kk = min(k, int(allowed.sum()))
    assert struct_indices(m, n, kk, allowed=allowed).tolist() == _struct_reference(m, n, kk, allowed)


def test_index_conversions_and_dtype() -> None:
    flat = torch.tensor([0, 5, 11])
    rc = flat_to_rowcol(flat, 4)
    assert rc.tolist() == [[0, 1, 2], [0, 1, 3]]
    assert torch.equal(rowcol_to_flat(rc, 4), flat)
    assert index_dtype(2**31 - 1) is torch.int32 and index_dtype(2**31) is torch.int64


# ---------------------------------------------------------------------------------------------
# the sparse op


@pytest.mark.parametrize("with_weight", [True, False])
def test_sparse_linear_matches_dense_autograd(with_weight: bool) -> None:
    g = torch.Generator().manual_seed(0)
    m, n = 6, 5
    w = torch.randn(m, n, generator=g)
    idx = torch.tensor([1, 4, 7, 20, 29])
    v1 = torch.randn(5, generator=g, requires_grad=True)
    x1 = torch.randn(3, 2, n, generator=g, requires_grad=True)
    v2, x2 = v1.detach().clone().requires_grad_(True), x1.detach().clone().requires_grad_(True)
    out = sparse_linear(x1, v1, idx, (m, n), weight=w if with_weight else None)
    s = torch.zeros(m * n).index_put((idx,), v2, accumulate=True).view(m, n)  # brute-force dense S
    ref = x2 @ ((w if with_weight else 0) + s).T
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    gy = torch.randn_like(ref)
    out.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(v1.grad, v2.grad, **TOL[torch.float32])
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float32])


def test_forward_equals_dense_formula_with_scale() -> None:
    pm = get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    _, layer = shira_layers(pm)[0]
    layer.set_scale("default", 0.5)
    x = torch.randn(2, 3, 64)
    w = layer.get_base_layer().weight.detach()
    ref = x @ (w + layer.delta_weight("default")).T  # delta_weight includes alpha
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# storage, parameters, dtype


def test_only_k_values_are_parameters_and_storage(tmp_path) -> None:
    cfg = ShiraConfig(r=2, mask_type="wm", target_modules=TARGETS)
    pm = get_peft_model(tiny_llama(), cfg)
    expected = 2 * 2 * ((64 + 64) + (32 + 64) + (64 + 128))  # 2 layers x r (m + n) per target
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == expected == pm.trainable_count()
    assert all("adapterlab_shira_values" in n and p.dtype == torch.float32 for n, p in trainable)
    pm.save_pretrained(tmp_path)
    sd = load_tensors(tmp_path / "adapter_model.safetensors")
    values = {k: v for k, v in sd.items() if k.endswith(".adapterlab_shira_values")}
    indices = {k: v for k, v in sd.items() if k.endswith(".adapterlab_shira_indices")}
    assert len(values) == len(indices) == 6
    for k, v in values.items():
        i = indices[k.replace("values", "indices")]
        assert v.dtype == torch.float32 and i.dtype == torch.int32 and i.shape == v.shape and v.dim() == 1
        assert torch.equal(i, i.sort().values)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ADAPTERLAB_SHIRA"


def test_bf16_base_merge_in_fp32_and_exact_unmerge() -> None:
    model = tiny_llama(dtype=torch.bfloat16)
    pm = get_peft_model(model, ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False))
    _, layer = shira_layers(pm)[0]
    v = layer.adapterlab_shira_values["default"]
    assert v.dtype == torch.float32
    with torch.no_grad():
        v.mul_(1e-3)  # small deltas: bf16 subtraction would not restore the base
    w = layer.get_base_layer().weight
    w0 = w.detach().clone()
    idx = layer.adapterlab_shira_indices["default"].long()
    pm.base_model.merge_adapter()
    expected = (w0.flatten()[idx].float() + v.detach()).to(torch.bfloat16)
    assert torch.equal(w.detach().flatten()[idx], expected)
    pm.base_model.unmerge_adapter()
    assert torch.equal(w.detach(), w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_half_and_full_bases_merge_once_rounded_and_restore_bits(dtype: torch.dtype) -> None:
    """fp32 values on any base; merged weight == (W.float() + delta).to(dtype) with delta scattered here;
    merged ~ unmerged within TOL[dtype]; unmerge gives the original bits."""
    pm = get_peft_model(
        tiny_llama(dtype=dtype), ShiraConfig(r=2, mask_type="random", target_modules=TARGETS, init_weights=False)
    )
    layers = shira_layers(pm)
    g = torch.Generator().manual_seed(3)
    for _, layer in layers:
        v = layer.adapterlab_shira_values["default"]
        assert v.dtype == torch.float32 and layer.get_base_layer().weight.dtype == dtype
        with torch.no_grad():
            v.copy_(torch.randn(v.shape, generator=g) * 2e-2)
        layer.set_scale("default", 0.5)
    w0 = {k: layer.get_base_layer().weight.detach().clone() for k, layer in layers}
    x = batch()
    unmerged = logits(pm, x)
    assert not torch.equal(unmerged, logits(tiny_llama(dtype=dtype), x))  # the adapter does something
    pm.base_model.merge_adapter()
    for key, layer in layers:
        m, n = w0[key].shape
        delta = torch.zeros(m * n)
        delta[layer.adapterlab_shira_indices["default"].long()] = (
            layer.adapterlab_shira_values["default"].detach() * 0.5
        )
        assert torch.equal(layer.get_base_layer().weight.detach(), (w0[key].float() + delta.view(m, n)).to(dtype)), key
    torch.testing.assert_close(logits(pm, x), unmerged, **TOL[dtype])
    pm.base_model.unmerge_adapter()
    for key, layer in layers:
        assert torch.equal(layer.get_base_layer().weight.detach(), w0[key])
    assert torch.equal(logits(pm, x), unmerged)
    pm.train()
    pm(x, labels=x).loss.backward()  # mixed dtypes in a layer (fp32 values, half base): no error
    assert all(layer.adapterlab_shira_values["default"].grad.dtype == torch.float32 for _, layer in layers)


# ---------------------------------------------------------------------------------------------
# pruned bases


def _pruned_tiny() -> torch.nn.Module:
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith("q_proj"):
                mod.weight.mul_(torch.rand(mod.weight.shape, generator=g) > 0.5)
    return model


@pytest.mark.parametrize("mask_type", ["random", "struct", "wm", "snip"])
def test_respect_base_sparsity_keeps_pruned_base_sparse(mask_type: str) -> None:
    model = _pruned_tiny()
    zeros = {n: (p == 0).clone() for n, p in model.named_parameters() if "q_proj" in n}
    cfg = ShiraConfig(
        r=4, mask_type=mask_type, target_modules=["q_proj"], respect_base_sparsity=True, init_weights=False
    )
    pm = get_peft_model(model, cfg)
    if mask_type == "snip":
        pm.calibrate_masks_(_calib_batches())
        for _, layer in shira_layers(pm):
            with torch.no_grad():
                layer.adapterlab_shira_values["default"].normal_()
    for _, layer in shira_layers(pm):
        w = layer.get_base_layer().weight
        idx = layer.adapterlab_shira_indices["default"].long()
        assert idx.numel() == 4 * 128 and (w.flatten()[idx] != 0).all()
    merged = pm.merge_and_unload()
    for n, p in merged.named_parameters():
        if n in zeros:
            assert zeros[n].any() and (p[zeros[n]] == 0).all()


# ---------------------------------------------------------------------------------------------
# grad / snip calibration


def _calib_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (2, 10), generator=g) for _ in range(3)]


@pytest.mark.parametrize("mask_type, accum", [("snip", "sum"), ("grad", "abs")])
def test_calibrated_masks_equal_brute_force(mask_type: str, accum: str) -> None:
    batches = _calib_batches()
    ref_model = tiny_llama()
    grads = {}
    for b in batches:  # brute force: plain autograd on the base model, one batch at a time
        ref_model.zero_grad()
        ref_model(b, labels=b).loss.backward()
        for name, p in ref_model.named_parameters():
            if name.endswith(("q_proj.weight", "down_proj.weight")):
                g = p.grad.detach().clone()
                grads[name] = grads.get(name, 0) + (g.abs() if accum == "abs" else g)
    pm = get_peft_model(
        tiny_llama(), ShiraConfig(r=2, mask_type=mask_type, grad_accum=accum, target_modules=["q_proj", "down_proj"])
    )
    report = pm.calibrate_masks_(batches)
    assert report.batches == 3 and len(report.layers) == 4
    masks = pm.masks()
    for name, g in grads.items():
        key = name.removesuffix(".weight")
        w = ref_model.get_parameter(name).detach()
        score = g.abs() if mask_type == "grad" else (w * g).abs()
        k = masks[key].numel()
        expected = torch.topk(score.flatten(), k).indices.sort().values
        assert torch.equal(masks[key], expected), key
    assert all(p.grad is None for p in pm.parameters())
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "base_layer" in n)


def test_training_before_calibration_is_refused_then_works(tmp_path) -> None:
    pm = get_peft_model(tiny_llama(), ShiraConfig(r=2, mask_type="snip", target_modules=TARGETS))
    x = batch()
    with pytest.raises(PendingMaskError, match="calibrate_masks_"):
        train_step(pm, x)
    calibrate_masks_(pm, _calib_batches(), max_batches=2)
    base = logits(tiny_llama(), x)
    train_step(pm, x)
    after = logits(pm, x)
    assert (after - base).abs().max() > 1e-4
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path))
    torch.testing.assert_close(logits(loaded, x), after, rtol=0, atol=0)
    for key, idx in pm.masks().items():
        assert torch.equal(loaded.masks()[key], idx)


# ---------------------------------------------------------------------------------------------
# peft's own SHiRA format


def test_peft_saved_shira_loads_and_export_roundtrip(tmp_path) -> None:
    from peft import ShiraConfig as PeftShiraConfig

    x = batch()
    peft_pm = get_peft_model(
        tiny_llama(), PeftShiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False, random_seed=3)
    )
    want = logits(peft_pm, x)
    peft_pm.save_pretrained(tmp_path / "peft")
    ours = load_shira(tiny_llama(), tmp_path / "peft")
    assert isinstance(ours.peft_config["default"], ShiraConfig)
    torch.testing.assert_close(logits(ours, x), want, **TOL[torch.float32])
    ours.export_peft(tmp_path / "back")
    again = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "back"))
    torch.testing.assert_close(logits(again, x), want, **TOL[torch.float32])


def test_peft_format_as_second_adapter(tmp_path) -> None:
    from peft import ShiraConfig as PeftShiraConfig

    x = batch()
    peft_pm = get_peft_model(tiny_llama(), PeftShiraConfig(r=1, target_modules=["q_proj"], init_weights=False))
    want = logits(peft_pm, x)
    peft_pm.save_pretrained(tmp_path / "peft")
    pm = get_peft_model(tiny_llama(), ShiraConfig(r=1, target_modules=["q_proj"]))
    load_shira(pm, tmp_path / "peft", adapter_name="from_peft")
    pm.set_adapter("from_peft")
    torch.testing.assert_close(logits(pm, x), want, **TOL[torch.float32])


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of density"),
        ({"density": 0.1, "r": 2}, "exactly one of density"),
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.01}, r"density must be in \(0, 1\]"),
        ({"r": 2, "mask_type": "magnitude"}, "choose one of: random, struct, wm, grad, snip"),
        ({"r": 2, "grad_accum": "mean"}, "choose one of: sum, abs"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShiraConfig(target_modules=["q_proj"], **kwargs)


def test_k_larger_than_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="larger than the matrix"):
        get_peft_model(tiny_llama(), ShiraConfig(r=22, target_modules=["v_proj"]))  # 22 * 96 > 32 * 64


def test_unknown_target_module_is_named() -> None:
    with pytest.raises(ValueError, match="'qq_proj'"):
        get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["qq_proj"]))


def test_loading_on_other_shapes_is_refused(tmp_path) -> None:
    pm = get_peft_model(tiny_llama(), ShiraConfig(r=1, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="other shapes"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=32, intermediate_size=64), str(tmp_path))


def test_scatter_delta_sums_repeated_indices() -> None:
    d = scatter_delta(torch.tensor([0, 0, 3]), torch.tensor([1.0, 2.0, 5.0]), (2, 2), scale=2.0)
    assert d.tolist() == [[6.0, 0.0], [0.0, 10.0]]


# ---------------------------------------------------------------------------------------------
# bitsandbytes 4-bit base


def test_4bit_base_trains_unmerged_and_refuses_fusion() -> None:
    from adapterlab import switch_adapter
    from adapterlab.quant import quantize_model
    from adapterlab.tuners._lowrank import QuantizedMergeError

    qbase = quantize_model(tiny_llama(), bits=4)
    x = batch()
    base = logits(qbase, x)
    pm = get_peft_model(qbase, ShiraConfig(r=2, mask_type="wm", target_modules=["q_proj", "down_proj"]))
    torch.testing.assert_close(logits(pm, x), base, rtol=0, atol=0)
    train_step(pm, x)
    assert (logits(pm, x) - base).abs().max() > 1e-4
    weights = {k: layer.get_base_layer().weight.detach().clone() for k, layer in shira_layers(pm)}
    with pytest.raises(QuantizedMergeError, match="load the base unquantized"):
        switch_adapter(pm, "default")
    for k, layer in shira_layers(pm):
        assert torch.equal(layer.get_base_layer().weight.detach(), weights[k])
    with pytest.raises(ValueError, match="needs gradients of the base weight"):
        pm.add_adapter("snip_adapter", ShiraConfig(r=2, mask_type="snip", target_modules=["q_proj"]))
        calibrate_masks_(pm, _calib_batches(), adapter_name="snip_adapter")
