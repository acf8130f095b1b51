"""Pure tensor functions of SHiRA: budgets, the five mask strategies, flat indices, the sparse linear op.

Every mask function returns the chosen positions as **sorted flat row-major indices** (int64)
``row * n + col`` of an ``(m, n) = (d_out, d_in)`` weight; storage casts them to int32 (or int64
when ``m * n >= 2**31``, see :func:`index_dtype`).

Reference:
    Bhardwaj et al., Sparse High Rank Adapters (SHiRA), NeurIPS 2024, https://arxiv.org/abs/2406.13175.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

#: The mask strategies of the paper (``grad`` / ``snip`` need a calibration pass over task data).
MASK_TYPES = ("random", "struct", "wm", "grad", "snip")
#: Strategies whose mask comes from gradients of the task loss.
DATA_MASK_TYPES = ("grad", "snip")
_INT32_LIMIT = 2**31


# ---------------------------------------------------------------------------------------------
# budget and index helpers


def budget(m: int, n: int, *, density: float | None = None, r: int | None = None) -> int:
    """The number ``K`` of trainable entries of an ``(m, n)`` matrix.

    Exactly one of ``density`` (``K = floor(density * m * n)``, at least 1) or ``r`` (the
    LoRA-equivalent rank: ``K = r * (m + n)``, the same parameter count as a rank-``r`` LoRA).

    Raises:
        ValueError: both or neither given, density outside (0, 1], or ``K > m * n``.
    """
    if (density is None) == (r is None):
        raise ValueError(f"give exactly one of density or r (got density={density!r}, r={r!r})")
    numel = int(m) * int(n)
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density!r}")
        k = max(1, int(math.floor(float(density) * numel + 1e-9)))
    else:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an integer >= 1, got {r!r}")
        k = r * (int(m) + int(n))
    if k > numel:
        raise ValueError(
            f"K = r * (m + n) = {r} * ({m} + {n}) = {k} is larger than the matrix ({m} x {n} = {numel} entries); "
            f"expected r <= {numel // (m + n)} for this layer (or use density)"
        )
    return k


def index_dtype(numel: int) -> torch.dtype:
    """``torch.int32`` for matrices with fewer than 2^31 entries, else ``torch.int64``."""
    return torch.int32 if int(numel) < _INT32_LIMIT else torch.int64


def layer_seed(seed: int, key: str) -> int:
    """A per-layer seed: a stable digest of the config's ``random_seed`` and the module key."""
    digest = hashlib.sha256(f"shira:{int(seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def rowcol_to_flat(indices: torch.Tensor, n: int) -> torch.Tensor:
    """peft's ``(2, K)`` (row, col) indices -> flat row-major ``(K,)`` int64 ``row * n + col``."""
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise ValueError(f"expected (2, K) row/col indices, got shape {tuple(indices.shape)}")
    idx = indices.long()
    return idx[0] * int(n) + idx[1]  # (K,)


def flat_to_rowcol(flat: torch.Tensor, n: int) -> torch.Tensor:
    """Flat row-major ``(K,)`` indices -> ``(2, K)`` int64 (row, col) (peft's layout)."""
    f = flat.long()
    return torch.stack([torch.div(f, int(n), rounding_mode="floor"), f % int(n)])  # (2, K)


def _check_k(k: int, available: int, what: str) -> None:
    if k > available:
        raise ValueError(f"K = {k} trainable entries requested but only {available} {what}; lower density/r")


# ---------------------------------------------------------------------------------------------
# mask strategies


def random_indices(m: int, n: int, k: int, *, seed: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """``k`` positions drawn uniformly without replacement (a seeded permutation), sorted.

    Args:
        m, n: the matrix shape.
        k: how many.
        seed: generator seed (CPU generator, reproducible in any process).
        allowed: optional bool ``(m, n)``; only True positions may be drawn (pruned bases).
    """
    g = torch.Generator().manual_seed(int(seed))
    if allowed is None:
        _check_k(k, m * n, "entries in the matrix")
        return torch.randperm(m * n, generator=g)[:k].sort().values
    cand = allowed.reshape(-1).nonzero().squeeze(1).cpu()  # (nnz,)
    _check_k(k, cand.numel(), "non-zero base entries (respect_base_sparsity=True)")
    return cand[torch.randperm(cand.numel(), generator=g)[:k]].sort().values


def topk_indices(score: torch.Tensor, k: int, *, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The flat positions of the ``k`` largest entries of ``score`` (exactly k; ties by ``topk``), sorted.

    Semantics:
        order = argsort(-score.flatten()); return sorted(order[:k])    # restricted to allowed positions
    """
    s = score.detach().reshape(-1).float()  # (m*n,)
    if allowed is not None:
        a = allowed.reshape(-1).to(s.device)
        _check_k(k, int(a.sum()), "non-zero base entries (respect_base_sparsity=True)")
        s = torch.where(a, s, torch.full_like(s, -math.inf))
    else:
        _check_k(k, s.numel(), "entries in the matrix")
    return torch.topk(s, k, sorted=False).indices.sort().values.cpu()


def struct_indices(m: int, n: int, k: int, *, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """SHiRA-Struct: the main diagonal, then rows ``0, f, 2f, ...`` (then the other rows), exactly ``k``.

    The diagonal comes first (its first ``k`` entries if ``k < min(m, n)``); then the entries of
    the strided rows in row-major order, skipping diagonal entries, up to exactly ``k`` (the last
    row may be partial). ``f = max(1, m // ceil((k - min(m, n)) / n))`` so the full rows roughly
    fill the budget. With ``allowed``, positions outside it are skipped in the same order.

    Semantics:
        order = [i * n + i for i < min(m, n)] + [r * n + c for r in rows(0, f, 2f, ..., then the rest)
                 for c in range(n) if r != c]
        return sorted([p for p in order if allowed[p]][:k])
    """
    d = min(m, n)
    diag = torch.arange(d, dtype=torch.int64) * (n + 1)  # (d,) flat positions of the diagonal
    rest = max(0, k - d)
    f = max(1, m // max(1, math.ceil(rest / n))) if rest else m
    strided = torch.arange(0, m, f, dtype=torch.int64)
    others = torch.ones(m, dtype=torch.bool)
    others[strided] = False
    row_order = torch.cat([strided, others.nonzero().squeeze(1)])  # (m,)
    if allowed is None:
        _check_k(k, m * n, "entries in the matrix")
        if k <= d:
            return diag[:k].clone()
        # every row loses at most one entry to the diagonal: this many rows always suffice
        rows = row_order[: min(m, math.ceil(rest / max(1, n - 1)) + 1)]
    else:
        rows = row_order
    cols = torch.arange(n, dtype=torch.int64)
    cand = (rows[:, None] * n + cols[None, :]).reshape(-1)  # (len(rows) * n,) row-major
    is_diag = (rows[:, None] == cols[None, :]).reshape(-1)  # already taken by the diagonal
    order = torch.cat([diag, cand[~is_diag]])
    if allowed is not None:
        ok = allowed.reshape(-1).cpu()[order]
        order = order[ok]
        _check_k(k, order.numel(), "non-zero base entries (respect_base_sparsity=True)")
    return order[:k].sort().values


def mask_scores(mask_type: str, weight: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The score ``Z`` whose top-K is the mask: ``|W|`` (wm), ``|G|`` (grad), ``|W * G|`` (snip)."""
    if mask_type == "wm":
        return weight.detach().float().abs()
    if mask_type in DATA_MASK_TYPES:
        if grad is None:
            raise ValueError(f"mask_type={mask_type!r} needs the calibration gradient G")
        g = grad.detach().float()
        return g.abs() if mask_type == "grad" else (weight.detach().float() * g).abs()
    raise ValueError(f"mask_type={mask_type!r} has no score; scored types: wm, grad, snip")


def mask_indices(
    mask_type: str,
    shape: Sequence[int],
    k: int,
    *,
    weight: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    seed: int = 0,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted flat int64 indices of the ``k`` trainable entries for one ``(m, n)`` weight.

    Args:
        mask_type: one of :data:`MASK_TYPES`.
        shape: ``(m, n)``.
        k: the budget (see :func:`budget`).
        weight: the base weight (wm, snip).
        grad: the calibration gradient (grad, snip).
        seed: the layer's seed (random).
        allowed: bool ``(m, n)``: positions that may be chosen (``W != 0`` for pruned bases).
    """
    m, n = int(shape[0]), int(shape[1])
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type={mask_type!r} is not supported; choose one of: {', '.join(MASK_TYPES)}")
    if mask_type == "random":
        return random_indices(m, n, k, seed=seed, allowed=allowed)
    if mask_type == "struct":
        return struct_indices(m, n, k, allowed=allowed)
    if weight is None:
        raise ValueError(f"mask_type={mask_type!r} needs the base weight")
    return topk_indices(mask_scores(mask_type, weight, grad), k, allowed=allowed)


# ---------------------------------------------------------------------------------------------
# sparse delta and the sparse linear op


def scatter_delta(
    indices: torch.Tensor, values: torch.Tensor, shape: Sequence[int], scale: float = 1.0
) -> torch.Tensor:
    """The dense fp32 ``(m, n)`` delta ``scale * S`` (zeros off the mask; repeated indices sum)."""
    m, n = int(shape[0]), int(shape[1])
    flat = torch.zeros(m * n, dtype=torch.float32, device=values.device)
    flat.index_add_(0, indices.to(values.device).long(), values.detach().float() * float(scale))
    return flat.view(m, n)


def _effective(
    weight: torch.Tensor | None, values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``W + S`` (or ``S`` alone when ``weight`` is None) as a new ``(m, n)`` tensor of ``dtype``."""
    m, n = shape
    if weight is None:
        flat = torch.zeros(m * n, dtype=dtype, device=values.device)
    else:
        flat = weight.detach().reshape(-1).to(dtype).clone()  # (m*n,)
    flat.index_add_(0, indices, values.to(dtype))  # int32 or int64 indices, no copy
    return flat.view(m, n)


class _SparseLinear(torch.autograd.Function):
    """``y = x (W + S)^T`` (or ``x S^T``) without keeping ``W + S`` alive for backward.

    Only ``x`` (already saved by any linear layer) and the ``K`` values are saved; the
    ``(m, n)`` effective weight is rebuilt in backward, so the activation memory is the base
    layer's. The gradient of the values is the dense weight gradient gathered at the mask.
    """

    @staticmethod
    def forward(ctx, x, values, indices, weight, m, n):  # type: ignore[override]
        w = _effective(weight, values, indices, (m, n), x.dtype)  # (m, n)
        ctx.save_for_backward(x, values, indices, weight if weight is not None else torch.empty(0))
        ctx.has_weight = weight is not None
        ctx.shape = (m, n)
        return x @ w.T  # (..., n) @ (n, m) -> (..., m)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, values, indices, weight = ctx.saved_tensors
        m, n = ctx.shape
        gx = gv = None
        if ctx.needs_input_grad[0]:
            w = _effective(weight if ctx.has_weight else None, values, indices, (m, n), grad_out.dtype)
            gx = grad_out @ w  # (..., m) @ (m, n) -> (..., n)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, m)  # (T, m)
            x2 = x.reshape(-1, n).to(g2.dtype)  # (T, n)
            gw = g2.T @ x2  # (m, n) dense weight gradient, freed right after the gather
            gv = gw.reshape(-1).index_select(0, indices).to(values.dtype)  # (K,)
        return gx, gv, None, None, None, None


def sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: Sequence[int],
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (W + S)^T`` with ``S = scatter(indices, values)`` (``x S^T`` when ``weight`` is None).

    Differentiable in ``x`` and ``values`` (not in ``weight``, which is frozen).

    Semantics:
        S = zeros(m * n); S[indices] += values; S = S.view(m, n)
        return x @ (W + S).T        # or x @ S.T
    """
    return _SparseLinear.apply(x, values, indices, weight, int(shape[0]), int(shape[1]))
