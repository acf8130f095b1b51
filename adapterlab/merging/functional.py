"""Pure tensor math for merging task vectors: scaling, TIES trim / elect / disjoint merge, DARE, RMM.

Task tensors are stacked on dim 0: ``x`` has shape ``[T, *shape]`` for T tasks. Everything is
computed in the dtype it is given (callers pass fp32).

Reference:
    TIES-Merging — Yadav et al. 2023, https://arxiv.org/abs/2306.01708
    DARE — Yu et al. 2023, https://arxiv.org/abs/2311.03099
    RMM — Alipour & Mohammadi Amiri 2025, https://arxiv.org/abs/2510.14163
"""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

__all__ = [
    "HIST_BINS",
    "abs_bits_histogram",
    "bits_to_float",
    "canonical_gauge",
    "dare_drop",
    "derive_seed",
    "disjoint_merge",
    "elect_sign",
    "histogram_select",
    "kth_largest_abs",
    "rmm_fit",
    "rmm_fit_positions",
    "topk_trim",
    "threshold_trim",
    "ties_tensor",
    "union_support",
]

#: Bins of each level of the two-level float-bit histogram (16 bits per level).
HIST_BINS = 1 << 16


# ------------------------------------------------------------------------------------------------
# exact global k-th largest magnitude by a two-level histogram over fp32 bit patterns


def _abs_bits(x: Tensor) -> Tensor:
    """int32 bit patterns of ``|x|`` in fp32; for non-negative floats the integer order is the value order."""
    return x.detach().to(torch.float32).abs().contiguous().view(torch.int32)


def abs_bits_histogram(x: Tensor, prefix: int | None = None) -> Tensor:
    """Histogram of ``|x|`` over the high (``prefix=None``) or low 16 bits of its fp32 pattern.

    Args:
        x: any shape.
        prefix: restrict to entries whose high 16 bits equal ``prefix`` and count their low 16 bits.

    Returns:
        ``[HIST_BINS]`` int64 counts.
    """
    bits = _abs_bits(x).reshape(-1)  # [numel]
    if prefix is None:
        return torch.bincount(bits >> 16, minlength=HIST_BINS)
    sel = bits[(bits >> 16) == prefix]  # [m]
    return torch.bincount(sel & 0xFFFF, minlength=HIST_BINS)


