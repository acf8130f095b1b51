"""SNELL: common matrix, kernel vs a brute-force loop, exact keep fraction, orientation, SNELLA
schedule/allocation oracles, exact merge/unmerge (dense and 8-bit), bad input."""

from __future__ import annotations

import math

import pytest
import torch

from adapterlab.models import tiny_llama
from adapterlab.tuners import SnellConfig
from adapterlab.tuners.snell import (
    allocate_budget,
    budget_schedule,
    head_coefficients,
    keep_count,
    keep_mask,
    kernel_matrix,
    sparsify,
)
from adapterlab.tuners.snell.layer import SnellLayer
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, TunerCase, TunerMatrix, batch, logits, train_step


class TestSnellMatrix(TunerMatrix):
    cases = [
        # the generated delta is not zero at init (methods/snell.md pitfall 2)
        TunerCase(
            "snell",
            lambda: SnellConfig(r=4, sparsity=0.3, target_modules=TARGETS),
            identity_at_init=False,
            fresh_process=True,
        ),
        TunerCase(
            "snella_offset_rslora",
            lambda: SnellConfig(
                r=4,
                kernel="snella",
                sparsity=0.5,
                zero_init_offset=True,
                lora_alpha=8,
                use_rslora=True,
                lora_dropout=0.1,
                drop_path=0.1,
                target_modules=TARGETS,
            ),
        ),
        TunerCase(
            "snell_square_dense_nockpt",
            lambda: SnellConfig(
                r=4,
                heads=1,
                sparsity=0.0,
                snell_reference_square=True,
                checkpoint_kernel=False,
                norm_p=1.0,
                target_modules=TARGETS,
            ),
            identity_at_init=False,
        ),
    ]


def _snell(**kw):
    from peft import get_peft_model

    torch.manual_seed(0)
    kw.setdefault("target_modules", TARGETS)
    return get_peft_model(tiny_llama(), SnellConfig(**kw))


def _layers(pm) -> list[SnellLayer]:
    return [m for m in pm.modules() if isinstance(m, SnellLayer)]


def _brute_kernel(p_in, q_out, coeffs, norm_p, mix=None):
    heads, n, _ = p_in.shape
    m = q_out.shape[1]
    k = torch.zeros(n, m, dtype=torch.float64)
    for j in range(n):
        for i in range(m):
            for h in range(heads):
                diff = (p_in[h, j].double() - q_out[h, i].double()).abs()
                k[j, i] += float(coeffs[h]) * float((diff**norm_p).sum() ** (1.0 / norm_p))
    if mix is not None:
        a, g, b = (float(v) for v in mix)
        k = k + a * torch.softmax(k / g, dim=-1) + b
    return k


def _broadcast_kernel(p_in, q_out, coeffs, norm_p):
    """Independent of cdist: explicit pairwise differences (H, n, m, d) in float64."""
    diff = (p_in.double()[:, :, None, :] - q_out.double()[:, None, :, :]).abs()  # (H, n, m, d)
    return (coeffs.double().view(-1, 1, 1) * (diff**norm_p).sum(-1) ** (1.0 / norm_p)).sum(0)  # (n, m)


# ---------------------------------------------------------------------------------------------
# kernel and sparsification oracles


@pytest.mark.parametrize("norm_p", [2.0, 1.0])
@pytest.mark.parametrize("snella", [False, True])
def test_kernel_matches_brute_force_loop(norm_p, snella):
    g = torch.Generator().manual_seed(3)
    p_in, q_out = torch.randn(2, 5, 3, generator=g), torch.randn(2, 4, 3, generator=g)  # (H, n, d), (H, m, d)
    coeffs = head_coefficients(2, 0.1)
    assert coeffs.tolist() == pytest.approx([0.1, -0.1])
    mix = torch.tensor([0.7, 1.3, -0.2]) if snella else None
    got = kernel_matrix(
        p_in.double(), q_out.double(), coeffs.double(), norm_p=norm_p, mix=None if mix is None else mix.double()
    )
    assert got.shape == (5, 4)  # input-major (n, m)
    torch.testing.assert_close(got, _brute_kernel(p_in, q_out, coeffs, norm_p, mix), **TOL[torch.float64])
    got32 = kernel_matrix(p_in, q_out, coeffs, norm_p=norm_p, mix=mix)
    torch.testing.assert_close(got32.double(), _brute_kernel(p_in, q_out, coeffs, norm_p, mix), **TOL[torch.float32])
    if mix is None:
        torch.testing.assert_close(
            _broadcast_kernel(p_in, q_out, coeffs, norm_p),
            _brute_kernel(p_in, q_out, coeffs, norm_p),
            **TOL[torch.float64],
        )


