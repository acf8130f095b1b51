"""Pure tensor functions of SPP (sparsity-preserved PEFT) and the sparse-pattern helpers shared
with LoRS: the base mask's digest and the zeros-preserved check.

SPP adapts a (pruned) weight ``W (d_out, d_in)`` with a row matrix ``alpha (g, d_in)`` and a
column vector ``beta (d_out, 1)``; output row ``i`` uses row ``alpha[i // (d_out / g)]``::

    Delta W[i, j] = s * beta[i] * alpha[i // (d_out / g), j] * W[i, j]

so ``W + Delta W = W * (1 + s * beta alpha)`` rescales existing weights element-wise: every zero of
``W`` stays zero (unstructured and N:M patterns and the sparsity ratio survive merging exactly).

Reference:
    Lu et al., SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models,
    ICML 2024, https://arxiv.org/abs/2405.16057.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor

#: SPP forward implementations (see :func:`spp_extra`).
FORWARD_MODES = ("auto", "materialized", "grouped")

_MASK63 = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# SPP math


def check_groups(d_out: int, groups: int, where: str = "") -> None:
    """Raise ``ValueError`` unless ``groups`` divides ``d_out`` (naming the layer and valid choices)."""
    if d_out % groups:
        divisors = [d for d in (1, 2, 4, 8, 16, 32, 64, 128) if d_out % d == 0]
        loc = f" of {where}" if where else ""
        raise ValueError(
            f"groups={groups} does not divide the output size d_out={d_out}{loc}; SPP shares one row "
            f"vector per block of d_out/groups output rows, so groups must divide d_out, e.g. one of: "
            f"{', '.join(map(str, divisors))} (or leave this layer out of target_modules)"
        )


def expand_rows(alpha: Tensor, d_out: int) -> Tensor:
    """``R (d_out, d_in)``: row ``i`` is ``alpha[i // (d_out / g)]`` (consecutive blocks share a row)."""
    g = alpha.shape[0]
    return torch.repeat_interleave(alpha, d_out // g, dim=0)  # (g, d_in) -> (d_out, d_in)


def spp_delta(weight: Tensor, alpha: Tensor, beta: Tensor, scale: float) -> Tensor:
    """``Delta W = s * (beta 1^T ⊙ R) ⊙ W``, shape ``(d_out, d_in)``, in the dtype of ``alpha``.

    Semantics:
        for i in range(d_out): for j in range(d_in):
            D[i, j] = s * beta[i, 0] * alpha[i // (d_out // g), j] * W[i, j]
    """
    d_out = weight.shape[0]
    rows = expand_rows(alpha, d_out)  # (d_out, d_in)
    return (rows * weight.to(alpha.dtype)) * (scale * beta)  # (d_out, d_in) * (d_out, 1)


def merge_factor(alpha: Tensor, beta: Tensor, scale: float, d_out: int) -> Tensor:
    """``1 + s * beta alpha_{g(i)}`` (fp32, ``(d_out, d_in)``): the merged weight is ``W * factor``."""
    return 1.0 + expand_rows(alpha.detach().float(), d_out) * (scale * beta.detach().float())


def resolve_mode(mode: str, n_tokens: int, groups: int, d_out: int) -> str:
    """``auto`` picks ``grouped`` when ``n_tokens * groups <= 2 * d_out`` (few tokens, e.g. generation:
    g copies of the input are smaller than the two dense temporaries), else ``materialized``."""
    if mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode={mode!r} is not supported; choose one of: {', '.join(FORWARD_MODES)}")
    if mode != "auto":
        return mode
    return "grouped" if n_tokens * groups <= 2 * d_out else "materialized"


def spp_extra(x: Tensor, weight: Tensor, alpha: Tensor, beta: Tensor, scale: float, mode: str = "auto") -> Tensor:
    """The adapter's output ``x (s * beta ⊙ R ⊙ W)^T`` (without the base term ``x W^T``).

    Args:
        x: ``(..., d_in)`` adapter input (after dropout), in the dtype of ``alpha``.
        weight: the base weight ``W (d_out, d_in)`` (frozen, unmerged).
        alpha: ``(g, d_in)``; beta: ``(d_out, 1)``; scale: ``s``.
        mode: ``materialized`` (form ``Delta W``, one matmul; autograd keeps dense temporaries),
            ``grouped`` (the reference's memory-saving form: g batched matmuls on ``x ⊙ alpha_g``,
            no dense ``d_out x d_in`` temporary) or ``auto``.

    Returns:
        ``(..., d_out)``.

    Semantics:
        y[..., i] = s * beta[i] * sum_j x[..., j] * alpha[i // (d_out // g), j] * W[i, j]
    """
    d_out, d_in = weight.shape
    g = alpha.shape[0]
    n_tokens = x.numel() // d_in if d_in else 0
    if resolve_mode(mode, n_tokens, g, d_out) == "materialized":
        return x @ spp_delta(weight, alpha, beta, scale).T  # (..., d_in) @ (d_in, d_out) -> (..., d_out)
    w_groups = weight.to(alpha.dtype).view(g, d_out // g, d_in)  # (d_out, d_in) -> (g, d_out/g, d_in)
    xg = x.unsqueeze(-2) * alpha  # (..., 1, d_in) * (g, d_in) -> (..., g, d_in)
    out = torch.einsum("...gi,goi->...go", xg, w_groups)  # (..., g, d_out/g)
    out = out.reshape(*x.shape[:-1], d_out)  # (..., g, d_out/g) -> (..., d_out)
    return out * (scale * beta.view(d_out))  # (..., d_out) * (d_out,)


# ---------------------------------------------------------------------------------------------
# the base's sparsity pattern (shared with LoRS)


def pattern_digest(weight: Tensor) -> Tensor:
    """``int64 (4,)``: ``[d_out, d_in, nnz, h]`` of the keep mask ``W != 0`` (h: 63 bits of sha256).

    Stored with an adapter instead of the mask, so loading it onto a base with another sparsity
    pattern fails clearly (DESIGN.md: never store the mask, it is derived from the base).
    """
    import numpy as np

    mask = (weight.detach() != 0).to("cpu").contiguous()  # (d_out, d_in) bool
    digest = hashlib.sha256(np.packbits(mask.reshape(-1).numpy()).tobytes()).digest()
    h = int.from_bytes(digest[:8], "big") & _MASK63
    return torch.tensor([mask.shape[0], mask.shape[1], int(mask.sum()), h], dtype=torch.int64)


def check_patterns(model_state: Mapping[str, Tensor], loaded: Mapping[str, Tensor], marker: str) -> None:
    """Compare the pattern digests of a checkpoint (keys already mapped to the model, containing
    ``marker``, e.g. ``".spp_pattern."``, and ending in ``.digest``) with those of the base it is loaded onto.

    Raises:
        ValueError: naming the first layer whose nonzero pattern differs (trained vs this base).
    """
    for key, value in loaded.items():
        if marker not in key or not key.endswith(".digest") or key not in model_state:
            continue
        own = model_state[key].to(torch.int64).flatten()
        got = value.to(torch.int64).flatten()
        if got.numel() != 4 or not torch.equal(own, got):
            layer = key.split(marker)[0].removeprefix("base_model.model.")
            raise ValueError(
                f"cannot load adapter tensor {key!r}: the adapter was trained on a base whose layer "
                f"{layer!r} has another sparsity pattern (trained: d_out x d_in = {got[0]}x{got[1]} with "
                f"{got[2]} nonzeros; this base: {own[0]}x{own[1]} with {own[2]} nonzeros"
                f"{', same count but other positions' if torch.equal(own[:3], got[:3]) else ''}); "
                f"load it onto the pruned base it was trained on"
            )


def zeros_preserved(base_weight: Tensor, merged_weight: Tensor) -> bool:
    """True when ``(merged == 0) ⊇ (base == 0)``: every zero of the base is still zero."""
    return bool(((merged_weight == 0) | (base_weight != 0)).all())
