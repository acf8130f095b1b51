"""Pure tensor math of shared-basis compression, always in factor form.

Conventions: n adapters of one module are stacked as ``B [n, d_out, r]`` and ``A [n, r, d_in]``
(weight layout, LoRA scale folded into B, ranks zero-padded to the largest), so that adapter i's
delta is ``ΔW_i = B[i] @ A[i]``. A shared basis is ``U [d_out, c]`` and ``V [c, d_in]`` (V holds
the *rows* of the input basis, i.e. ``Vᵀ`` of the method file); the per-adapter core is
``S_i [c, c]`` (full) or the diagonal ``σ_i [c]`` and ``ΔW_i ≈ U S_i V``. No function here builds a
``d_out × d_in`` matrix per adapter: every quantity goes through ``Uᵀ B_i`` ([c, r]), ``A_i V ᵀ``
([r, c]) and r×r / c×c Gram matrices, e.g. ``‖B A‖_F² = tr((BᵀB)(AAᵀ))``.

Reference:
    Brüel-Gabrielsson et al. 2024, "Compress then Serve: Serving Thousands of LoRA Adapters with
    Little Overhead", https://arxiv.org/abs/2407.00066
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "INITS",
    "SOLVERS",
    "NORMALIZATIONS",
    "complete_basis",
    "delta_sqnorm",
    "diagonal_gram",
    "fit_diagonal",
    "fit_full",
    "normalize_factors",
    "project_diagonal",
    "project_full",
    "reduce_factors",
    "relative_errors",
    "sketch_features",
    "spd_solve",
]

NORMALIZATIONS = ("none", "normalize", "normalize_BA")
INITS = ("spectral", "random", "block")


# ---------------------------------------------------------------------------------------------
# norms, normalisation, reduction


def delta_sqnorm(B: Tensor, A: Tensor) -> Tensor:
    """``‖B_i A_i‖_F²`` per adapter without forming the product: ``tr((B_iᵀB_i)(A_iA_iᵀ))``.

    Args:
        B: ``[n, d_out, r]``; A: ``[n, r, d_in]``.

    Returns:
        ``[n]`` (dtype of the inputs), clamped at 0.
    """
    btb = B.transpose(1, 2) @ B  # [n, r, d_out] @ [n, d_out, r] -> [n, r, r]
    aat = A @ A.transpose(1, 2)  # [n, r, d_in] @ [n, d_in, r] -> [n, r, r]
    return (btb * aat).sum((1, 2)).clamp_min(0)  # both symmetric: tr(XY) = Σ X⊙Y


def normalize_factors(B: Tensor, A: Tensor, how: str) -> tuple[Tensor, Tensor, Tensor]:
    """Input normalisation of the method file §2.3; returns ``(B', A', scale [n])``.

    ``B_i A_i = scale_i · B'_i A'_i``. ``normalize_BA`` divides both factors by ``sqrt(‖B_i A_i‖_F)``
    (every delta gets unit norm), ``normalize`` scales B_i and A_i to unit Frobenius norm each, ``none``
    keeps them (scale 1). All-zero adapters keep scale 1.
    """
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalization={how!r}: choose one of {', '.join(NORMALIZATIONS)}")
    n = B.shape[0]
    if how == "none":
        return B, A, torch.ones(n, dtype=B.dtype, device=B.device)
    if how == "normalize_BA":
        scale = delta_sqnorm(B, A).sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        root = scale.sqrt()[:, None, None]  # [n, 1, 1]
        return B / root, A / root, scale
    nb = B.flatten(1).norm(dim=1)
    na = A.flatten(1).norm(dim=1)
    nb = torch.where(nb > 0, nb, torch.ones_like(nb))
    na = torch.where(na > 0, na, torch.ones_like(na))
    return B / nb[:, None, None], A / na[:, None, None], nb * na


def reduce_factors(B: Tensor, A: Tensor) -> tuple[Tensor | None, Tensor, Tensor | None, Tensor]:
    """Move the problem into the joint column / row spaces of the adapters.

    ``[B_1 … B_n] = QB · [B̃_1 … B̃_n]`` and ``[A_1ᵀ … A_nᵀ] = QA · [Ã_1ᵀ … Ã_nᵀ]`` with orthonormal
    ``QB [d_out, m1]``, ``QA [d_in, m2]`` (m = min(d, n·r)); every shared basis worth having lies in
    these spaces, so the fit runs on ``B̃ [n, m1, r]`` and ``Ã [n, r, m2]``. When ``n·r >= d`` the
    reduction saves nothing and the identity is used (returned as ``None``).
    """
    n, d_out, r = B.shape
    d_in = A.shape[2]
    if n * r < d_out:
        qb, rb = torch.linalg.qr(B.permute(1, 0, 2).reshape(d_out, n * r))  # [d_out, nr] -> [d_out, nr], [nr, nr]
        bt = rb.reshape(n * r, n, r).permute(1, 0, 2)  # [nr, n, r] -> [n, nr, r]
    else:
        qb, bt = None, B
    if n * r < d_in:
        qa, ra = torch.linalg.qr(A.permute(2, 0, 1).reshape(d_in, n * r))  # [d_in, nr]
        at = ra.reshape(n * r, n, r).permute(1, 2, 0)  # [nr, n, r] -> [n, r, nr]
    else:
        qa, at = None, A
    return qb, bt.contiguous(), qa, at.contiguous()


def complete_basis(q: Tensor, c: int, generator: torch.Generator | None = None) -> Tensor:
    """Extend the orthonormal columns of ``q [d, k]`` to ``c`` orthonormal columns (k <= c <= d)."""
    d, k = q.shape
    if k >= c:
        return q[:, :c]
    extra = torch.randn(d, c - k, generator=generator, dtype=torch.float64).to(q)
    extra = extra - q @ (q.T @ extra)  # remove the span of q (twice, for fp32 accuracy)
    extra = extra - q @ (q.T @ extra)
    qe, _ = torch.linalg.qr(extra)
    return torch.cat([q, qe], dim=1)  # [d, k] + [d, c-k] -> [d, c]


def spd_solve(M: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """Solve ``(M + λI) X = rhs`` for a symmetric PSD ``M [c, c]`` with ``λ = ridge · tr(M) / c``.

    Runs in float64 (c×c, cheap) with an LU solve (LAPACK's Cholesky is slow under thread contention
    for tiny c) and falls back to least squares when the matrix is singular.
    """
    c = M.shape[0]
    m = M.double()
    lam = ridge * float(torch.diagonal(m).sum()) / c
    m = m + max(lam, 1e-300) * torch.eye(c, dtype=m.dtype, device=m.device)
    try:
        x = torch.linalg.solve(m, rhs.double())
    except RuntimeError:  # exactly singular (ridge = 0 and a rank-deficient Gram)
        x = torch.linalg.lstsq(m, rhs.double()).solution
    return x.to(rhs.dtype)


def _top_eigvecs(S: Tensor, k: int) -> Tensor:
    """The ``k`` leading eigenvectors of a symmetric ``S [m, m]`` (float64 eigh)."""
    s = S.double()
    _, vecs = torch.linalg.eigh((s + s.T) / 2)  # ascending
    return vecs[:, -k:].flip(1).to(S.dtype)  # [m, k]


# ---------------------------------------------------------------------------------------------
# projection and errors


def project_full(U: Tensor, V: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Optimal full cores for orthonormal bases: ``S_i = Uᵀ B_i A_i Vᵀ`` → ``[n, c, c]``."""
    P = U.T @ B  # [c, d_out] @ [n, d_out, r] -> [n, c, r]
    Q = A @ V.T  # [n, r, d_in] @ [d_in, c] -> [n, r, c]
    return P @ Q  # [n, c, c]