def test_keep_mask_hand_example_and_ties():
    scores = torch.tensor([[0.1, 0.5], [0.3, 0.2]])
    assert keep_mask(scores, 2).tolist() == [[False, True], [True, False]]
    assert keep_mask(scores, 4).all() and not keep_mask(scores, 0).any()
    ties = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    assert keep_mask(ties, 2).tolist() == [False, True, True, False, False]  # ties: lowest flat index first
    assert keep_mask(torch.zeros(7), 3).sum() == 3


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 128), (33, 65)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.29, 0.3, 0.5, 0.9, 0.999])
def test_sparsify_keeps_exactly_the_configured_fraction(shape, sparsity):
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    numel = delta.numel()
    keep = keep_count(numel, sparsity)
    assert keep == numel - math.floor(round(sparsity * numel, 9))
    out = sparsify(delta, keep)
    assert int((out != 0).sum()) == keep
    order = torch.sort(delta.abs().flatten(), descending=True, stable=True).indices[:keep]
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[order] = True
    assert torch.equal(out.flatten() != 0, expected)  # the largest |delta| survive
    torch.testing.assert_close(out[out != 0], delta[out != 0], rtol=0, atol=0)


def test_keep_mask_beyond_quantile_limit():
    n = 2**24 + 1000  # torch.quantile refuses inputs this large
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0))
    keep = keep_count(n, 0.7)
    assert int(keep_mask(scores, keep).sum()) == keep


def test_reference_square_semantics_and_gradient_only_into_kept_entries():
    delta = torch.tensor([[0.5, -2.0], [1.0, -0.1]], requires_grad=True)
    out = sparsify(delta, 2, reference_square=True)
    torch.testing.assert_close(out.detach(), torch.tensor([[0.0, -4.0], [1.0, 0.0]]))  # K * |K| on the kept entries
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    (sparsify(delta, 2) * g).sum().backward()
    torch.testing.assert_close(delta.grad, torch.tensor([[0.0, 2.0], [3.0, 0.0]]))


# ---------------------------------------------------------------------------------------------
# the layer: orientation, exact fraction per layer, checkpointing


def test_layer_output_and_orientation_match_a_brute_force_delta():
    pm = _snell(r=4, sparsity=0.4)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    for layer in _layers(pm):
        spec = layer.snell_spec["default"]
        p_in, q_out = layer.snell_P["default"].detach(), layer.snell_Q["default"].detach()
        k = _broadcast_kernel(p_in, q_out, head_coefficients(2, spec["coeff"]), 2.0)  # (n, m)
        mask = keep_mask(k.abs(), keep_count(k.numel(), 0.4))
        k_sparse = (k * mask).float()
        assert int((layer.sparse_delta("default") != 0).sum()) == layer.keep("default") == keep_count(k.numel(), 0.4)
        dw = layer.delta_weight("default")
        assert dw.shape == layer.get_base_layer().weight.shape  # (d_out, d_in): transposed kernel
        torch.testing.assert_close(dw, k_sparse.T, **TOL[torch.float32])
        xin = x[:, : layer.in_features]
        layer.eval()
        with torch.no_grad():
            got = layer(xin)
        want = xin @ (layer.get_base_layer().weight + k_sparse.T).T
        torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_checkpointed_branch_gives_the_same_gradients():
    grads = []
    for ckpt in (True, False):
        pm = _snell(r=4, sparsity=0.5, checkpoint_kernel=ckpt)
        x = batch()
        pm.train()
        pm(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **TOL[torch.float32])


def test_set_sparsity_and_roundtrip_of_per_layer_budgets(tmp_path):
    from peft import PeftModel

    pm = _snell(r=4, sparsity=0.2)
    keys = list(pm.keep_counts())
    pm.set_sparsity_({keys[0]: 0.9, keys[1]: 0.0})
    counts = pm.keep_counts()
    assert counts[keys[0]] == keep_count(64 * 64, 0.9) and counts[keys[1]] == 64 * 32
    assert int((_layers(pm)[0].sparse_delta("default") != 0).sum()) == counts[keys[0]]
    x = batch()
    want = logits(pm, x)
    pm.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "a"))
    assert loaded.keep_counts() == counts
    torch.testing.assert_close(logits(loaded, x), want, rtol=0, atol=0)


