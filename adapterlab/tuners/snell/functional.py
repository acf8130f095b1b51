"""Pure tensor math of SNELL / SNELLA: the distance kernel, exact top-k competition, the SNELLA
budget schedule and allocation.

Reference:
    Shen et al., SNELL, https://arxiv.org/abs/2411.01800; SNELLA, https://arxiv.org/abs/2510.24037.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def head_coefficients(heads: int, coeff: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fixed mixing coefficients ``c_h = coeff * (-1)^h``, shape ``(heads,)``."""
    signs = 1.0 - 2.0 * (torch.arange(heads) % 2).to(dtype)  # (H,): +1, -1, +1, ...
    return signs * float(coeff)


def kernel_matrix(
    p_in: torch.Tensor,
    q_out: torch.Tensor,
    coeffs: torch.Tensor,
    *,
    norm_p: float = 2.0,
    mix: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generated (dense, not yet sparsified) delta ``K``, input-major ``(n, m)``.

    Args:
        p_in: ``P`` of shape ``(H, n, d)`` (rows indexed by input features).
        q_out: ``Q`` of shape ``(H, m, d)`` (rows indexed by output features).
        coeffs: ``(H,)`` mixing coefficients.
        norm_p: the ``p`` of the distance.
        mix: SNELLA's ``(alpha, gamma, beta)``; None for plain SNELL.

    Semantics:
        for j in range(n):
            for i in range(m):
                K[j, i] = sum_h coeffs[h] * (sum_d |P[h, j, d] - Q[h, i, d]| ** p) ** (1 / p)
        if mix is given (alpha, gamma, beta):
            K = K + alpha * softmax(K / gamma, dim=-1) + beta       # softmax over outputs i
    The merged weight update is ``K.T`` (``(m, n)``, like ``W``).
    """
    if p_in.dim() != 3 or q_out.dim() != 3 or p_in.shape[0] != q_out.shape[0] or p_in.shape[2] != q_out.shape[2]:
        raise ValueError(f"P and Q must be (H, n, d) and (H, m, d), got {tuple(p_in.shape)} and {tuple(q_out.shape)}")
    dist = torch.cdist(p_in, q_out, p=float(norm_p))  # (H, n, d), (H, m, d) -> (H, n, m)
    k = (coeffs.to(dist.dtype).view(-1, 1, 1) * dist).sum(0)  # (H, n, m) -> (n, m)
    if mix is not None:
        alpha, gamma, beta = mix[0], mix[1], mix[2]
        k = k + alpha * torch.softmax(k / gamma, dim=-1) + beta  # (n, m)
    return k


def keep_count(numel: int, sparsity: float) -> int:
    """Entries kept at ``sparsity``: ``numel - floor(sparsity * numel)`` (robust to float noise)."""
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    return int(numel) - int(math.floor(float(sparsity) * int(numel) + 1e-6))


def keep_threshold(scores: torch.Tensor, keep: int) -> tuple[float, int]:
    """``(t, need)`` such that the ``keep`` largest entries are those ``> t`` plus the first ``need``
    entries ``== t`` in flat order (``kthvalue``: no ``torch.quantile``, which refuses > 2^24 elements)."""
    flat = scores.detach().reshape(-1)  # (N,)
    numel = flat.numel()
    if keep >= numel:
        return float("-inf"), 0
    if keep <= 0:
        return float("inf"), 0
    threshold = flat.kthvalue(numel - keep).values  # the (N - keep)-th smallest
    return float(threshold), keep - int((flat > threshold).sum())


def tie_threshold(scores: torch.Tensor, threshold: float, need: int, tie_break: torch.Tensor) -> tuple[float, int]:
    """``(t2, need2)`` choosing ``need`` of the entries ``scores == threshold`` by largest ``tie_break``:
    those with ``tie_break > t2`` plus the first ``need2`` with ``tie_break == t2`` in flat order.

    When there are only ``need`` tied entries (the usual case for continuous scores) all of them are
    kept (``t2 = -inf``) without a second selection.
    """
    flat = scores.detach().reshape(-1)  # (N,)
    if need <= 0:
        return float("inf"), 0
    ties = flat == threshold  # (N,)
    if int(ties.sum()) <= need:
        return float("-inf"), 0
    tb = tie_break.detach().reshape(-1).to(flat.dtype)  # (N,)
    candidates = torch.where(ties, tb, torch.full_like(tb, float("-inf")))  # (N,) only the ties compete
    return keep_threshold(candidates, need)


def mask_from_threshold(
    scores: torch.Tensor,
    threshold: float,
    need: int,
    *,
    tie_break: torch.Tensor | None = None,
    tie: tuple[float, int] | None = None,
) -> torch.Tensor:
    """The bool mask described by :func:`keep_threshold` (elementwise; no selection).

    With ``tie_break`` and ``tie = tie_threshold(...)`` the ``need`` tied entries are those of largest
    ``tie_break`` (then lowest flat index); otherwise the first ``need`` ties in flat order.
    """
    flat = scores.detach().reshape(-1)  # (N,)
    mask = flat > threshold  # (N,)
    if need > 0:
        ties = flat == threshold  # (N,)
        if tie_break is not None and tie is not None:
            t2, need2 = tie
            tb = tie_break.detach().reshape(-1).to(flat.dtype)  # (N,)
            mask |= ties & (tb > t2)
            if need2 > 0:
                mask[(ties & (tb == t2)).nonzero().squeeze(1)[:need2]] = True
        else:
            mask[ties.nonzero().squeeze(1)[:need]] = True  # (T,) ascending flat positions, T > need
    return mask.view_as(scores)


def keep_mask(scores: torch.Tensor, keep: int, *, tie_break: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of exactly ``keep`` entries with the largest ``scores``.

    Ties are broken by the largest ``tie_break`` (same shape as ``scores``), then by the lowest flat index.

    Semantics:
        order = stable argsort of -scores.flatten()            # or lexicographic (-scores, -tie_break)
        mask.flatten()[order[:keep]] = True
    """
    threshold, need = keep_threshold(scores, keep)
    tie = None if tie_break is None else tie_threshold(scores, threshold, need, tie_break)
    return mask_from_threshold(scores, threshold, need, tie_break=tie_break, tie=tie)


def sparsify(
    delta: torch.Tensor,
    keep: int,
    *,
    reference_square: bool = False,
    cache: dict[str, Any] | None = None,
    tie_break: torch.Tensor | None = None,
) -> torch.Tensor:
    """Competition-based sparsification of one layer's generated delta (same shape as ``delta``).

    The mask is computed from a detached copy, so selection is re-done every call and gradients
    flow only into the surviving entries. ``cache`` (a dict) keeps the selection thresholds of the
    first call and reuses them on later calls with the same ``delta`` (the activation-checkpoint
    recomputation), which then needs no ``kthvalue``. ``tie_break`` (same shape, e.g. ``|K0|`` with
    ``zero_init_offset``, where every ``|delta|`` is 0 at step 0) orders tied magnitudes; without
    it ties go to the lowest flat index.

    Semantics:
        M = keep_mask(|delta|, keep, tie_break=tie_break)
        out = delta * M                            # paper
        out = delta * (|delta|.detach() * M)       # reference_square (released code)
    """
    if keep >= delta.numel() and not reference_square:
        return delta
    magnitude = delta.detach().abs()
    if cache is not None and "threshold" in cache:
        threshold, need, tie = cache["threshold"], cache["need"], cache["tie"]
    else:
        threshold, need = keep_threshold(magnitude, keep)
        tie = None if tie_break is None else tie_threshold(magnitude, threshold, need, tie_break)
        if cache is not None:
            cache["threshold"], cache["need"], cache["tie"] = threshold, need, tie
    mask = mask_from_threshold(magnitude, threshold, need, tie_break=tie_break, tie=tie)
    if reference_square:
        return delta * (magnitude * mask)
    return delta * mask


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a branch: drop whole samples (dim 0) with probability ``p``, rescale the rest."""
    if not training or p <= 0.0:
        return x
    keep = 1.0 - p
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)  # (B, 1, ..., 1)
    return x * x.new_empty(shape).bernoulli_(keep) / keep


# ---------------------------------------------------------------------------------------------
# SNELLA: importance and budget


def budget_schedule(
    step: int, total_steps: int, v_init: int, v_target: int, *, init_warmup: int = 0, final_warmup: int = 0
) -> int:
    """Total kept entries ``V(t)`` at allocation step ``t``: cubic decay from ``v_init`` to ``v_target``.

    Semantics:
        t < init_warmup:                 V = v_init
        t >= total - final_warmup:       V = v_target
        otherwise: V = v_target + floor((v_init - v_target) * (1 - (t - init_warmup) / (total - init_warmup - final_warmup)) ** 3)
    """
    if step < init_warmup:
        return int(v_init)
    span = total_steps - init_warmup - final_warmup
    if step >= total_steps - final_warmup or span <= 0:
        return int(v_target)
    frac = 1.0 - (step - init_warmup) / span
    return int(v_target) + int(math.floor((int(v_init) - int(v_target)) * frac**3))


def allocate_budget(budget: int, scores: torch.Tensor, capacities: torch.Tensor) -> torch.Tensor:
    """Split ``budget`` kept entries over layers in proportion to ``scores``, capped by ``capacities``.

    Args:
        budget: total entries to keep (clamped to ``[0, sum(capacities)]``).
        scores: ``(L,)`` non-negative layer scores (uniform when all are 0).
        capacities: ``(L,)`` entries per layer ``N_l``.

    Returns:
        int64 ``(L,)`` per-layer counts ``v_l <= N_l`` with ``sum(v_l) == budget`` exactly.

    Semantics:
        v_l = min(N_l, floor(V * S_l / sum S)); then, while V - sum v > 0, hand the leftover to layers
        with spare capacity in proportion to their scores; the last units go to the highest-score
        layers with room (ties: lower index first).
    """
    caps = capacities.to(torch.int64)
    budget = max(0, min(int(budget), int(caps.sum())))
    s = scores.detach().to(torch.float64).clamp_min(0).nan_to_num(0.0)  # (L,)
    if float(s.sum()) <= 0:
        s = torch.ones_like(s)
    v = torch.zeros_like(caps)
    for _ in range(len(caps) + 1):  # each round saturates a layer or hands out everything it can
        left = budget - int(v.sum())
        room = caps - v
        if left <= 0:
            break
        w = torch.where(room > 0, s, torch.zeros_like(s))
        if float(w.sum()) <= 0:
            w = (room > 0).to(torch.float64)
        add = torch.minimum(room, torch.floor(left * w / w.sum()).to(torch.int64))  # (L,)
        if int(add.sum()) == 0:
            break
        v += add
    left = budget - int(v.sum())
    if left > 0:  # the rounding remainder: highest scores first, greedy within capacity
        order = torch.sort(-s, stable=True).indices  # (L,)
        room = (caps - v)[order]
        before = torch.cumsum(room, 0) - room  # (L,) room of the layers ahead in the order
        give = torch.clamp(left - before, min=0)
        v[order] += torch.minimum(room, give)
    return v


def importance(theta: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """Element sensitivity ``|theta * grad|`` (NaN -> 0; zeros without a gradient), same shape as theta."""
    if grad is None:
        return torch.zeros_like(theta, dtype=torch.float32)
    return (theta.detach().float() * grad.detach().float()).abs().nan_to_num(0.0)
