"""Pure tensor math for pruning: exact-count masks, N:M groups, Wanda scores, SparseGPT.

Every function here takes and returns tensors (no modules, no hooks). Weights are in the
``nn.Linear`` layout ``(d_out, d_in)``; N:M groups run along the **input** dimension (columns).

Masks follow one convention: a *keep* mask is ``True`` where the weight survives. Exact counts are
selected by index (stable sort), never by a ``<= threshold`` comparison, because the embedded
model's dequantized 4-bit weights have many ties (pruning.md, pitfall 5). Among tied scores, the
entry with the lower index is pruned first (the same order as Wanda's ``sort(stable=True)``).

Reference:
    Wanda — Sun et al. 2023, https://arxiv.org/abs/2306.11695
    SparseGPT — Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

import math
import numbers
import re
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "DETECTED_PATTERNS",
    "PATTERN_CHOICES",
    "SparsityError",
    "detect_nm",
    "accumulate_hessian",
    "accumulate_sq_norm",
    "check_nm",
    "lowest_k_mask",
    "magnitude_mask",
    "nm_keep_mask",
    "parse_pattern",
    "resolve_sparsity",
    "SparseGPTSolution",
    "sparsegpt_prune",
    "sparsegpt_solve",
    "unstructured_keep_mask",
    "wanda_mask",
    "wanda_scores",
]

#: Human-readable description of the accepted ``pattern`` values (used in error messages).
PATTERN_CHOICES = "None or 'unstructured', or 'N:M' with 1 <= N <= M (e.g. '2:4', '4:8')"

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# --------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """Parse a sparsity pattern: ``None``/``"unstructured"`` -> ``None``; ``"N:M"`` -> ``(N, M)``.

    Raises:
        ValueError: the pattern is malformed or ``N`` is not in ``[1, M]``; the message names the
            value and the accepted choices.
    """
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise ValueError(f"unknown sparsity pattern {pattern!r}; choose one of: {PATTERN_CHOICES}")
    if pattern.strip().lower() in ("", "unstructured", "none"):
        return None
    match = _NM_RE.match(pattern)
    if match is None:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; choose one of: {PATTERN_CHOICES}")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1 or n > m:
        raise ValueError(
            f"invalid N:M pattern {pattern!r} (N={n}, M={m}): need 1 <= N <= M; choose one of: {PATTERN_CHOICES}"
        )
    return n, m


def resolve_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The effective sparsity: ``sparsity`` for unstructured pruning, ``1 - N/M`` for N:M.

    Raises:
        ValueError: unstructured pruning with a sparsity that is missing or not in ``[0, 1)``.
    """
    if nm is not None:
        return 1.0 - nm[0] / nm[1]
    if sparsity is None or isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise ValueError(
            f"sparsity must be a number in [0, 1) for unstructured pruning, got {sparsity!r} "
            f"(or pass pattern='N:M', e.g. '2:4')"
        )
    value = float(sparsity)
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"sparsity must be in [0, 1) for unstructured pruning, got {sparsity!r}")
    return value


# --------------------------------------------------------------------------------------------
# exact-count masks
# --------------------------------------------------------------------------------------------