def histogram_select(hist: Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest value, and its rank (1-based, from the top) inside that bin.

    Args:
        hist: ``[B]`` counts, bin index increasing with value.
        k: 1-based rank from the top, ``1 <= k <= hist.sum()``.
    """
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    from_top = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # [B] count of entries in bins >= b
    b = int(torch.nonzero(from_top >= k).max())
    above = total - int(torch.cumsum(hist, 0)[b])  # entries in bins > b
    return b, k - above


def bits_to_float(hi: int, lo: int) -> float:
    """The fp32 value of the bit pattern ``hi << 16 | lo``."""
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item())


def kth_largest_abs(x: Tensor, k: int) -> float:
    """Exact k-th largest ``|x|`` (1-based) with the same two-level histogram the streaming TIES uses.

    A reference for tests and for one-tensor use; ``ties.py`` runs the two levels as two passes over
    all modules so that the whole-model threshold never needs the flattened model.
    """
    hi, k_in = histogram_select(abs_bits_histogram(x), k)
    lo, _ = histogram_select(abs_bits_histogram(x, hi), k_in)
    return bits_to_float(hi, lo)


# ------------------------------------------------------------------------------------------------
# TIES


def topk_trim(x: Tensor, density: float) -> Tensor:
    """Per-tensor trim (peft's ``magnitude_based_pruning``): keep exactly ``⌊density·numel⌋`` entries.

    Args:
        x: ``[*shape]`` one task tensor.

    Returns:
        ``[*shape]``, zero outside the kept entries (entries tied with the k-th largest ``|x|`` are
        kept in index order until exactly k are kept).

    Semantics:
        idx = topk(|x|, k).indices; out = zeros_like(x); out[idx] = x[idx]
    The k-th largest ``|x|`` comes from the two-level fp32 bit histogram (:func:`kth_largest_abs`),
    which is several times faster than ``torch.topk`` for k in the hundreds of thousands.
    """
    flat = x.reshape(-1)  # [numel]
    k = int(density * flat.numel())
    if k <= 0:
        return torch.zeros_like(x)
    if k >= flat.numel():
        return x.clone()
    mag = flat.detach().to(torch.float32).abs()  # [numel]
    kappa = kth_largest_abs(mag, k)
    keep = mag > kappa  # [numel]
    need = k - int(keep.sum())
    if need > 0:  # entries tied at kappa: the first `need` of them in index order
        tied = torch.nonzero(mag == kappa).reshape(-1)[:need]  # [need]
        keep[tied] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype)).reshape(x.shape)


def threshold_trim(x: Tensor, kappa: float) -> Tensor:
    """Whole-model trim of the paper: ``x ⊙ 1[|x| ≥ κ]`` (all entries tied at κ are kept)."""
    return torch.where(x.abs() >= kappa, x, torch.zeros_like(x))


def elect_sign(trimmed: Tensor, method: str = "mass") -> Tensor:
    """Elected sign per entry, 0 where the vote is exactly tied.

    Args:
        trimmed: ``[T, *shape]`` trimmed task tensors (unweighted).
        method: ``"mass"`` — ``sgn(Σ_t τ̂_t)``; ``"frequency"`` — ``sgn(Σ_t sgn(τ̂_t))``.

    Returns:
        ``[*shape]`` in {-1, 0, +1} (same dtype as ``trimmed``).
    """
    if method == "mass":
        return torch.sign(trimmed.sum(0))
    if method == "frequency":
        return torch.sign(torch.sign(trimmed).sum(0))
    raise ValueError(f"unknown sign election {method!r}; choose one of: mass, frequency")


def disjoint_merge(trimmed: Tensor, sign: Tensor, weights: Tensor | None = None) -> Tensor:
    """Disjoint mean: ``Σ_{t∈A_p} w_t τ̂_{t,p} / |A_p|`` with ``A_p = {t: τ̂_{t,p} ≠ 0, sgn = γ_p}``.

    Args:
        trimmed: ``[T, *shape]``.
        sign: ``[*shape]`` elected sign γ (entries with γ = 0 merge to 0).
        weights: ``[T]`` task weights applied after the election (peft semantics), or None for 1.

    Returns:
        ``[*shape]``.
    """
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)  # [T, *shape]
    vals = trimmed if weights is None else trimmed * weights.reshape(-1, *([1] * (trimmed.dim() - 1)))
    total = torch.where(agree, vals, torch.zeros_like(vals)).sum(0)  # [*shape]
    count = agree.sum(0).clamp_min(1).to(trimmed.dtype)  # [*shape]
    return total / count


def ties_tensor(
    x: Tensor,
    weights: Tensor | None = None,
    *,
    density: float = 0.2,
    elect: str = "mass",
    kappa: Tensor | None = None,
    zero_sign: float = 1.0,
) -> Tensor:
    """TIES on one stacked tensor: trim, elect, disjoint mean (λ is applied by the caller).

    Args:
        x: ``[T, *shape]`` task tensors.
        weights: ``[T]`` or None.
        density: kept fraction for the per-tensor trim (used when ``kappa`` is None).
        elect: ``"mass"`` or ``"frequency"``.
        kappa: ``[T]`` per-task whole-model thresholds; None trims per tensor (peft variant).
        zero_sign: sign given to entries whose vote is exactly 0 (+1 in peft; the paper uses the
            majority sign of the whole model).

    Returns:
        ``[*shape]`` merged task vector.

    Reference:
        https://arxiv.org/abs/2306.01708 (Algorithm 1)
    """
    if kappa is None:
        trimmed = torch.stack([topk_trim(t, density) for t in x])  # [T, *shape]
    else:
        trimmed = torch.stack([threshold_trim(t, float(k)) for t, k in zip(x, kappa)])  # [T, *shape]
    sign = elect_sign(trimmed, elect)
    sign = torch.where(sign == 0, torch.full_like(sign, zero_sign), sign)
    return disjoint_merge(trimmed, sign, weights)


# ------------------------------------------------------------------------------------------------
# sparse task vectors: the union of the adapters' supports


def union_support(indices: list[Tensor], values: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Put T sparse task vectors (flat indices + values) on the union of their supports.

    Args:
        indices: per task, flat int indices ``[K_t]`` (any order; repeated indices sum, as in a scatter-add).
        values: per task, values ``[K_t]``.

    Returns:
        ``union [U]`` (sorted int64), ``x [T, U]`` fp32 values (0 where a task stores nothing) and
        ``stored [T, U]`` bool (where each task stores an entry, whatever its value).

    Semantics:
        union = sorted(set(indices[0]) | ... | set(indices[T-1]))
        for t, (i, v) in enumerate(zip(indices, values)): for p, val in zip(i, v):
            u = union.index(p); x[t, u] += val; stored[t, u] = True
    """
    T = len(indices)
    counts = torch.tensor([int(i.numel()) for i in indices], dtype=torch.int64)  # [T]
    flat = torch.cat([i.reshape(-1).long() for i in indices]) if T else torch.zeros(0, dtype=torch.int64)  # [ΣK]
    union, inverse = torch.unique(flat, sorted=True, return_inverse=True)  # [U], [ΣK]
    task = torch.repeat_interleave(torch.arange(T), counts)  # [ΣK]
    x = torch.zeros(T, union.numel(), dtype=torch.float32)  # [T, U]
    if flat.numel():
        vals = torch.cat([v.reshape(-1).to(torch.float32) for v in values])  # [ΣK]
        x.index_put_((task, inverse), vals, accumulate=True)
    stored = torch.zeros(T, union.numel(), dtype=torch.bool)  # [T, U]
    stored[task, inverse] = True
    return union, x, stored


# ------------------------------------------------------------------------------------------------
# DARE


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from ``seed`` and labels (task index, module name): order-independent streams."""
    h = hashlib.sha256(repr((int(seed),) + tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def dare_drop(x: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability ``density`` and rescale kept ones by ``1/density``.

    With ``density == 1`` it returns ``x`` unchanged (nothing dropped, nothing rescaled).

    Reference:
        https://arxiv.org/abs/2311.03099
    """
    if density >= 1.0:
        return x
    keep = torch.rand(x.shape, generator=generator, dtype=torch.float32, device=x.device) < density
    return torch.where(keep, x / density, torch.zeros_like(x))


# ------------------------------------------------------------------------------------------------
# RMM


def canonical_gauge(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """Rewrite ``B A`` as ``U Σ^{1/2}, Σ^{1/2} Vᵀ`` (QR of both factors + an r×r SVD), signs fixed.

    The product is unchanged; the gauge freedom ``B R, R⁻¹ A`` is removed (up to degenerate σ), which
    aligns adapters before RMM stacks them (ties_rmm.md B8.1). Each column of the new B has its
    largest-magnitude entry positive.

    Args:
        B: ``[d_out, r]``.  A: ``[r, d_in]``.

    Returns:
        ``(B', A')`` of the same shapes.
    """
    qb, rb = torch.linalg.qr(B)  # [d_out, r], [r, r]
    qa, ra = torch.linalg.qr(A.T)  # [d_in, r], [r, r]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # [r, r] [r] [r, r]
    root = s.sqrt()
    Bc = qb @ (u * root)  # [d_out, r]
    Ac = (root[:, None] * vh) @ qa.T  # [r, d_in]
    idx = Bc.abs().argmax(0)  # [r]
    flip = torch.sign(Bc.gather(0, idx[None]).squeeze(0))  # [r]
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    return Bc * flip, Ac * flip[:, None]


def rmm_fit(D: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Closed-form rank-K basis of n stacked task factors (Eckart–Young via the n×n Gram matrix).

    Solves ``min_{U, C} ‖D − Cᵀ U‖_F`` with orthonormal rows of C.

    Args:
        D: ``[n, P]`` — row i is ``vec(F_i)`` of task i.
        k: basis size K, ``1 <= K <= n``.

    Returns:
        ``U [K, P]`` (basis "models") and ``C [K, n]``; task i is ``Σ_k C[k, i] U[k]``.

    Reference:
        RMM — https://arxiv.org/abs/2510.14163 (closed form as reconstructed in ties_rmm.md B2)
    """
    n = D.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"basis size K must be in [1, {n}], got {k}")
    D64 = D.double()
    G = D64 @ D64.T  # [n, n]
    _, vecs = torch.linalg.eigh(G)  # ascending eigenvalues, vecs [n, n]
    C = vecs[:, -k:].flip(1).T  # [K, n], largest eigenvalue first
    U = C @ D64  # [K, P]
    return U.to(D.dtype), C.to(D.dtype)


def rmm_fit_positions(X: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``coeff_scope="position"``: :func:`rmm_fit` solved separately for every position.

    Args:
        X: ``[npos, n, r]`` — for each position (a row of B or a column of A) the n task r-vectors.
        k: basis size K, ``1 <= K <= n``.

    Returns:
        ``U [npos, K, r]`` and ``C [npos, K, n]``.
    """
    n = X.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"basis size K must be in [1, {n}], got {k}")
    X64 = X.double()
    G = X64 @ X64.transpose(1, 2)  # [npos, n, n]
    _, vecs = torch.linalg.eigh(G)  # [npos, n, n]
    C = vecs[:, :, -k:].flip(2).transpose(1, 2)  # [npos, K, n]
    U = C @ X64  # [npos, K, r]
    return U.to(X.dtype), C.to(X.dtype)