def test_merge_unmerge_exact_and_sparse_export():
    pm = _snell(r=4, sparsity=0.6)
    x = batch()
    train_step(pm, x)
    after = logits(pm, x)
    before = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}
    exported = pm.sparse_deltas()
    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, x), after, **TOL[torch.float32])
    for layer in _layers(pm):
        key = layer.key
        values, idx, shape = exported[key]
        assert idx.numel() == layer.keep("default")
        dense = torch.zeros(shape).view(-1).index_put_((idx,), values).view(shape)
        torch.testing.assert_close(dense, layer.delta_weight("default"), rtol=0, atol=0)
    pm.base_model.unmerge_adapter()
    for n, p in pm.get_base_model().named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n])  # bit-exact restore
    torch.testing.assert_close(logits(pm, x), after, rtol=0, atol=0)


def test_int8_base_merge_restores_codes_exactly():
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model

    from adapterlab.quant import quantize_model

    torch.manual_seed(0)
    pm = get_peft_model(quantize_model(tiny_llama(), 8), SnellConfig(r=4, sparsity=0.5, target_modules=TARGETS))
    x = batch()
    after = logits(pm, x)
    layer = _layers(pm)[0]
    codes = layer.get_base_layer().weight.data.clone()
    pm.base_model.merge_adapter()
    merged = logits(pm, x)
    assert ((merged - after).norm() / after.norm()).item() < 0.05  # int8 requantization only
    pm.base_model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight.data, codes)
    torch.testing.assert_close(logits(pm, x), after, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# dtypes: fp32 adapter parameters on any base, one rounding on merge, bit-exact unmerge

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _snell_on(dtype, seed=0, **kw):
    from peft import get_peft_model

    kw.setdefault("target_modules", TARGETS)
    model = tiny_llama(dtype=dtype)
    torch.manual_seed(seed)
    return get_peft_model(model, SnellConfig(**kw))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_base_keeps_fp32_adapter_parameters_unrounded(dtype):
    full = {n: p for n, p in _snell_on(torch.float32, r=4, zero_init_offset=True).named_parameters() if "snell_" in n}
    pm = _snell_on(dtype, r=4, zero_init_offset=True)
    half = {n: p for n, p in pm.named_parameters() if "snell_" in n}
    assert half.keys() == full.keys() and half
    for n, p in half.items():
        assert p.dtype == torch.float32 and torch.equal(p, full[n]), n  # not rounded through the base dtype
    for n, b in pm.named_buffers():
        if "snell_P0" in n or "snell_Q0" in n:
            assert b.dtype == torch.float32
    x = batch()
    pm.train()
    pm(x, labels=x).loss.backward()  # mixed dtypes in a layer: no error
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in half.values())


def _dyadic_factors_(layer, g):
    """P, Q with only coordinate 0 non-zero, on a 1/16 grid: every distance |x - y| and the kernel
    0.25 * (D0 - D1) are exact in fp32, so any correct implementation gives the same bits."""
    with torch.no_grad():
        for param in (layer.snell_P["default"], layer.snell_Q["default"]):
            param.zero_()
            param[:, :, 0] = torch.randint(0, 512, param.shape[:2], generator=g).float() / 16


def _oracle_delta(layer, sparsity):
    """scale * (K masked to the keep largest |K|, ties by flat position).T, from the kernel formula."""
    x = layer.snell_P["default"].detach().double()[:, :, 0]  # (H, n)
    y = layer.snell_Q["default"].detach().double()[:, :, 0]  # (H, m)
    dist = (x[:, :, None] - y[:, None, :]).abs()  # (H, n, m) Euclidean distance of 1-D points
    k = 0.25 * dist[0] - 0.25 * dist[1]  # (n, m), coefficients (+c, -c)
    keep = k.numel() - math.floor(sparsity * k.numel() + 1e-6)
    order = sorted(range(k.numel()), key=lambda i: (-abs(float(k.flatten()[i])), i))[:keep]
    kept = torch.zeros(k.numel(), dtype=torch.bool)
    kept[order] = True
    return (k.flatten() * kept).view_as(k).T.float()  # (m, n), exact in fp32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_on_each_dtype_rounds_once_and_unmerge_restores_bits(dtype):
    pm = _snell_on(dtype, r=4, coeff=0.25, sparsity=0.4)
    g = torch.Generator().manual_seed(4)
    for layer in _layers(pm):
        _dyadic_factors_(layer, g)
    w0 = {layer.key: layer.get_base_layer().weight.detach().clone() for layer in _layers(pm)}
    x = batch()
    unmerged = logits(pm, x)
    pm.base_model.merge_adapter()
    for layer in _layers(pm):
        expected = (w0[layer.key].float() + _oracle_delta(layer, 0.4)).to(dtype)
        assert torch.equal(layer.get_base_layer().weight.detach(), expected), layer.key
    torch.testing.assert_close(logits(pm, x), unmerged, **TOL[dtype])
    pm.base_model.unmerge_adapter()
    for layer in _layers(pm):
        assert torch.equal(layer.get_base_layer().weight.detach(), w0[layer.key])
    assert torch.equal(logits(pm, x), unmerged)