def diagonal_gram(U: Tensor, V: Tensor) -> Tensor:
    """``(UᵀU) ⊙ (V Vᵀ)`` ([c, c]): the normal-equation matrix of the diagonal cores."""
    return (U.T @ U) * (V @ V.T)


def _diag_rhs(P: Tensor, Q: Tensor) -> Tensor:
    """``rhs_ik = u_kᵀ B_i A_i v_k`` from ``P = Uᵀ B`` [n, c, r] and ``Q = A Vᵀ`` [n, r, c] → [n, c]."""
    return (P * Q.transpose(1, 2)).sum(-1)


def project_diagonal(U: Tensor, V: Tensor, B: Tensor, A: Tensor, ridge: float = 1e-6) -> Tensor:
    """Least-squares diagonal cores ``σ_i`` for fixed bases: ``(UᵀU ⊙ VVᵀ) σ_i = diag(Uᵀ ΔW_i Vᵀ)`` → ``[n, c]``."""
    rhs = _diag_rhs(U.T @ B, A @ V.T)  # [n, c]
    return spd_solve(diagonal_gram(U, V), rhs.T, ridge).T


def relative_errors(U: Tensor, V: Tensor, cores: Tensor, B: Tensor, A: Tensor) -> Tensor:
    """Relative squared Frobenius error ``‖B_iA_i − U S_i V‖² / ‖B_iA_i‖²`` per adapter, in factor form.

    Works for any bases (orthonormal or not) and full ``[n, c, c]`` or diagonal ``[n, c]`` cores:
    ``‖ΔW‖² − 2 tr(S_iᵀ Uᵀ B_i A_i Vᵀ) + tr(S_iᵀ (UᵀU) S_i (V Vᵀ))``, computed in float64. Adapters
    whose delta is zero get 0 when their reconstruction is zero too (else 1).

    Returns:
        ``[n]`` float64 tensor.
    """
    U, V, B, A = U.double(), V.double(), B.double(), A.double()
    S = torch.diag_embed(cores.double()) if cores.dim() == 2 else cores.double()  # [n, c, c]
    norm2 = delta_sqnorm(B, A)  # [n]
    M = (U.T @ B) @ (A @ V.T)  # [n, c, r] @ [n, r, c] -> [n, c, c]
    cross = (S * M).sum((1, 2))  # tr(Sᵀ M)
    recon = ((U.T @ U) @ S @ (V @ V.T) * S).sum((1, 2))  # tr(Sᵀ UᵀU S VVᵀ)
    resid = (norm2 - 2 * cross + recon).clamp_min(0)
    tiny = norm2 <= 0
    out = resid / torch.where(tiny, torch.ones_like(norm2), norm2)
    return torch.where(tiny, (recon > 0).double(), out)


