"""Pure tensor functions of LoRS: the masked low-rank linear with weight recompute (a custom
autograd Function) and the gradient-based (LoRA-GA-like) initialisation of ``A``.

Effective weight of one layer (``M = 1[W != 0]``, the base's keep mask)::

    W' = W + s * (B A) ⊙ M        A (r, d_in), B (d_out, r), s = alpha / sqrt(r) (rsLoRA) or alpha / r

The forward forms ``W'`` on the fly and saves only ``x, W, A, B`` (``W`` is the frozen parameter
itself, so nothing new is stored); the backward recomputes ``W'`` for ``dL/dx``. The factor
gradients are either

* ``exact`` (default): the true gradient of the masked objective, ``dB = s (G ⊙ M) A^T`` and
  ``dA = s B^T (G ⊙ M)`` with ``G = g^T x``; ``G`` is one transient ``d_out x d_in`` buffer of this
  layer, freed at once (nothing dense is kept between forward and backward); or
* ``low_rank_ste``: the reference implementation's graph rearrangement, ``dB = s g^T (x A^T)`` and
  ``dA = s (g B)^T x`` (the gradient of the *unmasked* LoRA: the mask is treated as identity in the
  backward, a straight-through approximation; no dense buffer at all). The reference also drops
  the factor ``s``; here it is kept, so SGD and Adam see the same direction as unmasked LoRA.

Reference:
    Hu et al., LoRS: Efficient Low-Rank Adaptation for Sparse Large Language Model,
    https://arxiv.org/abs/2501.08582 (official code hyx1999/LoRS); the initialisation follows
    LoRA-GA, https://arxiv.org/abs/2407.05000.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: Gradient modes of the LoRS factors (see the module docstring).
GRAD_MODES = ("exact", "low_rank_ste")


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: deltas are never formed in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def masked_delta(weight: Tensor, a: Tensor, b: Tensor, scale: float, zero: Tensor | None = None) -> Tensor:
    """``s * (B A) ⊙ 1[W != 0]`` in fp32 (fp64 for fp64 inputs), shape ``(d_out, d_in)``.

    ``zero`` (bool, ``W == 0``) may be passed when the caller already has it.

    Semantics:
        for i, j: D[i, j] = s * sum_k B[i, k] * A[k, j] if W[i, j] != 0 else 0
    """
    ct = compute_dtype(weight, a, b)
    ba = torch.mm(b.to(ct), a.to(ct)).mul_(scale)  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
    zero = (weight == 0) if zero is None else zero
    return ba.masked_fill_(zero, 0.0)


def effective_weight(
    weight: Tensor, a: Tensor, b: Tensor, scale: float, *, include_weight: bool = True, zero: Tensor | None = None
) -> Tensor:
    """``W + s (B A) ⊙ M`` (or only the masked delta), fp32/fp64 ``(d_out, d_in)``.

    With the weight included this is one fused ``addmm`` and one masked fill: at the zeros of
    ``W`` the sum is ``s (B A)`` alone, which the fill sets back to exactly 0.
    """
    if not include_weight:
        return masked_delta(weight, a, b, scale, zero)
    ct = compute_dtype(weight, a, b)
    w_eff = torch.addmm(weight.to(ct), b.to(ct), a.to(ct), alpha=scale)  # W + s B A, (d_out, d_in)
    zero = (weight == 0) if zero is None else zero
    return w_eff.masked_fill_(zero, 0.0)


class LorsLinearFunction(torch.autograd.Function):
    """``y = x W'^T + bias`` with ``W' = [W +] s (B A) ⊙ 1[W != 0]``, recomputing ``W'`` in backward.

    Semantics:
        Wp = (W if include_weight else 0) + s * (B @ A) * (W != 0)
        y = x @ Wp.T + bias
        backward (g = dL/dy, G = g^T x):
            dx = g @ Wp
            exact:         dB = s * (G * M) @ A.T ;  dA = s * B.T @ (G * M)
            low_rank_ste:  dB = s * g^T (x A^T)   ;  dA = s * (g B)^T x
            dW = G (only if W requires grad and include_weight) ; dbias = sum_tokens g
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        a: Tensor,
        b: Tensor,
        scale: float,
        include_weight: bool,
        grad_mode: str,
    ) -> Tensor:
        w_eff = effective_weight(weight, a, b, scale, include_weight=include_weight)  # (d_out, d_in) fp32
        y = torch.nn.functional.linear(x, w_eff.to(x.dtype), None if bias is None else bias.to(x.dtype))
        del w_eff  # never saved: recomputed in backward
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale = float(scale)
        ctx.include_weight = include_weight
        ctx.grad_mode = grad_mode
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, a, b = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        need_w = need_w and ctx.include_weight
        d_out, d_in = weight.shape
        g2 = grad_out.reshape(-1, d_out)  # (..., d_out) -> (N, d_out)
        x2 = x.reshape(-1, d_in)  # (..., d_in) -> (N, d_in)
        dx = dw = dbias = da = db = None
        exact_ab = (need_a or need_b) and ctx.grad_mode == "exact"
        zero = weight == 0 if (need_x or exact_ab) else None  # 1 - M, computed once for this backward
        if need_x:
            w_eff = effective_weight(weight, a, b, s, include_weight=ctx.include_weight, zero=zero)  # recompute
            dx = (g2 @ w_eff.to(g2.dtype)).reshape(x.shape)  # (N, d_out) @ (d_out, d_in) -> x's shape
            del w_eff
        if need_bias:
            dbias = g2.sum(0).to(ctx.bias_dtype)  # (d_out,)
        ct = compute_dtype(weight, a, b, x)
        af, bf = a.to(ct), b.to(ct)
        if need_w or exact_ab:
            grad_w = g2.to(ct).T @ x2.to(ct)  # G: (d_out, N) @ (N, d_in) -> (d_out, d_in), transient
            if need_w:
                dw = grad_w.to(weight.dtype)
                if exact_ab and dw.data_ptr() == grad_w.data_ptr():
                    dw = dw.clone()  # G is masked in place below
            if exact_ab:
                grad_w.masked_fill_(zero, 0.0)  # G ⊙ M
                if need_b:
                    db = ((grad_w @ af.T) * s).to(b.dtype)  # (d_out, d_in) @ (d_in, r) -> (d_out, r)
                if need_a:
                    da = ((bf.T @ grad_w) * s).to(a.dtype)  # (r, d_out) @ (d_out, d_in) -> (r, d_in)
            del grad_w
        if (need_a or need_b) and ctx.grad_mode == "low_rank_ste":
            gf, xf = g2.to(ct), x2.to(ct)
            if need_b:
                db = ((gf.T @ (xf @ af.T)) * s).to(b.dtype)  # (d_out, N) @ (N, r) -> (d_out, r)
            if need_a:
                da = (((gf @ bf).T @ xf) * s).to(a.dtype)  # (r, N) @ (N, d_in) -> (r, d_in)
        return dx, dw, dbias, da, db, None, None, None


