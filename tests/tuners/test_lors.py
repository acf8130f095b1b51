"""LoRS: common matrix, forward == brute-force masked computation, exact gradients == autograd
through an explicit mask (single layer in fp64 and the whole model), the straight-through mode ==
unmasked LoRA gradients, nothing dense is saved for backward, merge keeps the zero pattern (and
2:4), exact-zero cancellation survives unmerge, the gradient-based init equals the SVD of the mean
gradient, pattern-checked loading, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapterlab import prune_, sparsity_report
from adapterlab.models import tiny_llama
from adapterlab.pruning import check_nm, get_masks
from adapterlab.tuners.lors import LorsConfig, LorsLayer, lors_linear
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, TunerCase, TunerMatrix, batch, logits, train_step


class TestLorsMatrix(TunerMatrix):
    cases = [
        TunerCase("lors", lambda: LorsConfig(r=4, target_modules=TARGETS), fresh_process=True),
        TunerCase(
            "lors_ste_dropout",
            lambda: LorsConfig(r=4, lors_grad="low_rank_ste", lora_dropout=0.1, target_modules=TARGETS),
        ),
        TunerCase(
            "lors_alpha_over_r", lambda: LorsConfig(r=4, lora_alpha=8.0, use_rslora=False, target_modules=TARGETS)
        ),
    ]


def pruned(pattern: str | None = None, sparsity: float = 0.5) -> nn.Module:
    model = tiny_llama()
    prune_(model, "magnitude", sparsity, pattern=pattern)
    return model


def _lors(model: nn.Module, **kw):
    from peft import get_peft_model

    kw.setdefault("r", 4)
    kw.setdefault("init_weights", False)
    return get_peft_model(model, LorsConfig(target_modules=TARGETS, **kw))


def _layers(pm) -> list[LorsLayer]:
    return [m for m in pm.modules() if isinstance(m, LorsLayer)]


def _sparse_case(dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 16, generator=g, dtype=dtype) * (torch.rand(24, 16, generator=g) > 0.5)  # (d_out, d_in)
    b0 = torch.randn(24, generator=g, dtype=dtype) if bias else None
    x0 = torch.randn(2, 5, 16, generator=g, dtype=dtype)
    a0 = torch.randn(3, 16, generator=g, dtype=dtype)
    bb0 = torch.randn(24, 3, generator=g, dtype=dtype)
    probe = torch.randn(2, 5, 24, generator=g, dtype=dtype)
    return w, b0, x0, a0, bb0, probe


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_forward_equals_brute_force_masked_computation(pattern):
    pm = _lors(pruned(pattern), lora_alpha=8.0)
    ref = pruned(pattern)
    masks, mods = get_masks(ref), dict(ref.named_modules())
    s = 8.0 / math.sqrt(4)
    with torch.no_grad():
        for layer in _layers(pm):
            a, b = layer.lors_A["default"], layer.lors_B["default"]
            w = mods[layer.key].weight
            w.copy_(w + s * (b @ a) * masks[layer.key])  # explicit mask from pruning.get_masks
    torch.testing.assert_close(logits(pm, batch()), logits(ref, batch()), **TOL[torch.float32])


@pytest.mark.parametrize("include_weight", [True, False])
def test_exact_gradients_equal_autograd_through_explicit_mask(include_weight):
    w, bias, x0, a0, b0, probe = _sparse_case()
    mask = (w != 0).to(w.dtype)
    s = 1.7
    x, a, b, wt, bt = (t.clone().requires_grad_(True) for t in (x0, a0, b0, w, bias))
    y = lors_linear(x, wt, bt, a, b, s, include_weight=include_weight, grad_mode="exact")
    (y * probe).sum().backward()
    xr, ar, br, wr, brr = (t.clone().requires_grad_(True) for t in (x0, a0, b0, w, bias))
    w_eff = (wr if include_weight else 0) + s * (br @ ar) * mask  # autograd through an explicit mask
    yr = F.linear(xr, w_eff, brr)
    (yr * probe).sum().backward()
    torch.testing.assert_close(y, yr, **TOL[torch.float64])
    for got, want in ((x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad), (bt.grad, brr.grad)):
        torch.testing.assert_close(got, want, **TOL[torch.float64])
    if include_weight:
        torch.testing.assert_close(wt.grad, wr.grad, **TOL[torch.float64])  # dL/dW = G (mask is constant)
    else:
        assert wt.grad is None


def test_low_rank_ste_gradients_are_the_unmasked_lora_gradients():
    w, bias, x0, a0, b0, probe = _sparse_case()
    s = 0.9
    x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
    (lors_linear(x, w, bias, a, b, s, grad_mode="low_rank_ste") * probe).sum().backward()
    xr, ar, br = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
    (F.linear(xr, w + s * (br @ ar), bias) * probe).sum().backward()  # unmasked LoRA
    torch.testing.assert_close(a.grad, ar.grad, **TOL[torch.float64])
    torch.testing.assert_close(b.grad, br.grad, **TOL[torch.float64])
    xm = x0.clone().requires_grad_(True)  # dL/dx is still the masked one
    (F.linear(xm, w + s * (b0 @ a0) * (w != 0), bias) * probe).sum().backward()
    torch.testing.assert_close(x.grad, xm.grad, **TOL[torch.float64])


def test_whole_model_gradients_equal_explicit_mask_autograd(monkeypatch):
    import adapterlab.tuners.lors.layer as lors_layer

    x = batch()
    pm = _lors(pruned())
    pm.train()
    pm(x, labels=x).loss.backward()
    got = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}

    def explicit(x, weight, bias, a, b, scale, *, include_weight=True, grad_mode="exact"):
        mask = (weight != 0).to(a.dtype).detach()
        return F.linear(x, (weight if include_weight else 0) + scale * (b @ a) * mask, bias)

    monkeypatch.setattr(lors_layer, "lors_linear", explicit)
    pm.zero_grad(set_to_none=True)
    pm(x, labels=x).loss.backward()
    assert got
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, **TOL[torch.float32])


def _saved_numels(fn) -> list[tuple[int, int]]:
    saved: list[tuple[int, int]] = []

    def pack(t):
        saved.append((t.numel(), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_nothing_dense_is_saved_for_backward():
    w, bias, x0, a0, b0, _ = _sparse_case(torch.float32)
    x, a, b = (t.clone().requires_grad_(True) for t in (x0, a0, b0))
    dense = w.numel()
    saved = _saved_numels(lambda: lors_linear(x, w, bias, a, b, 2.0))
    assert all(n < dense or ptr == w.data_ptr() for n, ptr in saved)  # only x, W itself, A, B
    naive = _saved_numels(lambda: F.linear(x, w, bias) + x @ (2.0 * (b @ a) * (w != 0)).T)
    assert any(n >= dense and ptr != w.data_ptr() for n, ptr in naive)  # the naive masked LoRA stores BA ⊙ M


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_merge_keeps_zero_pattern_and_nm(pattern):
    base = pruned(pattern)
    before = get_masks(base)
    pm = _lors(pruned(pattern))
    x = batch()
    train_step(pm, x, lr=5e-2, steps=3, weight_decay=0.1)
    unmerged = logits(pm, x)
    assert pm.check_sparsity()
    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, x), unmerged, **TOL[torch.float32])
    pm.base_model.unmerge_adapter()
    for layer in _layers(pm):
        torch.testing.assert_close(
            layer.get_base_layer().weight, dict(base.named_modules())[layer.key].weight, **TOL[torch.float32]
        )
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), unmerged, **TOL[torch.float32])
    mods = dict(merged.named_modules())
    for name, keep in before.items():
        w = mods[name].weight
        assert bool(((w == 0) | keep).all()), name  # (W_merged == 0) ⊇ (W_base == 0)
        if pattern:
            assert check_nm(w, 2, 4), name
    assert (
        sparsity_report(merged, pattern=pattern).global_sparsity
        == sparsity_report(base, pattern=pattern).global_sparsity
    )
    if pattern:
        assert sparsity_report(merged, pattern=pattern).nm_valid


def test_exact_cancellation_in_merge_is_undone_by_unmerge():
    lin = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(64.0).view(8, 8) % 3)  # zeros at every third entry
    w0 = lin.weight.detach().clone()
    layer = LorsLayer(lin, "default", LorsConfig(r=1, lora_alpha=1.0, use_rslora=False), key="lin")
    with torch.no_grad():
        layer.lors_A["default"].copy_(torch.eye(8)[:1])  # A = e_0
        layer.lors_B["default"].copy_(-w0[:, :1])  # column 0 of the delta cancels column 0 of W
    layer.merge()
    assert torch.equal(lin.weight[:, 0], torch.zeros(8))
    layer.unmerge()
    assert torch.equal(lin.weight, w0)


def test_gradient_init_is_the_svd_of_the_mean_gradient():
    data = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(5))  # 2 batches of 1 sequence
    pm = _lors(pruned(), r=4, init_weights=True)
    x = batch()
    before = logits(pm, x)
    report = pm.lors_init_(data, batch_size=1)
    assert (report.samples, report.batches, report.layers) == (2, 2, len(TARGETS) * 2)
    ref = pruned()
    ref.eval()
    mods = dict(ref.named_modules())
    keys = [layer.key for layer in _layers(pm)]
    for k in keys:
        mods[k].weight.requires_grad_(True)
    for row in data:
        ref(row[None], labels=row[None]).loss.backward()
    for layer in _layers(pm):
        grad = mods[layer.key].weight.grad / 2  # mean over the 2 batches
        _, sv, vh = torch.linalg.svd(grad.double())
        a = layer.lors_A["default"].detach().double()  # (r, d_in)
        assert torch.equal(layer.lors_B["default"], torch.zeros_like(layer.lors_B["default"]))
        torch.testing.assert_close(a @ a.T, torch.eye(4, dtype=torch.float64), atol=1e-5, rtol=0)
        cosines = torch.linalg.svdvals(a @ vh[:4].T)  # principal angles between the two subspaces
        assert sv[3] > 1.01 * sv[4], "test data gives a well-separated top-r subspace"
        torch.testing.assert_close(cosines, torch.ones(4, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(logits(pm, x), before, rtol=0, atol=0)  # B = 0: output unchanged
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "base_layer" in n)
    pm2 = _lors(pruned(), r=4, init_weights=True, stable_gamma=2.0)
    pm2.lors_init_(data, batch_size=1)
    a2 = _layers(pm2)[0].lors_A["default"].detach()
    torch.testing.assert_close(a2.norm(dim=1), torch.full((4,), 0.5), atol=1e-5, rtol=0)


def test_save_load_on_pruned_base_and_pattern_check(tmp_path):
    from peft import PeftModel

    pm = _lors(pruned("2:4"))
    train_step(pm, batch(), lr=5e-2)
    pm.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(pruned("2:4"), str(tmp_path / "a"))
    torch.testing.assert_close(logits(loaded, batch()), logits(pm, batch()), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"layer .model.layers.0.* has another sparsity pattern"):
        PeftModel.from_pretrained(pruned(None, 0.6), str(tmp_path / "a"))


def test_bad_input_names_the_key():
    with pytest.raises(ValueError, match=r"lors_grad='fast'.*exact, low_rank_ste"):
        LorsConfig(lors_grad="fast")
    with pytest.raises(ValueError, match=r"stable_gamma must be a positive number"):
        LorsConfig(stable_gamma=0)
    with pytest.raises(ValueError, match=r"lors_samples must be an integer >= 1"):
        LorsConfig(lors_samples=0)
    with pytest.raises(ValueError, match=r"r=65 exceeds min\(d_in, d_out\)"):
        _lors(pruned(), r=65)
    pm = _lors(pruned())
    with pytest.raises(ValueError, match=r"integer tensor of input ids"):
        pm.lors_init_(torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"dicts with an 'input_ids'"):
        pm.lors_init_([torch.zeros(2, 6, dtype=torch.long)])


def test_bf16_base_trains_and_merges_keeping_zeros():
    from peft import get_peft_model

    model = tiny_llama(dtype=torch.bfloat16)
    prune_(model, "magnitude", None, pattern="2:4")
    masks = get_masks(model)
    pm = get_peft_model(model, LorsConfig(r=4, init_weights=False, target_modules=TARGETS))
    assert all(p.dtype == torch.float32 for p in pm.parameters() if p.requires_grad)  # adapters in fp32
    x = batch()
    train_step(pm, x, lr=5e-2)
    before = logits(pm, x)
    merged = pm.merge_and_unload()
    torch.testing.assert_close(logits(merged, x), before, **TOL[torch.bfloat16])
    mods = dict(merged.named_modules())
    for name, keep in masks.items():
        assert mods[name].weight.dtype == torch.bfloat16
        assert bool(((mods[name].weight == 0) | keep).all()) and check_nm(mods[name].weight, 2, 4), name