# ---------------------------------------------------------------------------------------------
# fitting


def _check_rank(c: int, n_r: int, init: str) -> None:
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose one of {', '.join(INITS)}")
    if init == "block" and c < n_r:
        raise ValueError(f"init='block' needs rank >= the total rank n*r = {n_r}, got rank={c}")


SOLVERS = ("auto", "eigh", "ritz")


def _sym_top(
    Fm: Tensor, H: Tensor, k: int, prev: Tensor | None, solver: str, generator: torch.Generator | None
) -> Tensor:
    """Leading ``k`` eigenvectors of ``S = Σ_i F_i H_i F_iᵀ`` (``F [n, m, r]``, ``H [n, r, r]`` PSD).

    ``eigh`` builds S (``O(m² n r)``) and diagonalises it exactly; ``ritz`` never builds it: a block
    Rayleigh–Ritz step on ``span[prev, S·prev]`` (``O(m n r k)``), which can only increase
    ``tr(Uᵀ S U)`` over ``prev`` (monotone), or, without ``prev``, a randomized range finder with one
    power step. ``auto`` picks ``eigh`` when ``m <= 8 k``.
    """
    n, m, r = Fm.shape
    flat = Fm.permute(1, 0, 2).reshape(m, n * r)  # [F_1 … F_n]: [m, n r]
    if solver == "eigh" or (solver == "auto" and m <= 8 * k):
        S = (Fm @ H).permute(1, 0, 2).reshape(m, n * r) @ flat.T  # [m, n r] @ [n r, m] -> [m, m]
        return _top_eigvecs(S, k)

    def apply(X: Tensor) -> Tensor:  # S @ X without S: [m, w] -> [m, w]
        Y = H @ (Fm.transpose(1, 2) @ X)  # [n, r, m] @ [m, w] -> [n, r, w]; [n, r, r] @ -> [n, r, w]
        return flat @ Y.reshape(n * r, X.shape[1])

    if prev is None:
        X = torch.randn(m, min(m, 2 * k), generator=generator, dtype=torch.float64).to(Fm)
        W = torch.linalg.qr(apply(torch.linalg.qr(apply(X))[0]))[0]  # range finder + one power step
    else:
        W = torch.linalg.qr(torch.cat([prev, apply(prev)], 1))[0]  # [m, min(m, 2k)], spans prev
    T = W.T @ apply(W)  # [w, w]
    return W @ _top_eigvecs(T, k)  # [m, w] @ [w, k] -> [m, k]