# ---------------------------------------------------------------------------------------------
# zero_init_offset: the step-0 competition (every |K - K0| is 0) is not decided by position


def _first_flat(shape, keep):
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[:keep] = True
    return flat.view(shape)


def _oracle_selection(delta, k0, keep):
    """Brute force of the rule: largest |K - K0|, then largest |K0|, then lowest flat position."""
    d, t = delta.flatten().abs().tolist(), k0.flatten().abs().tolist()
    order = sorted(range(len(d)), key=lambda i: (-d[i], -t[i], i))[:keep]
    mask = torch.zeros(len(d), dtype=torch.bool)
    mask[order] = True
    return mask.view_as(delta)


def _kernels(layer):
    spec = layer.snell_spec["default"]
    coeffs = head_coefficients(spec["heads"], spec["coeff"])
    k = kernel_matrix(layer.snell_P["default"].detach(), layer.snell_Q["default"].detach(), coeffs)
    k0 = kernel_matrix(layer.snell_P0["default"], layer.snell_Q0["default"], coeffs)
    return k, k0


def test_zero_offset_step0_selection_follows_the_initial_kernel_not_position():
    pm = _snell(r=4, sparsity=0.5, zero_init_offset=True)
    for layer in _layers(pm):
        sel = layer.selection("default")
        keep = layer.keep("default")
        k, k0 = _kernels(layer)
        assert torch.equal(k, k0) and int(sel.sum()) == keep
        assert not torch.equal(sel, _first_flat(sel.shape, keep))
        assert torch.equal(sel, _oracle_selection(k - k0, k0, keep))
        assert torch.equal(sel, keep_mask(k0.abs(), keep))  # = what the reference (no offset) keeps at step 0
    again = _snell(r=4, sparsity=0.5, zero_init_offset=True)  # same seed: same decision
    other = _snell(r=4, sparsity=0.5, zero_init_offset=True, target_modules=["q_proj"])
    for a, b in zip(_layers(pm), _layers(again)):
        assert torch.equal(a.selection("default"), b.selection("default"))
    torch.manual_seed(1)
    assert not torch.equal(
        _layers(_snell_on(torch.float32, seed=1, r=4, sparsity=0.5, zero_init_offset=True))[0].selection("default"),
        _layers(other)[0].selection("default"),
    )


def test_zero_offset_after_a_step_selects_by_the_offset_delta():
    pm = _snell(r=4, sparsity=0.5, zero_init_offset=True)
    train_step(pm, batch())
    for layer in _layers(pm):
        k, k0 = _kernels(layer)
        sel = layer.selection("default")
        assert torch.equal(sel, _oracle_selection(k - k0, k0, layer.keep("default")))
        assert torch.equal(sel, layer.sparse_delta("default").detach() != 0)


def test_zero_offset_first_gradient_reaches_every_input_row():
    """Positional step-0 selection kept only the first rows of the (n, m) kernel, so the P rows of the
    later input features got no gradient at all in the first step."""
    pm = _snell(r=4, sparsity=0.5, zero_init_offset=True, target_modules=["q_proj"])
    x = batch()
    pm.train()
    pm(x, labels=x).loss.backward()
    for layer in _layers(pm):
        rows_with_grad = layer.snell_P["default"].grad.abs().sum(dim=(0, 2)) > 0  # (n,)
        assert bool(rows_with_grad.all())


