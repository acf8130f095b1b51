"""Oracles for the factor-form math of shared-basis compression (dense brute force on tiny sizes)."""

from __future__ import annotations

import pytest
import torch

from adapterlab.compression import functional as F
from tests.tolerances import TOL, assert_close


def _factors(n: int = 3, d_out: int = 12, d_in: int = 10, r: int = 2, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_out, r, generator=g, dtype=dtype), torch.randn(n, r, d_in, generator=g, dtype=dtype)


def _dense_rel(U, V, cores, B, A) -> torch.Tensor:
    S = torch.diag_embed(cores) if cores.dim() == 2 else cores
    D = B @ A
    return (D - U @ S @ V).pow(2).sum((1, 2)) / D.pow(2).sum((1, 2))


def _non_increasing(h: list[float], rel: float = 1e-9, scale: float | None = None) -> bool:
    scale = max(h[0] if scale is None else scale, 1e-30)  # round-off is relative to ‖ΔW‖², not the residual
    return all(b <= a + rel * scale for a, b in zip(h, h[1:]))


def test_delta_sqnorm_is_the_dense_frobenius_norm() -> None:
    B, A = _factors()
    assert_close(F.delta_sqnorm(B, A), (B @ A).pow(2).sum((1, 2)))


@pytest.mark.parametrize("how", F.NORMALIZATIONS)
def test_normalization_keeps_the_product_up_to_the_stored_scale(how: str) -> None:
    B, A = _factors()
    Bn, An, scale = F.normalize_factors(B, A, how)
    assert_close(scale[:, None, None] * (Bn @ An), B @ A)
    if how == "normalize_BA":
        assert_close(F.delta_sqnorm(Bn, An), torch.ones(3, dtype=torch.float64))