def _spectral(
    Bt: Tensor, At: Tensor, ku: int, kv: int, solver: str = "eigh", generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Leading eigenvectors of ``Σ ΔW_i ΔW_iᵀ`` and ``Σ ΔW_iᵀ ΔW_i`` (factor form, reduced coordinates)."""
    aat = At @ At.transpose(1, 2)  # [n, r, r]
    btb = Bt.transpose(1, 2) @ Bt  # [n, r, r]
    return (
        _sym_top(Bt, aat, ku, None, solver, generator),
        _sym_top(At.transpose(1, 2), btb, kv, None, solver, generator),
    )


def fit_full(
    B: Tensor,
    A: Tensor,
    c: int,
    *,
    niter: int = 10,
    init: str = "spectral",
    solver: str = "auto",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, list[float]]:
    """Orthonormal shared bases maximising ``Σ_i ‖Uᵀ ΔW_i Vᵀ‖²`` by alternating subspace steps.

    Each U-step maximises ``tr(Uᵀ S_U U)`` with ``S_U = Σ_i B_i (A_iVᵀ)(A_iVᵀ)ᵀ B_iᵀ`` (whose leading
    eigenvectors are the left singular vectors of ``[ΔW_1Vᵀ … ΔW_nVᵀ]``), each V-step the same on the
    transposed side; both run in the joint column / row spaces of the adapters
    (:func:`reduce_factors`, ``m = min(d, n r)``) and no delta is formed. ``solver="eigh"`` solves each
    step exactly (``O(m² n r)``); ``"ritz"`` takes one block Rayleigh–Ritz step from the current basis
    (``O(m n r c)``: thousands of adapters); ``"auto"`` uses eigh when ``m <= 8c``. Either way the
    objective never decreases. Init ``spectral`` (default) starts from the leading eigenvectors of
    ``Σ ΔW_i ΔW_iᵀ`` / ``Σ ΔW_iᵀ ΔW_i``; ``random`` from the Q factor of a Gaussian matrix (the
    reference code's choice).

    Semantics:
        for _ in range(niter):
            U = top_c_left_singular_vectors(hstack([B[i] @ A[i] @ V.T for i in range(n)]))
            V = top_c_left_singular_vectors(hstack([(B[i] @ A[i]).T @ U for i in range(n)])).T

    Args:
        B: ``[n, d_out, r]``; A: ``[n, r, d_in]`` (already normalised if wanted).
        c: shared rank, ``1 <= c <= min(d_out, d_in)``.

    Returns:
        ``U [d_out, c]``, ``V [c, d_in]`` (orthonormal rows), and the residual objective
        ``Σ_i ‖ΔW_i − U Uᵀ ΔW_i VᵀV‖²`` after the init and after every step (non-increasing).
    """
    n, d_out, r = B.shape
    _check_rank(c, n * r, init)
    if init == "block":
        raise ValueError(
            "init='block' is for mode='diagonal'; the full mode reaches the exact solution from 'spectral' or 'random'"
        )
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {', '.join(SOLVERS)}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)  # reproducible by default
    qb, Bt, qa, At = reduce_factors(B, A)
    m1, m2 = Bt.shape[1], At.shape[2]
    ku, kv = min(c, m1), min(c, m2)
    total = float(delta_sqnorm(B, A).double().sum())
    at_t = At.transpose(1, 2)  # [n, m2, r]

    def residual(ut: Tensor, vt: Tensor) -> float:
        core = (ut.T @ Bt) @ (At @ vt)  # [n, ku, r] @ [n, r, kv] -> [n, ku, kv]
        return max(total - float(core.double().pow(2).sum()), 0.0)

    if init == "spectral":
        ut, vt = _spectral(Bt, At, ku, kv, solver, generator)
    else:
        ut, _ = torch.linalg.qr(torch.randn(m1, ku, generator=generator, dtype=torch.float64).to(B))  # [m1, ku]
        vt, _ = torch.linalg.qr(torch.randn(m2, kv, generator=generator, dtype=torch.float64).to(B))  # [m2, kv]
    history = [residual(ut, vt)]
    for _ in range(niter):
        q = At @ vt  # [n, r, kv]
        ut = _sym_top(Bt, q @ q.transpose(1, 2), ku, ut, solver, generator)  # U-step
        history.append(residual(ut, vt))
        p = Bt.transpose(1, 2) @ ut  # [n, r, ku]
        vt = _sym_top(at_t, p @ p.transpose(1, 2), kv, vt, solver, generator)  # V-step
        history.append(residual(ut, vt))
    U = ut if qb is None else qb @ ut  # [d_out, m1] @ [m1, ku] -> [d_out, ku]
    V = vt if qa is None else qa @ vt  # [d_in, kv]
    U = complete_basis(U, c, generator)  # [d_out, c]
    V = complete_basis(V, c, generator)  # [d_in, c]
    return U.contiguous(), V.T.contiguous(), history


def fit_diagonal(
    B: Tensor,
    A: Tensor,
    c: int,
    *,
    niter: int = 100,
    init: str = "spectral",
    ridge: float = 1e-6,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """Joint diagonalisation ``ΔW_i ≈ U diag(σ_i) V`` by alternating least squares (method file §2.2).

    Per iteration: σ-step (normal equations with the Hadamard Gram ``UᵀU ⊙ VVᵀ``, one Cholesky for
    all adapters), U-step ``U = (Σ_i ΔW_i Vᵀ diag σ_i)(VVᵀ ⊙ Σ_i σ_iσ_iᵀ)⁻¹``, V-step likewise, then a
    re-balance that leaves every ``U diag(σ_i) V`` unchanged. Every step is an exact least-squares
    minimiser (up to the ``ridge · tr/c`` added before each solve), so the objective never increases.
    Runs in the reduced coordinates of :func:`reduce_factors`; bases need not be orthonormal.

    Semantics:
        for _ in range(niter):
            sigma[i] = lstsq over s of ‖B[i] @ A[i] - U @ diag(s) @ V‖   (all i)
            U = lstsq over U of Σ_i ‖B[i] @ A[i] - U @ diag(sigma[i]) @ V‖²
            V = lstsq over V of the same
            rebalance(U, V, sigma)

    Args:
        init: ``spectral`` (leading eigenvectors as in :func:`fit_full`, extra columns random),
            ``random`` (Gaussian bases, the reference's), or ``block`` (``U = [B_1 … B_n]``,
            ``V = [A_1; … ; A_n]``, σ_i = 1 on block i: exact from the start; needs ``c >= n r``).

    Returns:
        ``U [d_out, c]``, ``V [c, d_in]``, ``σ [n, c]`` and the objective ``Σ_i ‖ΔW_i − U diag σ_i V‖²``
        after every σ-, U- and V-step and a final σ-step (non-increasing up to the ridge).
    """
    n, d_out, r = B.shape
    _check_rank(c, n * r, init)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)  # reproducible by default
    qb, Bt, qa, At = reduce_factors(B, A)
    m1, m2 = Bt.shape[1], At.shape[2]
    dt = B.dtype
    if init == "block":
        ut = torch.zeros(m1, c, dtype=dt)
        vt = torch.zeros(m2, c, dtype=dt)
        ut[:, : n * r] = Bt.permute(1, 0, 2).reshape(m1, n * r)  # [B̃_1 … B̃_n]
        vt[:, : n * r] = At.permute(2, 0, 1).reshape(m2, n * r)  # [Ã_1ᵀ … Ã_nᵀ]
    elif init == "spectral":
        ku, kv = min(c, m1), min(c, m2)
        ut, vt = _spectral(Bt, At, ku, kv, "auto", generator)  # orthonormal; extra columns (c > m) random
        ut = torch.cat(
            [ut, torch.randn(m1, c - ku, generator=generator, dtype=torch.float64).to(dt) / math.sqrt(m1)], 1
        )
        vt = torch.cat(
            [vt, torch.randn(m2, c - kv, generator=generator, dtype=torch.float64).to(dt) / math.sqrt(m2)], 1
        )
    else:
        ut = torch.randn(m1, c, generator=generator, dtype=torch.float64).to(dt)
        vt = torch.randn(m2, c, generator=generator, dtype=torch.float64).to(dt)
    norm2 = float(delta_sqnorm(Bt, At).double().sum())
    P = ut.T @ Bt  # [c, m1] @ [n, m1, r] -> [n, c, r]
    Q = At @ vt  # [n, r, m2] @ [m2, c] -> [n, r, c]

    def objective(sig: Tensor) -> float:
        h = (ut.T @ ut) * (vt.T @ vt)  # [c, c]
        rhs = _diag_rhs(P, Q).double()  # [n, c]
        s = sig.double()
        val = norm2 - 2 * float((s * rhs).sum()) + float(((s @ h.double()) * s).sum())
        return max(val, 0.0)

    history: list[float] = []
    sigma = torch.zeros(n, c, dtype=dt)  # every iteration starts with the exact σ-step
    for _ in range(niter):
        # σ-step: (UᵀU ⊙ VᵀV) σ_i = rhs_i for all i at once
        sigma = spd_solve((ut.T @ ut) * (vt.T @ vt), _diag_rhs(P, Q).T, ridge).T  # [c, n] -> [n, c]
        history.append(objective(sigma))
        # U-step
        num = Bt.permute(1, 0, 2).reshape(m1, n * r) @ (Q * sigma[:, None, :]).reshape(n * r, c)  # [m1, c]
        den = (vt.T @ vt) * (sigma.T @ sigma)  # [c, c]
        ut = spd_solve(den, num.T, ridge).T  # [m1, c]
        P = ut.T @ Bt
        history.append(objective(sigma))
        # V-step
        num = At.permute(2, 0, 1).reshape(m2, n * r) @ (P.transpose(1, 2) * sigma[:, None, :]).reshape(
            n * r, c
        )  # [m2, c]
        den = (ut.T @ ut) * (sigma.T @ sigma)
        vt = spd_solve(den, num.T, ridge).T  # [m2, c]
        Q = At @ vt
        history.append(objective(sigma))
        # re-balance: σ to unit total norm, then equal Frobenius norms of U and V
        nu = float(sigma.norm())
        if nu > 0:
            sigma = sigma / nu
            ut, P = ut * nu, P * nu
        nu_u, nu_v = float(ut.norm()), float(vt.norm())
        if nu_u > 0 and nu_v > 0:
            kappa = math.sqrt(nu_v / nu_u)
            ut, P = ut * kappa, P * kappa
            vt, Q = vt / kappa, Q / kappa
    # a last σ-step: the cores are the least-squares optimum for the returned bases
    sigma = spd_solve((ut.T @ ut) * (vt.T @ vt), _diag_rhs(P, Q).T, ridge).T
    history.append(objective(sigma))
    U = ut if qb is None else qb @ ut  # [d_out, c]
    V = vt if qa is None else qa @ vt  # [d_in, c]
    return U.contiguous(), V.T.contiguous(), sigma.contiguous(), history


# ---------------------------------------------------------------------------------------------
# clustering helpers


def sketch_features(B: Tensor, A: Tensor, s_out: Tensor, s_in: Tensor) -> Tensor:
    """Random sketch ``S_outᵀ ΔW_i S_in`` ([n, k·k], unit norm rows) whose inner products estimate
    those of the deltas (for the initial clustering); factor form."""
    f = (s_out.T @ B) @ (A @ s_in)  # [k, d_out] @ [n, d_out, r] -> [n, k, r]; @ [n, r, k] -> [n, k, k]
    f = f.flatten(1)
    return f / f.norm(dim=1, keepdim=True).clamp_min(1e-30)


def kmeans_cosine(x: Tensor, k: int, *, generator: torch.Generator | None = None, iters: int = 50) -> Tensor:
    """Spherical k-means (k-means++ seeding) of unit rows ``x [n, f]`` → labels ``[n]``."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    for _ in range(1, k):  # k-means++: next center far (in cosine) from the chosen ones
        sim = torch.stack([x @ c for c in centers], 1).max(1).values  # [n]
        dist = (1 - sim).clamp_min(0) + 1e-12
        centers.append(x[int(torch.multinomial(dist, 1, generator=generator))])
    cen = torch.stack(centers)  # [k, f]
    labels = torch.zeros(n, dtype=torch.long)
    for it in range(iters):
        new = (x @ cen.T).argmax(1)  # [n]
        if it > 0 and torch.equal(new, labels):
            break
        labels = new
        for g in range(k):
            members = x[labels == g]
            if len(members):
                m = members.sum(0)
                cen[g] = m / m.norm().clamp_min(1e-30)
    return labels
