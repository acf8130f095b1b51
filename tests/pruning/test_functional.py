"""Oracle tests for the pure pruning math (hand-made matrices and brute-force references)."""

from __future__ import annotations

import math

import pytest
import torch

from adapterlab.pruning import functional as F
from tests.tolerances import assert_close

# ------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [(None, None), ("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4)), ("4:4", (4, 4))],
)
def test_parse_pattern(pattern: str | None, expected: tuple[int, int] | None) -> None:
    assert F.parse_pattern(pattern) == expected


@pytest.mark.parametrize("pattern", ["5:4", "0:4", "2-4", "a:b", "2:4:8", "2:0", "24"])
def test_parse_pattern_rejects(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"2:4") as info:
        F.parse_pattern(pattern)
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, None, float("nan"), "0.5", True])
def test_resolve_sparsity_rejects(sparsity: object) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        F.resolve_sparsity(sparsity, None)  # type: ignore[arg-type]


def test_resolve_sparsity_nm_is_derived() -> None:
    assert F.resolve_sparsity(None, (2, 4)) == 0.5
    assert F.resolve_sparsity(0.9, (1, 4)) == 0.75
    assert F.resolve_sparsity(0, None) == 0.0


@pytest.mark.parametrize("length", [4, 8, 64, 65, 300])
def test_lowest_k_mask_matches_stable_sort(length: int) -> None:
    """Both code paths (argsort for short groups, kthvalue + tie count for long rows) prune the
    k lowest scores, lower index first among ties."""
    g = torch.Generator().manual_seed(length)
    scores = torch.randint(0, 5, (6, length), generator=g).float()  # many ties
    for k in (0, 1, length // 3, length // 2, length - 1, length):
        mask = F.lowest_k_mask(scores, k)
        for r in range(scores.shape[0]):
            order = sorted(range(length), key=lambda j: float(scores[r, j]))
            expected = torch.zeros(length, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(mask[r], expected), (k, r)


# ------------------------------------------------------------------------------------------
# magnitude
# ------------------------------------------------------------------------------------------


def test_magnitude_hand_made_with_ties() -> None:
    w = torch.tensor([[1.0, -1.0, 2.0, 0.5], [0.5, 3.0, -0.5, 1.0]])
    keep = F.magnitude_mask(w, 0.5)
    # |W| sorted: 0.5 (idx 3), 0.5 (4), 0.5 (6), 1 (0), 1 (1), 1 (7), 2, 3 -> prune the three
    # 0.5s and the first (lowest flat index) of the tied 1s: exactly 4 of 8.
    expected = torch.tensor([[False, True, True, False], [False, True, False, True]])
    assert torch.equal(keep, expected)
    assert int((~keep).sum()) == 4
    assert w.abs()[keep].min() >= w.abs()[~keep].max()


def test_magnitude_all_ties_exact_count() -> None:
    w = torch.full((6, 10), 0.25)  # every score tied: a `<= threshold` rule would prune all
    for s in (0.1, 0.5, 0.7):
        keep = F.magnitude_mask(w, s)
        assert int((~keep).sum()) == int(s * 60)


def test_magnitude_keeps_k_largest_random() -> None:
    g = torch.Generator().manual_seed(0)
    # a 4-bit-like grid: only 8 distinct magnitudes, lots of ties
    w = torch.randint(-4, 5, (32, 48), generator=g).float() * 0.1
    for s in (0.3, 0.5, 0.6):
        keep = F.magnitude_mask(w, s)
        k = int(s * w.numel())
        assert int((~keep).sum()) == k
        assert w.abs()[keep].min() >= w.abs()[~keep].max()


def test_magnitude_row_scope() -> None:
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0], [10.0, 20.0, 30.0, 40.0]])
    keep = F.magnitude_mask(w, 0.5, scope="row")
    assert torch.equal(keep, torch.tensor([[True, True, False, False], [False, False, True, True]]))
    keep_matrix = F.magnitude_mask(w, 0.5, scope="matrix")
    assert torch.equal(keep_matrix, torch.tensor([[False, False, False, False], [True, True, True, True]]))
    with pytest.raises(ValueError, match="matrix, row"):
        F.magnitude_mask(w, 0.5, scope="global")


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4)])
def test_magnitude_nm_keeps_n_largest_per_group(n: int, m: int) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    keep = F.magnitude_mask(w, 0.0, nm=(n, m))
    groups_keep = keep.reshape(16, 32 // m, m)  # (rows, groups, M)
    groups_w = w.abs().reshape(16, 32 // m, m)
    assert bool((groups_keep.sum(-1) == n).all())
    kept_min = groups_w.masked_fill(~groups_keep, math.inf).amin(-1)
    pruned_max = groups_w.masked_fill(groups_keep, -math.inf).amax(-1)
    assert bool((kept_min >= pruned_max).all())
    assert F.check_nm(w * keep, n, m)


def test_check_nm() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert F.check_nm(w, 2, 4)
    assert not F.check_nm(w, 1, 4)
    assert not F.check_nm(torch.ones(2, 6), 2, 4)  # d_in % M != 0
    assert not F.check_nm(torch.ones(2, 8), 2, 4)
    with pytest.raises(ValueError, match="d_in % M"):
        F.nm_keep_mask(torch.ones(2, 6), 2, 4)


# ------------------------------------------------------------------------------------------
# Wanda
# ------------------------------------------------------------------------------------------


def _wanda_brute_force(w: torch.Tensor, sq_norm: torch.Tensor, s: float, nm: tuple[int, int] | None) -> torch.Tensor:
    rows, cols = w.shape
    keep = [[True] * cols for _ in range(rows)]
    for i in range(rows):
        score = [abs(float(w[i, j])) * math.sqrt(float(sq_norm[j])) for j in range(cols)]
        if nm is None:
            order = sorted(range(cols), key=lambda j: score[j])  # stable
            for j in order[: int(s * cols)]:
                keep[i][j] = False
        else:
            n, m = nm
            for g0 in range(0, cols, m):
                order = sorted(range(g0, g0 + m), key=lambda j: score[j])
                for j in order[: m - n]:
                    keep[i][j] = False
    return torch.tensor(keep)


@pytest.mark.parametrize(("s", "nm"), [(0.5, None), (0.3, None), (0.75, None), (0.0, (2, 4)), (0.0, (4, 8))])
def test_wanda_matches_brute_force(s: float, nm: tuple[int, int] | None) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-3, 4, (12, 16), generator=g).float()  # ties inside rows
    sq_norm = torch.randint(1, 5, (16,), generator=g).float()
    keep = F.wanda_mask(w, sq_norm, s, nm=nm)
    assert torch.equal(keep, _wanda_brute_force(w, sq_norm, s, nm))


def test_wanda_differs_from_magnitude_through_activations() -> None:
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 0.01])
    keep = F.wanda_mask(w, sq_norm, 0.5)
    # scores: 10, 2, 3, 0.4 -> prune columns 3 and 1
    assert torch.equal(keep, torch.tensor([[True, False, True, False]]))