def test_zero_offset_step0_selection_depends_only_on_the_saved_adapter(tmp_path):
    """Reloaded under another RNG state (as in another process), the step-0 decision is the same: it is
    a function of the seeded, saved P0/Q0 only (no unseeded randomness, no salted hash)."""
    from peft import PeftModel

    pm = _snell(r=4, sparsity=0.5, zero_init_offset=True, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path)
    torch.manual_seed(12345)
    loaded = PeftModel.from_pretrained(tiny_llama(seed=7), str(tmp_path))
    here, there = (
        [layer.selection("default") for layer in _layers(pm)],
        [layer.selection("default") for layer in _layers(loaded)],
    )
    assert len(here) == len(there) == 2 and all(torch.equal(a, b) for a, b in zip(here, there))


def test_keep_mask_tie_break_hand_example():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    tie = torch.tensor([9.0, 0.1, 0.3, 0.2, 9.0, 0.3])
    # the 2.0s tie; by tie score 0.3 (pos 2), 0.3 (pos 5), 0.2 (pos 3), 0.1 (pos 1)
    assert keep_mask(scores, 2, tie_break=tie).tolist() == [False, False, True, False, False, True]
    assert keep_mask(scores, 3, tie_break=tie).tolist() == [False, False, True, True, False, True]
    assert keep_mask(scores, 5, tie_break=tie).tolist() == [True, True, True, True, False, True]
    assert keep_mask(scores, 2).tolist() == [False, True, True, False, False, False]  # no tie score: flat order
    out = sparsify(torch.zeros(2, 3), 2, tie_break=tie.view(2, 3))
    assert torch.equal(out, torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# SNELLA schedule and allocation oracles


def test_budget_schedule_hand_values():
    # total 10, V 1000 -> 100: V(t) = 100 + floor(900 (1 - t/10)^3)
    assert [budget_schedule(t, 10, 1000, 100) for t in (0, 1, 5, 9, 10, 12)] == [1000, 100 + 656, 212, 100, 100, 100]
    # warm-ups 2 / 2: span 6
    got = [budget_schedule(t, 10, 1000, 100, init_warmup=2, final_warmup=2) for t in (0, 1, 2, 5, 7, 8, 9)]
    assert got == [1000, 1000, 1000, 212, 100 + math.floor(900 * (1 - 5 / 6) ** 3), 100, 100]


def test_allocate_budget_hand_values():
    # 10 over scores (3, 1, 0): (7 -> capped 4, 2, 0), leftover 4 to the only scored layer with room
    assert allocate_budget(10, torch.tensor([3.0, 1.0, 0.0]), torch.tensor([4, 100, 100])).tolist() == [4, 6, 0]
    # no scores: equal shares 2, 2, 2 and the remainder to the first layer
    assert allocate_budget(7, torch.zeros(3), torch.tensor([5, 5, 5])).tolist() == [3, 2, 2]
    # budget above capacity is clamped; exact sums otherwise
    assert allocate_budget(99, torch.tensor([1.0, 1.0]), torch.tensor([3, 4])).tolist() == [3, 4]
    caps = torch.tensor([4096, 2048, 8192, 4096])
    got = allocate_budget(9001, torch.tensor([0.3, 0.01, 0.2, 0.7]), caps)
    assert int(got.sum()) == 9001 and bool((got <= caps).all())


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=5, heads=2), r"r=5 must be divisible by heads=2"),
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
        (dict(kernel="rbf"), r"kernel='rbf' is not supported; choose one of: snell, snella"),
        (dict(use_rslora=True), r"use_rslora=True needs lora_alpha"),
        (dict(lora_dropout=-0.1), r"lora_dropout must be in \[0, 1\)"),
        (dict(norm_p=0), r"norm_p must be a positive number"),
        (dict(coeff=0.0), r"coeff must be a non-zero number"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnellConfig(**kwargs)


def test_bad_targets_sparsity_and_foreign_shapes(tmp_path):
    from peft import PeftModel

    with pytest.raises(ValueError, match=r"'nope_proj' match no module"):
        _snell(target_modules=["q_proj", "nope_proj"])
    pm = _snell(r=4)
    with pytest.raises(ValueError, match=r"sparsity for .* must be in \[0, 1\], got 1.5"):
        pm.set_sparsity_(1.5)
    with pytest.raises(ValueError, match=r"not SNELL layers"):
        pm.set_sparsity_({"model.layers.0.mlp.up_proj": 0.5})
    pm.save_pretrained(tmp_path / "a")
    other = tiny_llama(hidden_size=128, intermediate_size=256)
    with pytest.raises(ValueError, match=r"shape .* does not match"):
        PeftModel.from_pretrained(other, str(tmp_path / "a"))