def test_hand_computed_two_orthogonal_adapters_rank_one() -> None:
    # ΔW_1 = 3 e1 e1ᵀ, ΔW_2 = 1 e2 e2ᵀ; c = 1 without normalisation keeps the stronger one exactly
    B = torch.zeros(2, 4, 1, dtype=torch.float64)
    A = torch.zeros(2, 1, 5, dtype=torch.float64)
    B[0, 0, 0], A[0, 0, 0] = 3.0, 1.0
    B[1, 1, 0], A[1, 0, 1] = 1.0, 1.0
    U, V, _ = F.fit_full(B, A, 1)
    cores = F.project_full(U, V, B, A)
    assert_close(cores.abs().flatten(), torch.tensor([3.0, 0.0], dtype=torch.float64))
    assert_close(F.relative_errors(U, V, cores, B, A), torch.tensor([0.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("solver", ["eigh", "ritz"])
@pytest.mark.parametrize("init", ["spectral", "random"])
def test_full_is_exact_at_c_equal_n_r(init: str, solver: str) -> None:
    B, A = _factors()
    U, V, hist = F.fit_full(B, A, 6, init=init, solver=solver, generator=torch.Generator().manual_seed(1))
    cores = F.project_full(U, V, B, A)
    assert_close(U @ cores @ V, B @ A)
    assert float(F.relative_errors(U, V, cores, B, A).max()) < 1e-12
    assert_close(U.T @ U, torch.eye(6, dtype=torch.float64))  # orthonormal bases
    assert_close(V @ V.T, torch.eye(6, dtype=torch.float64))


def test_adapters_inside_a_shared_subspace_are_exact_at_its_dimension() -> None:
    g = torch.Generator().manual_seed(3)
    U0, _ = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(20, 4, generator=g, dtype=torch.float64))
    S = torch.randn(8, 4, 2, generator=g, dtype=torch.float64)
    T = torch.randn(8, 2, 4, generator=g, dtype=torch.float64)
    B, A = U0 @ S, T @ V0.T  # 8 rank-2 adapters whose deltas live in span(U0) x span(V0): n r = 16 > 4
    U, V, _ = F.fit_full(B, A, 4)
    cores = F.project_full(U, V, B, A)
    assert float(F.relative_errors(U, V, cores, B, A).max()) < 1e-12
    assert_close(U @ cores @ V, B @ A)
    # diagonal mode: deltas U0 diag(s_i) V0ᵀ share one joint diagonalisation of size 4
    sig = torch.rand(8, 4, generator=g, dtype=torch.float64) + 0.5
    Bd, Ad = U0 * sig[:, None, :], V0.T.expand(8, 4, 20)
    Ud, Vd, sd, _ = F.fit_diagonal(Bd, Ad, 4, niter=200, ridge=0.0)
    assert float(F.relative_errors(Ud, Vd, sd, Bd, Ad).max()) < 1e-8


@pytest.mark.parametrize("solver", ["eigh", "ritz"])
def test_full_error_non_increasing_in_c_and_objective_monotone(solver: str) -> None:
    B, A = _factors(n=4, d_out=16, d_in=14, r=3, seed=5)
    prev = torch.full((4,), float("inf"), dtype=torch.float64)
    total_prev = float("inf")
    for c in range(1, 13):
        U, V, hist = F.fit_full(B, A, c, solver=solver, niter=30)
        assert _non_increasing(hist, scale=float(F.delta_sqnorm(B, A).sum()))
        cores = F.project_full(U, V, B, A)
        err = F.relative_errors(U, V, cores, B, A)
        total = float((err * F.delta_sqnorm(B, A)).sum())  # the joint objective the fit minimises
        assert total <= total_prev * (1 + 1e-9) + 1e-12
        total_prev = total
        prev = err
    assert float(prev.max()) < 1e-12  # c = n r = 12


def test_factor_form_errors_equal_dense_errors_for_any_bases() -> None:
    B, A = _factors()
    g = torch.Generator().manual_seed(9)
    U = torch.randn(12, 3, generator=g, dtype=torch.float64)
    V = torch.randn(3, 10, generator=g, dtype=torch.float64)
    full = torch.randn(3, 3, 3, generator=g, dtype=torch.float64)
    diag = torch.randn(3, 3, generator=g, dtype=torch.float64)
    assert_close(F.relative_errors(U, V, full, B, A), _dense_rel(U, V, full, B, A))
    assert_close(F.relative_errors(U, V, diag, B, A), _dense_rel(U, V, diag, B, A))


def test_projections_equal_brute_force_least_squares() -> None:
    B, A = _factors()
    g = torch.Generator().manual_seed(2)
    U = torch.randn(12, 3, generator=g, dtype=torch.float64)
    V = torch.randn(3, 10, generator=g, dtype=torch.float64)
    # diagonal: vec(U diag(s) V) = M s with column k = vec(u_k v_k); solve min ‖M s − vec ΔW_i‖ densely
    M = torch.stack([torch.outer(U[:, k], V[k]).flatten() for k in range(3)], 1)
    want = torch.linalg.lstsq(M, (B @ A).flatten(1).T).solution.T  # [n, c]
    assert_close(F.project_diagonal(U, V, B, A, ridge=0.0), want)
    # full with orthonormal bases: the least-squares core is Uᵀ ΔW Vᵀ
    Uo, _ = torch.linalg.qr(U)
    Vo = torch.linalg.qr(V.T)[0].T
    Mf = torch.kron(Uo, Vo.T)  # vec_row(U S V) = (U ⊗ Vᵀ) vec_row(S)
    want_f = torch.linalg.lstsq(Mf, (B @ A).flatten(1).T).solution.T.reshape(3, 3, 3)
    assert_close(F.project_full(Uo, Vo, B, A), want_f)


@pytest.mark.parametrize("init", ["spectral", "random"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_diagonal_objective_never_increases(init: str, dtype: torch.dtype) -> None:
    B, A = _factors(n=5, d_out=14, d_in=12, r=2, seed=11, dtype=dtype)
    _, _, _, hist = F.fit_diagonal(B, A, 4, niter=40, init=init, generator=torch.Generator().manual_seed(0))
    assert len(hist) == 3 * 40 + 1
    rel = 1e-9 if dtype == torch.float64 else 1e-4  # ridge 1e-6·tr/c and fp32 round-off
    assert _non_increasing(hist, rel)
    assert hist[-1] < hist[0]


def test_diagonal_block_init_is_exact_at_c_equal_n_r() -> None:
    B, A = _factors()
    U, V, sigma, hist = F.fit_diagonal(B, A, 6, niter=3, init="block")
    assert float(F.relative_errors(U, V, sigma, B, A).max()) < 1e-9
    assert_close(U @ torch.diag_embed(sigma) @ V, B @ A, dtype=torch.float32)
    with pytest.raises(ValueError, match="init='block' needs rank >= the total rank"):
        F.fit_diagonal(B, A, 5, init="block")


def test_diagonal_error_matches_dense_and_bases_reproduce_sigma() -> None:
    B, A = _factors(seed=4)
    U, V, sigma, _ = F.fit_diagonal(B, A, 3, niter=20)
    assert_close(F.relative_errors(U, V, sigma, B, A), _dense_rel(U, V, sigma, B, A))
    # σ is the least-squares optimum for the final bases (re-projecting gives the same cores)
    torch.testing.assert_close(F.project_diagonal(U, V, B, A), sigma, **TOL[torch.float32])


def test_reduction_and_completion() -> None:
    B, A = _factors(n=2, d_out=20, d_in=18, r=3)
    qb, bt, qa, at = F.reduce_factors(B, A)
    assert qb is not None and qa is not None
    assert_close(qb @ bt, B)
    assert_close(at @ qa.T, A)
    q = F.complete_basis(qb, 9)
    assert_close(q.T @ q, torch.eye(9, dtype=torch.float64))
    assert_close(q[:, :6], qb)


def test_kmeans_separates_two_obvious_groups() -> None:
    x = torch.tensor([[1.0, 0.01], [0.99, 0.0], [0.0, 1.0], [0.02, 1.0]], dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True)
    labels = F.kmeans_cosine(x, 2, generator=torch.Generator().manual_seed(0))
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


def test_ritz_steps_reach_the_exact_steps_objective() -> None:
    B, A = _factors(n=6, d_out=40, d_in=36, r=3, seed=8)
    _, _, exact = F.fit_full(B, A, 4, solver="eigh", niter=20)
    _, _, ritz = F.fit_full(B, A, 4, solver="ritz", niter=20, generator=torch.Generator().manual_seed(0))
    assert _non_increasing(ritz, scale=float(F.delta_sqnorm(B, A).sum()))
    assert abs(ritz[-1] - exact[-1]) <= 2e-2 * exact[-1]  # both are local optima of a non-convex problem