def test_accumulate_sq_norm_is_reference_running_mean() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(b, 5, 8, generator=g) for b in (2, 3, 1)]
    scaler, n = torch.zeros(8), 0
    for x in batches:
        scaler, n = F.accumulate_sq_norm(scaler, n, x)
    everything = torch.cat(batches)  # (6, 5, 8)
    expected = everything.reshape(-1, 8).pow(2).sum(0) / everything.shape[0]
    assert n == 6
    assert_close(scaler, expected)


def test_accumulate_hessian_is_running_mean() -> None:
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(b, 7, 6, generator=g) for b in (1, 4)]
    h, n = torch.zeros(6, 6), 0
    for x in batches:
        h, n = F.accumulate_hessian(h, n, x)
    x = torch.cat(batches).reshape(-1, 6).double()  # (tokens, d_in)
    expected = 2.0 / 5 * x.t() @ x
    assert_close(h.double(), expected, torch.float32)


# ------------------------------------------------------------------------------------------
# SparseGPT
# ------------------------------------------------------------------------------------------


def _correlated_layer(d_out: int = 32, d_in: int = 256, tokens: int = 1024, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in)
    x = torch.randn(tokens, d_in, generator=g) @ (torch.eye(d_in) + 2 * mix)  # correlated features
    x = x * (0.2 + 2.8 * torch.rand(d_in, generator=g))  # uneven feature scales
    w = torch.randn(d_out, d_in, generator=g)
    h, _ = F.accumulate_hessian(torch.zeros(d_in, d_in), 0, x.unsqueeze(0))
    return w, x, h


def _err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ (w - w_hat).t()))


@pytest.mark.parametrize(("s", "nm"), [(0.5, None), (0.7, None), (0.0, (2, 4)), (0.0, (4, 8))])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(s: float, nm: tuple[int, int] | None) -> None:
    w, x, h = _correlated_layer()
    sq_norm, _ = F.accumulate_sq_norm(torch.zeros(w.shape[1]), 0, x.unsqueeze(0))
    target = F.resolve_sparsity(s, nm)
    w_sgpt, loss = F.sparsegpt_prune(w, h, s, nm=nm)  # 2 column blocks of 128
    w_mag = w * F.magnitude_mask(w, s, nm=nm)
    w_wanda = w * F.wanda_mask(w, sq_norm, s, nm=nm)
    d_out, d_in = w.shape
    assert int((w_sgpt == 0).sum()) == int(target * w.numel())  # exact per matrix
    assert int((w_mag == 0).sum()) == int(target * w.numel())  # exact per matrix
    assert int((w_wanda == 0).sum()) == d_out * int(target * d_in)  # exact per row
    if nm is not None:
        assert F.check_nm(w_sgpt, *nm)
        assert bool(((w_sgpt != 0).reshape(d_out, -1, nm[1]).sum(-1) == nm[0]).all())
    e_sgpt, e_mag, e_wanda = _err(w, w_sgpt, x), _err(w, w_mag, x), _err(w, w_wanda, x)
    assert e_sgpt < e_wanda < e_mag
    assert loss.shape == (d_out,) and bool((loss >= 0).all())


