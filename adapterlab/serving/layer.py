"""The multi-adapter linear layer and the plain reference loop that defines what it computes.

The server wraps each targeted ``nn.Linear`` of the base model in a :class:`MultiAdapterLinear`.
Before every forward it tells the shared :class:`~adapterlab.serving.router.BatchRouter` which
adapter each batch row (= request) uses; the layer then adds that row's adapter delta to the base
output. The fast paths in :mod:`adapterlab.serving.kernels` are tested against
:func:`reference_delta`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = ["MultiAdapterLinear", "RowDeltas", "reference_delta"]


class RowDeltas(Protocol):
    """What a :class:`MultiAdapterLinear` asks of its router (the server's
    :class:`~adapterlab.serving.router.BatchRouter`): the per-row delta of one layer, or None."""

    def delta(self, name: str, x: Tensor) -> Tensor | None:
        """``[B, T, d_out]`` adapter output of layer ``name`` for ``x [B, T, d_in]``, None if no row has one."""
        ...


def reference_delta(x: Tensor, deltas: Sequence[Tensor | None]) -> Tensor:
    """Per-row adapter delta by a plain loop over batch rows (the definition the kernels must match).

    Semantics:
        for b in range(B):                      # one request per row
            ΔW = deltas[b]                      # [d_out, d_in] weight-layout delta of row b's adapter
            out[b] = 0 if ΔW is None else x[b] @ ΔW.T
        where ΔW is, for the adapter a_b named by request b:
            LoRA:          s · B_a @ A_a              (s = α/r, or α/√r with rsLoRA)
            shared basis:  U_g @ Σ_a @ V_g            (diagonal: U_g @ diag(σ_a) @ V_g; g = cluster of a)
            SHiRA:         S_a (sparse, K entries)    (fused when the whole batch shares a: W[I] += v)
        and the layer returns base(x) + out.

    Args:
        x: ``[B, T, d_in]``.
        deltas: one dense ``[d_out, d_in]`` delta (or None) per row.

    Returns:
        ``[B, T, d_out]``.
    """
    if len(deltas) != x.shape[0]:
        raise ValueError(f"reference_delta: {len(deltas)} deltas for a batch of {x.shape[0]} rows")
    d_out = next((d.shape[0] for d in deltas if d is not None), 0)
    out = x.new_zeros(x.shape[0], x.shape[1], d_out)
    for b, delta in enumerate(deltas):
        if delta is not None:
            out[b] = x[b] @ delta.to(x.dtype).T  # [T, d_in] @ [d_in, d_out] -> [T, d_out]
    return out


class MultiAdapterLinear(nn.Module):
    """A base linear layer plus a per-row adapter delta chosen by a shared router.

    Semantics:
        y = base_layer(x)                                  # x [B, T, d_in]; B rows = B requests
        y[b] += x[b] @ ΔW_{a_b}.T   for every row b        # a_b = the adapter router.rows names
        (see :func:`reference_delta` for ΔW per adapter kind; rows without an adapter get the base only)

    The layer holds no adapter tensors itself: they live in the router's banks (stacked LoRA factors,
    shared-basis bundles, sparse SHiRA entries), so loading or evicting an adapter never touches the
    model's modules, and the base stays loaded once.

    Args:
        base_layer: the wrapped ``nn.Linear`` (or a bitsandbytes linear) of the base model.
        name: its module path in the base model (``model.layers.0.self_attn.q_proj``).
        router: the server's :class:`~adapterlab.serving.router.BatchRouter`.
    """

    def __init__(self, base_layer: nn.Module, name: str, router: RowDeltas) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        object.__setattr__(self, "_router", router)  # not a submodule / not in the state dict

    @property
    def weight(self) -> Tensor:  # some model code reads layer.weight.dtype/device
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        delta = self._router.delta(self.name, x)
        if delta is None:
            return y
        return y + delta.to(y.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def base_weight(module: nn.Module) -> Tensor:
    """The dense weight of a (possibly wrapped) linear layer, for checks and fused switching."""
    inner = module.base_layer if isinstance(module, MultiAdapterLinear) else module
    return inner.weight


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a bitsandbytes linear (which subclass it)."""
    return isinstance(module, nn.Linear) or isinstance(module, MultiAdapterLinear)


@torch.no_grad()
def dense_shira(shape: tuple[int, int], flat_idx: Tensor, values: Tensor) -> Tensor:
    """Dense ``[d_out, d_in]`` of a SHiRA delta (reference and tests only)."""
    out = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=values.device)
    out.index_add_(0, flat_idx.to(values.device), values.float())
    return out.view(shape)