def lowest_k_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask, ``True`` at the ``k`` lowest scores along the last dimension.

    Ties are broken by index (lower index first), so the count is exact and deterministic. Long
    rows use ``kthvalue`` plus a cumulative count of the ties at the threshold (no full sort);
    short groups (N:M) use a stable ``argsort``. Both give the same mask.

    Semantics:
        for each row r: order = sorted(range(len(r)), key=lambda j: r[j])  # stable
                        mask[r, order[:k]] = True
    """
    k = int(k)
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if k >= scores.shape[-1]:
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if scores.shape[-1] <= _SORT_MAX:
        mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        idx = torch.argsort(scores, dim=-1, stable=True)[..., :k]  # (..., k)
        return mask.scatter_(-1, idx, True)
    theta = scores.kthvalue(k, dim=-1, keepdim=True).values  # (..., 1): the k-th smallest
    below = scores < theta
    ties = scores == theta
    need = k - below.sum(-1, keepdim=True)  # (..., 1): how many tied entries to prune, >= 1
    return below | (ties & (ties.cumsum(-1) <= need))


#: Groups up to this length are ranked with a stable argsort, longer ones with ``kthvalue``.
_SORT_MAX = 64


def unstructured_keep_mask(scores: Tensor, sparsity: float, *, per_row: bool) -> Tensor:
    """Keep mask that prunes exactly ``floor(sparsity * group size)`` lowest scores per group.

    Args:
        scores: ``(d_out, d_in)`` importance scores (higher = more important).
        sparsity: fraction to prune, in ``[0, 1)``.
        per_row: one group per output row (Wanda) instead of one group for the whole matrix.

    Returns:
        ``(d_out, d_in)`` bool, ``True`` where the weight is kept.
    """
    if per_row:
        k = int(sparsity * scores.shape[-1])
        return ~lowest_k_mask(scores, k)
    flat = scores.reshape(-1)  # (d_out * d_in,)
    k = int(sparsity * flat.numel())
    return (~lowest_k_mask(flat, k)).view_as(scores)


def nm_keep_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep mask with exactly ``n`` kept entries in every group of ``m`` consecutive input columns.

    Args:
        scores: ``(d_out, d_in)`` scores, ``d_in % m == 0``.

    Raises:
        ValueError: ``d_in`` is not a multiple of ``m``.
    """
    d_out, d_in = scores.shape
    if d_in % m:
        raise ValueError(f"N:M pattern needs d_in % M == 0, got d_in={d_in}, M={m}")
    groups = scores.reshape(d_out, d_in // m, m)  # (d_out, d_in) -> (d_out, d_in/M, M)
    pruned = lowest_k_mask(groups, m - n)
    return (~pruned).reshape(d_out, d_in)  # (d_out, d_in/M, M) -> (d_out, d_in)


def check_nm(weight: Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights has at most ``n`` non-zeros.

    Args:
        weight: ``(d_out, d_in)``; ``d_in`` must be a multiple of ``m`` (else False).
    """
    if weight.dim() != 2 or weight.shape[1] % m:
        return False
    d_out, d_in = weight.shape
    nonzeros = (weight != 0).reshape(d_out, d_in // m, m).sum(-1)  # (d_out, d_in/M)
    return bool((nonzeros <= n).all())


# --------------------------------------------------------------------------------------------
# magnitude
# --------------------------------------------------------------------------------------------


def magnitude_mask(
    weight: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    scope: str = "matrix",
) -> Tensor:
    """Keep mask of magnitude pruning: score ``|W|``.

    Args:
        weight: ``(d_out, d_in)``.
        sparsity: fraction pruned per group (ignored for N:M).
        nm: ``(N, M)`` to keep the N largest ``|W|`` in every group of M input columns.
        scope: ``"matrix"`` (one threshold per weight matrix, the reference) or ``"row"``.

    Reference:
        Wanda repo magnitude baseline (https://arxiv.org/abs/2306.11695, ``prune_magnitude``).
    """
    scores = weight.detach().abs().float()
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    if scope not in ("matrix", "row"):
        raise ValueError(f"unknown magnitude scope {scope!r}; choose one of: matrix, row")
    return unstructured_keep_mask(scores, sparsity, per_row=scope == "row")


# --------------------------------------------------------------------------------------------
# Wanda
# --------------------------------------------------------------------------------------------


def accumulate_sq_norm(scaler: Tensor, nsamples: int, x: Tensor) -> tuple[Tensor, int]:
    """Wanda's running mean of the squared input-feature norms, one batch at a time.

    ``scaler_j <- scaler_j * n/(n+b) + ||X_{:,j}||_2^2 / (n+b)`` with ``b`` the number of sequences
    in the batch and ``X`` the batch's (tokens x d_in) input matrix.

    Args:
        scaler: ``(d_in,)`` fp32 running statistic.
        nsamples: sequences seen so far.
        x: layer input, ``(b, seq, d_in)`` or ``(tokens, d_in)`` (then ``b = 1``).

    Returns:
        The updated scaler and sequence count.

    Reference:
        ``WrappedGPT.add_batch`` in locuslab/wanda (https://arxiv.org/abs/2306.11695).
    """
    b = x.shape[0] if x.dim() == 3 else 1
    x2 = x.reshape(-1, x.shape[-1]).float()  # (..., d_in) -> (tokens, d_in)
    total = nsamples + b
    scaler = scaler * (nsamples / total) + x2.pow(2).sum(0) / total
    return scaler, total


def wanda_scores(weight: Tensor, sq_norm: Tensor) -> Tensor:
    """Wanda importance ``S_ij = |W_ij| * ||X_j||_2`` with ``sq_norm = ||X_j||_2^2`` of shape ``(d_in,)``."""
    return weight.detach().abs().float() * torch.sqrt(sq_norm.float()).reshape(1, -1)


def wanda_mask(
    weight: Tensor,
    sq_norm: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
) -> Tensor:
    """Keep mask of Wanda: per output row, prune the ``floor(s * d_in)`` lowest ``|W| * ||X||``.

    With ``nm = (N, M)``, keep the N highest scores in every group of M input columns.

    Semantics:
        for i in range(d_out):
            order = sorted(range(d_in), key=lambda j: abs(W[i][j]) * sqrt(sq_norm[j]))
            keep[i][order[:int(s * d_in)]] = False

    Reference:
        Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models",
        https://arxiv.org/abs/2306.11695
    """
    scores = wanda_scores(weight, sq_norm)
    if nm is not None:
        return nm_keep_mask(scores, *nm)
    return unstructured_keep_mask(scores, sparsity, per_row=True)


# --------------------------------------------------------------------------------------------
# SparseGPT
# --------------------------------------------------------------------------------------------


def accumulate_hessian(hessian: Tensor, nsamples: int, x: Tensor) -> tuple[Tensor, int]:
    """SparseGPT's running Hessian ``H = (2/n) sum_tokens x x^T`` (``n`` counted in sequences).

    Args:
        hessian: ``(d_in, d_in)`` fp32.
        nsamples: sequences seen so far.
        x: layer input, ``(b, seq, d_in)`` or ``(tokens, d_in)`` (then ``b = 1``).

    Reference:
        ``SparseGPT.add_batch`` in IST-DASLab/sparsegpt (https://arxiv.org/abs/2301.00774).
    """
    b = x.shape[0] if x.dim() == 3 else 1
    x2 = x.reshape(-1, x.shape[-1]).float()  # (..., d_in) -> (tokens, d_in)
    total = nsamples + b
    x2 = x2 * math.sqrt(2.0 / total)
    hessian = hessian * (nsamples / total) + x2.t() @ x2  # (d_in, tokens) @ (tokens, d_in)
    return hessian, total


#: Dampening attempts of :func:`_inverse_hessian_upper_cholesky`: ``damp * 10**a`` for ``a < 6``.
DAMPING_ATTEMPTS = 6


def _inverse_hessian_upper_cholesky(hessian: Tensor, percdamp: float) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of ``(H + damp I)^-1`` (fp32), retrying with 10x more damping if needed.

    Args:
        hessian: ``(d_in, d_in)`` fp32, dead inputs already handled.
        percdamp: first dampening as a fraction of ``mean(diag H)``.

    Returns:
        ``(Hinv (d_in, d_in) upper triangular, damping used, retries)`` where the damping is
        ``percdamp * mean(diag H) * 10**retries`` (``percdamp * 10**retries`` if that mean is not positive).

    Raises:
        RuntimeError: still not positive definite after :data:`DAMPING_ATTEMPTS` dampenings.
    """
    d = hessian.shape[0]
    diag = torch.arange(d, device=hessian.device)
    damp = percdamp * float(torch.mean(torch.diag(hessian)))
    if not math.isfinite(damp) or damp <= 0:
        damp = max(percdamp, 1e-8)
    last_error: Exception | None = None
    for attempt in range(DAMPING_ATTEMPTS):
        used = damp * 10**attempt
        h = hessian.clone()
        h[diag, diag] += used
        try:
            low = torch.linalg.cholesky(h)
            hinv = torch.cholesky_inverse(low)
            return torch.linalg.cholesky(hinv, upper=True), used, attempt
        except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
            last_error = exc
    raise RuntimeError(
        f"SparseGPT: the Hessian is not positive definite after {DAMPING_ATTEMPTS} dampenings up to "
        f"{damp * 10 ** (DAMPING_ATTEMPTS - 1):.6g} ({last_error})"
    )


class SparseGPTSolution(NamedTuple):
    """What :func:`sparsegpt_solve` computed for one layer.

    Attributes:
        weight: the pruned weight, fp32 ``(d_out, d_in)``.
        loss: the OBS loss per output row ``(d_out,)``.
        damping: the dampening ``lambda`` added to ``diag H`` (after any retries).
        retries: how many times the dampening was multiplied by 10 (0 when the first one worked).
    """

    weight: Tensor
    loss: Tensor
    damping: float
    retries: int


def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """``(new_weight, loss)`` of :func:`sparsegpt_solve` (same arguments; see there)."""
    out = sparsegpt_solve(weight, hessian, sparsity, nm=nm, blocksize=blocksize, percdamp=percdamp)
    return out.weight, out.loss


def sparsegpt_solve(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    *,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTSolution:
    """Prune one layer with SparseGPT (OBS-style reconstruction, lazy batch updates).

    Minimises ``||W X - W_hat X||^2`` over calibration inputs X subject to the sparsity pattern.
    Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and ``W_{:,j} = 0`` before dampening
    (``percdamp * mean(diag H)``, times 10 per failed Cholesky, at most 5 times; the value used is
    returned); ``Hinv`` is the upper Cholesky factor of ``H^-1``. Columns are
    processed in blocks of ``blocksize``; the unstructured mask of each block prunes exactly
    ``floor(s * rows * cols)`` entries with the smallest ``w^2 / Hinv_jj^2`` (adaptive across rows;
    block counts are cumulative, so the whole matrix loses exactly ``floor(s * numel)``);
    N:M masks are chosen every M columns from the weights as updated so far.

    Args:
        weight: ``(d_out, d_in)``, any float dtype (the update runs in fp32).
        hessian: ``(d_in, d_in)`` fp32 from :func:`accumulate_hessian` (not modified).
        sparsity: fraction pruned (ignored for N:M).
        nm: ``(N, M)`` — keep N of every M consecutive input weights; ``d_in % M == 0``.
        blocksize: lazy-update block width (rounded down to a multiple of M for N:M).
        percdamp: dampening as a fraction of the mean Hessian diagonal.

    Returns:
        A :class:`SparseGPTSolution`: the new weight fp32 ``(d_out, d_in)`` with exact zeros at the
        pruned positions (kept weights are updated to compensate), the loss per output row
        ``(d_out,)``, the dampening used and the number of retries.

    Raises:
        RuntimeError: the Hessian stays indefinite under every dampening (e.g. NaN statistics).

    Reference:
        Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
        One-Shot", https://arxiv.org/abs/2301.00774 (``SparseGPT.fasterprune``).
    """
    # Work on W^T so that a weight column is a contiguous row of memory in the per-column loop.
    wt = weight.detach().float().t().contiguous()  # (d_out, d_in) -> (d_in, d_out)
    cols, rows = wt.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"N:M pattern needs d_in % M == 0, got d_in={cols}, M={m}")
        blocksize = max(m, (blocksize // m) * m)
    h = hessian.detach().clone().float().to(wt.device)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    wt[dead, :] = 0.0
    hinv, damping, retries = _inverse_hessian_upper_cholesky(h, percdamp)
    del h
    losses = torch.zeros(rows, device=wt.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = wt[i1:i2].clone()  # (count, rows): columns i1..i2 of W, updated in place below
        err1 = torch.empty_like(w1)
        losses1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(hinv1).reshape(-1, 1)  # (count, 1)
        if nm is None:
            scores = (w1.pow(2) / d1.pow(2)).t()  # (count, rows) -> (rows, count)
            # exact per-matrix count: the cumulative target up to this block minus what is pruned
            k = int(sparsity * rows * i2) - int(sparsity * rows * i1)
            prune1 = lowest_k_mask(scores.reshape(-1), k).view(rows, count).t()  # (count, rows)
        else:
            prune1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                scores = (w1[i : i + m].pow(2) / d1[i : i + m].pow(2)).t()  # (M, rows) -> (rows, M)
                prune1[i : i + m] = lowest_k_mask(scores, m - nm[0]).t()  # (rows, M) -> (M, rows)
            col = w1[i]  # (rows,)
            q = col.masked_fill(prune1[i], 0.0)
            e = (col - q) / hinv1[i, i]
            losses1[i] = e.pow(2)
            # outer product (count - i, 1) * (1, rows) -> (count - i, rows); elementwise, not a
            # BLAS call: per-column GEMMs this small are dominated by threading overhead
            w1[i:] -= hinv1[i, i:].unsqueeze(1) * e.unsqueeze(0)
            w1[i] = q  # exact zeros at the pruned positions
            err1[i] = e
        wt[i1:i2] = w1
        losses += losses1.sum(0) / 2
        # (cols - i2, count) @ (count, rows) -> (cols - i2, rows)
        wt[i2:] -= hinv[i1:i2, i2:].t() @ err1
    w = wt.t().contiguous()  # (d_in, d_out) -> (d_out, d_in)
    return SparseGPTSolution(w, losses, damping, retries)


# ------------------------------------------------------------------------------------------------
# the sparsity a merge must keep

#: N:M patterns recognised on a base when ``pattern`` is not given (checked in this order).
DETECTED_PATTERNS = ((2, 4), (4, 8), (1, 4))


class SparsityError(RuntimeError):
    """A merge would have (or has) made a pruned weight non-zero."""


def detect_nm(zero: torch.Tensor) -> tuple[int, int] | None:
    """The first of :data:`DETECTED_PATTERNS` that the zero pattern ``zero`` (d_out, d_in) satisfies."""
    for n, m in DETECTED_PATTERNS:
        if zero.shape[1] % m == 0 and check_nm((~zero).to(torch.float32), n, m):
            return n, m
    return None
