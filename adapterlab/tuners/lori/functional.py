"""Pure tensor functions of LoRI: seeded random A, global magnitude masks, compact sparse B, concatenation.

Reference:
    Zhang et al., LoRI: Reducing Cross-Task Interference in Multi-Task Low-Rank Adaptation,
    https://arxiv.org/abs/2504.07448 (official code juzhengz/LoRI, src/extract_mask.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

_SEED_MASK = 2**63 - 1


def _digest_int(text: str) -> int:
    """First 8 bytes of sha256(text) as a non-negative int (stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") & _SEED_MASK


def derive_a_seed(task: str | None, seed: int = 0) -> int:
    """The default ``a_seed`` of a task: a stable digest of ``(task, seed)``."""
    return _digest_int(f"lori-a:{task or 'default'}:{int(seed)}")


def layer_seed(a_seed: int, key: str) -> int:
    """The seed of one layer's A: a stable digest of the adapter's ``a_seed`` and the module key."""
    return _digest_int(f"lori-layer:{int(a_seed)}:{key}")


def random_a(r: int, d_in: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A frozen random projection ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))`` of shape ``(r, d_in)``.

    The same distribution as peft's LoRA init (``kaiming_uniform_(a=sqrt(5))``), drawn on CPU from
    a generator seeded with ``seed``, so any process regenerates the identical matrix.
    """
    g = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(d_in)
    u = torch.rand(r, d_in, generator=g, dtype=torch.float64)  # (r, d_in) in [0, 1)
    return ((u * 2.0 - 1.0) * bound).to(dtype)


def kept_count(total: int, sparsity: float) -> int:
    """``k = floor((1 - sparsity) * total)`` entries kept (robust to float round-off)."""
    return int(math.floor((1.0 - float(sparsity)) * total + 1e-9))


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    scope: str = "global",
    exclude: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks from ``|B|``, keeping exactly ``k = floor((1 - sparsity) * T)`` entries.

    Args:
        weights: name -> B (any shape).
        sparsity: fraction masked, in [0, 1).
        scope: ``"global"``: one ranking over all matrices concatenated (the paper's default, so
            densities differ per matrix); ``"matrix"``: each matrix keeps its own k.
        exclude: name -> bool mask of entries that may not be chosen (an earlier task's mask in
            continual learning; the new mask is disjoint from it). Each mask has its matrix's shape.

    Returns:
        name -> bool mask of the same shape (True = trainable / kept).

    Raises:
        ValueError: ``sparsity`` or ``scope`` not allowed; an ``exclude`` key or shape that matches no
            matrix; or ``k`` larger than the entries left free by ``exclude`` (globally, or in one
            matrix for ``scope="matrix"``): the new mask would overlap the earlier one.

    Semantics:
        v = cat([|B_i|.flatten()]); v[excluded] = -1; require k <= #free
        idx = topk(v, k).indices; mask = zeros(T); mask[idx] = True;
        split back per matrix (global), or the same per matrix (matrix).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope not in ("global", "matrix"):
        raise ValueError(f"mask_scope={scope!r} is not supported; choose one of: global, matrix")
    names = list(weights)
    exclude = dict(exclude or {})
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ValueError(
            f"exclude has masks for unknown matrices {unknown[:3]}; expected keys of the B matrices, e.g. {names[0]!r}"
        )
    mags, free = [], []
    for n in names:
        m = weights[n].detach().abs().float().flatten()  # (numel,)
        if n in exclude:
            ex = exclude[n]
            if tuple(ex.shape) != tuple(weights[n].shape):
                raise ValueError(
                    f"exclude[{n!r}] has shape {tuple(ex.shape)}, expected {tuple(weights[n].shape)} (the shape of its B)"
                )
            ex = ex.flatten().bool().to(m.device)
            m = torch.where(ex, torch.full_like(m, -1.0), m)  # |B| >= 0 > -1: excluded entries rank last
            free.append(m.numel() - int(ex.sum()))
        else:
            free.append(m.numel())
        mags.append(m)
    if scope == "matrix":
        out = {}
        for n, m, f in zip(names, mags, free):
            k = kept_count(m.numel(), sparsity)
            _check_free(k, f, m.numel(), f"LoRI mask of {n!r} (matrix scope)")
            flat = torch.zeros(m.numel(), dtype=torch.bool)
            flat[torch.topk(m, k, sorted=False).indices] = True
            out[n] = flat.view(weights[n].shape)
        return out
    v = torch.cat(mags)  # (T,)
    k = kept_count(v.numel(), sparsity)
    _check_free(k, sum(free), v.numel(), f"LoRI global mask over {len(names)} B matrices ({names[0]!r}, ...)")
    flat = torch.zeros(v.numel(), dtype=torch.bool)
    flat[torch.topk(v, k, sorted=False).indices] = True
    pieces = flat.split([m.numel() for m in mags])
    return {n: p.view(weights[n].shape) for n, p in zip(names, pieces)}


def _check_free(k: int, free: int, total: int, where: str) -> None:
    """Refuse a mask that would have to reuse excluded entries (continual learning: masks are disjoint)."""
    if k > free:
        raise ValueError(
            f"{where}: asked for k={k} kept entries but only {free} of the {total} entries are free (not in the "
            f"excluded earlier mask); masks may not overlap: use sparsity >= {1.0 - free / total:.4g} or exclude less"
        )


def to_compact(dense: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (nnz,), indices (nnz,) int32)`` of the kept entries of ``dense`` (row-major flat indices)."""
    idx = mask.flatten().nonzero().squeeze(1)  # (nnz,) int64, sorted
    if dense.numel() >= 2**31:
        raise ValueError(f"matrix with {dense.numel()} entries is too large for int32 indices")
    return dense.detach().flatten()[idx].clone(), idx.to(torch.int32)


def from_compact(values: torch.Tensor, indices: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The dense matrix with ``values`` at the flat ``indices`` and zeros elsewhere (differentiable in ``values``)."""
    numel = int(math.prod(shape))
    flat = torch.zeros(numel, dtype=values.dtype, device=values.device)
    return flat.scatter(0, indices.long(), values).view(*shape)  # (d_out, r)


def concat_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]], weights: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate T low-rank adapters into one of rank ``sum r_t`` with scale 1 (peft's ``cat``).

    ``A_m = [w_1 s_1 A_1; ...; w_T s_T A_T]`` and ``B_m = [B_1, ..., B_T]``, so
    ``B_m A_m = sum_t w_t s_t B_t A_t`` exactly (no cross terms); block t of the result is task t.

    Args:
        factors: ``(A_t (r_t, d_in), B_t (d_out, r_t), s_t)`` per task.
        weights: ``w_t`` (default 1 each).

    Returns:
        ``(A_m (sum r_t, d_in), B_m (d_out, sum r_t))``.
    """
    if not factors:
        raise ValueError("concat_factors needs at least one adapter")
    w = [1.0] * len(factors) if weights is None else [float(x) for x in weights]
    if len(w) != len(factors):
        raise ValueError(f"weights has {len(w)} entries, expected one per adapter ({len(factors)})")
    a_m = torch.cat([wt * s * a.float() for (a, _, s), wt in zip(factors, w)], dim=0)  # (sum r, d_in)
    b_m = torch.cat([b.float() for (_, b, _) in factors], dim=1)  # (d_out, sum r)
    return a_m, b_m