def test_sparsegpt_zero_sparsity_leaves_weight_unchanged() -> None:
    w, _, h = _correlated_layer(seed=6)
    w_new, loss = F.sparsegpt_prune(w, h, 0.0)
    assert_close(w_new, w)
    assert float(loss.sum()) == 0.0


def test_sparsegpt_exact_obs_update_for_first_column() -> None:
    """One pruned weight per row, all in column 0: the result is the exact OBS / least-squares
    reconstruction ``W_rest + w_0 H_0r H_rr^-1`` under the damped Hessian."""
    w, _, h = _correlated_layer(d_out=8, d_in=12, tokens=256, seed=7)
    w[:, 0] = 1e-4  # column 0 has the smallest w^2 / Hinv_jj^2 in every row
    s = 1.0 / 12  # floor(s * 8 * 12) = 8 = one weight per row
    w_new, _ = F.sparsegpt_prune(w, h, s, blocksize=128, percdamp=0.01)
    assert bool((w_new[:, 0] == 0).all()) and int((w_new == 0).sum()) == 8
    hd = h.double() + 0.01 * torch.diag(h).mean().double() * torch.eye(12, dtype=torch.float64)
    wd = w.double()
    expected_rest = wd[:, 1:] + wd[:, :1] @ hd[:1, 1:] @ torch.linalg.inv(hd[1:, 1:])  # (8, 11)
    torch.testing.assert_close(w_new[:, 1:].double(), expected_rest, atol=1e-4, rtol=1e-4)


def test_sparsegpt_dead_inputs() -> None:
    w, x, _ = _correlated_layer(d_out=8, d_in=16, tokens=128, seed=8)
    x[:, 3] = 0.0  # a dead input feature
    h, _ = F.accumulate_hessian(torch.zeros(16, 16), 0, x.unsqueeze(0))
    w_new, _ = F.sparsegpt_prune(w, h, 0.25)
    assert bool((w_new[:, 3] == 0).all())
    assert torch.isfinite(w_new).all()
    assert int((w_new == 0).sum()) == int(0.25 * w.numel())


def test_sparsegpt_lazy_blocks_do_not_change_nm_result() -> None:
    """With a pattern whose masks do not depend on the block layout (N:M), lazy batch updates are
    an exact re-ordering of the column-by-column OBS updates."""
    w, _, h = _correlated_layer(d_out=16, d_in=64, seed=10)
    a, _ = F.sparsegpt_prune(w, h, 0.0, nm=(2, 4), blocksize=8)
    b, _ = F.sparsegpt_prune(w, h, 0.0, nm=(2, 4), blocksize=128)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.equal(a == 0, b == 0)


def test_sparsegpt_nm_blocksize_not_multiple_of_m() -> None:
    w, _, h = _correlated_layer(d_out=8, d_in=24, seed=9)
    w_new, _ = F.sparsegpt_prune(w, h, 0.0, nm=(4, 8), blocksize=10)  # rounded down to 8
    assert bool(((w_new != 0).reshape(8, 3, 8).sum(-1) == 4).all())
    with pytest.raises(ValueError, match="d_in % M"):
        F.sparsegpt_prune(w, h, 0.0, nm=(2, 5))


def _indefinite_hessian(d: int) -> torch.Tensor:
    """Block-diagonal copies of [[1, 3], [3, 1]]: mean(diag) = 1, eigenvalues 4 and -2. Damping
    0.01 * 10^a for a = 0, 1, 2 leaves the eigenvalue -2 + damp <= -1 (not positive definite);
    a = 3 (damp 10) gives eigenvalues 14 and 8."""
    return torch.block_diag(*[torch.tensor([[1.0, 3.0], [3.0, 1.0]])] * (d // 2))


def test_sparsegpt_records_the_dampening_it_used() -> None:
    w, _, h = _correlated_layer(d_out=8, d_in=16, tokens=128, seed=11)
    out = F.sparsegpt_solve(w, h, 0.25)  # positive definite: no retry
    assert out.retries == 0 and out.damping == 0.01 * float(torch.diag(h).mean())
    w_new, loss = F.sparsegpt_prune(w, h, 0.25)
    assert torch.equal(w_new, out.weight) and torch.equal(loss, out.loss)
    bad = _indefinite_hessian(16)
    out = F.sparsegpt_solve(w, bad, 0.25, percdamp=0.01)
    assert out.retries == 3
    assert out.damping == pytest.approx(0.01 * 1.0 * 10**3, rel=1e-12)  # percdamp * mean(diag H) * 10^attempt
    assert torch.isfinite(out.weight).all() and int((out.weight == 0).sum()) == int(0.25 * w.numel())


def test_sparsegpt_hessian_that_no_dampening_fixes_is_refused() -> None:
    w = torch.ones(4, 4)
    h = torch.full((4, 4), float("nan"))
    with pytest.raises(RuntimeError, match=r"not positive definite after 6 dampenings up to"):
        F.sparsegpt_solve(w, h, 0.5)