def lors_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    a: Tensor,
    b: Tensor,
    scale: float,
    *,
    include_weight: bool = True,
    grad_mode: str = "exact",
) -> Tensor:
    """``x (W + s (B A) ⊙ 1[W != 0])^T + bias`` with weight recompute (see :class:`LorsLinearFunction`).

    Args:
        x: ``(..., d_in)``.
        weight: the frozen (pruned) base weight ``(d_out, d_in)``; its zeros are the mask.
        bias: ``(d_out,)`` or None.
        a: ``(r, d_in)``; b: ``(d_out, r)``; scale: ``s``.
        include_weight: False gives only the adapter term ``x (s (B A) ⊙ M)^T (+ bias)``.
        grad_mode: ``exact`` | ``low_rank_ste``.

    Returns:
        ``(..., d_out)`` in the dtype of ``x``.
    """
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"lors_grad={grad_mode!r} is not supported; choose one of: {', '.join(GRAD_MODES)}")
    return LorsLinearFunction.apply(x, weight, bias, a, b, float(scale), bool(include_weight), grad_mode)


def gradient_init_a(grad: Tensor, r: int, *, gamma: float = 1.0, niter: int = 4, seed: int = 0) -> Tensor:
    """``A = V^T[:r] / gamma`` from a randomised SVD ``grad ≈ U S V^T`` (fp32, ``(r, d_in)``).

    Args:
        grad: the mean gradient ``G (d_out, d_in)`` of the loss w.r.t. the base weight.
        r: rank; gamma: ``stable_gamma``; niter: power iterations (4 as the reference).
        seed: seeds the random sketch (the global RNG state is left untouched).

    The sketch size is ``q = min(4 r, d_out, d_in)``; ``torch.svd_lowrank`` is exact when
    ``rank(G) <= q``. If ``G`` has fewer than ``r`` nonzero singular values the remaining rows of A
    are still orthonormal (directions the calibration data did not reach).

    Semantics:
        U, S, V = svd(G); A = V[:, :r].T / gamma
    """
    d_out, d_in = grad.shape
    if r > min(d_out, d_in):
        raise ValueError(
            f"r={r} exceeds min(d_out, d_in)={min(d_out, d_in)} of a layer; choose r <= {min(d_out, d_in)}"
        )
    q = min(4 * r, d_out, d_in)
    devices = [grad.device] if grad.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(grad.float(), q=q, niter=niter)  # v: (d_in, q)
    return (v[:, :r].T / gamma).contiguous()  # (q, d_in) -> (r, d_in)
