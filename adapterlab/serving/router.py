"""Adapter banks and the per-batch router that every :class:`MultiAdapterLinear` reads.

The router owns all adapter tensors of a served model:

* a LoRA bank per module: ``A [S + 1, r, d_in]`` and ``B [S + 1, d_out, r]`` stacked over the S cache
  slots (slot S stays zero = "no adapter"; ranks below the bank's r are zero-padded);
* SHiRA adapters as sparse COO entries per module (fused into the base weights when a whole batch
  shares one SHiRA adapter: ``W[I] += v``, restored exactly from the saved entries afterwards);
* shared-basis bundles: per module ``U [G, d_out, c]``, ``V [G, c, d_in]``, cores and cluster ids.

Before a forward the server calls :meth:`BatchRouter.set_batch` with one adapter spec per row; the
row grouping is computed there once and reused by every layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from adapterlab.serving.kernels import (
    BundlePlan,
    RowPlan,
    lora_delta,
    plan_bundle,
    plan_rows,
    shared_basis_apply,
    sparse_delta,
)
from adapterlab.serving.layer import MultiAdapterLinear, dense_shira, reference_delta

__all__ = ["BatchRouter", "RowSpec", "wrap_linear"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSpec:
    """Which adapter one batch row uses: ``kind`` lora (key = slot), bundle (key = (bundle, index)),
    shira (key = adapter name)."""

    kind: str
    key: object


def wrap_linear(model: nn.Module, name: str, router: BatchRouter) -> MultiAdapterLinear:
    """Replace ``model.<name>`` (a linear layer) by a :class:`MultiAdapterLinear` (idempotent)."""
    module = model.get_submodule(name)
    if isinstance(module, MultiAdapterLinear):
        if module._router is not router:
            raise ValueError(
                f"module {name!r} is already wrapped by another AdapterServer; serve a fresh copy of the base"
            )
        return module
    if not isinstance(module, nn.Linear):
        raise ValueError(f"module {name!r} is a {type(module).__name__}; adapters can be served on linear layers only")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = MultiAdapterLinear(module, name, router)
    setattr(parent, child, wrapper)
    router.wrappers[name] = wrapper
    return wrapper


class BatchRouter:
    """Adapter banks plus the adapter choice of the current batch.

    Args:
        capacity: number of LoRA cache slots S.
        dtype: dtype of the banks (the model's compute dtype).
        device: where the banks live (the model's device).
        plan_mode: ``auto`` | ``grouped`` | ``gather`` (see :func:`~adapterlab.serving.kernels.plan_rows`).
    """

    def __init__(
        self,
        capacity: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        plan_mode: str = "auto",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if plan_mode not in ("auto", "grouped", "gather"):
            raise ValueError(f"plan_mode {plan_mode!r} is not one of auto, grouped, gather")
        self.capacity = capacity
        self.null = capacity
        self.dtype = dtype
        self.device = torch.device(device)
        self.plan_mode = plan_mode
        self.rank = 0
        self.wrappers: dict[str, MultiAdapterLinear] = {}
        self.lora: dict[str, tuple[Tensor, Tensor]] = {}
        self.shira: dict[str, dict[str, tuple[Tensor, Tensor, Tensor]]] = {}
        self.bundles: dict[str, dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]] = {}
        self.reference = False  # True: every layer runs the plain per-row loop (tests)
        self.fused: str | None = None
        self._saved: dict[str, tuple[Tensor, Tensor]] = {}
        self._rows: list[RowSpec | None] | None = None
        self._plan: RowPlan | None = None
        self._bundle_rows: dict[str, BundlePlan] = {}
        self._shira_rows: dict[str, Tensor] = {}

    # -- LoRA bank ---------------------------------------------------------------------------

    def _grow(self, rank: int) -> None:
        pad = rank - self.rank
        for name, (A, B) in self.lora.items():
            A = torch.cat([A, A.new_zeros(A.shape[0], pad, A.shape[2])], 1)  # [S+1, r, d_in] -> [S+1, r', d_in]
            B = torch.cat([B, B.new_zeros(B.shape[0], B.shape[1], pad)], 2)  # [S+1, d_out, r] -> [S+1, d_out, r']
            self.lora[name] = (A, B)
        self.rank = rank

    def _bank(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self.lora:
            w = self.wrappers[name]
            S1, r = self.capacity + 1, self.rank
            self.lora[name] = (
                torch.zeros(S1, r, w.in_features, dtype=self.dtype, device=self.device),
                torch.zeros(S1, w.out_features, r, dtype=self.dtype, device=self.device),
            )
        return self.lora[name]

    @torch.no_grad()
    def write_lora(self, slot: int, factors: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Put one adapter's ``{module: (B [d_out, r], A [r, d_in])}`` (scale folded) into ``slot``."""
        if not 0 <= slot < self.capacity:
            raise ValueError(f"slot {slot} is outside the cache (capacity {self.capacity})")
        r = max((int(a.shape[0]) for _, a in factors.values()), default=0)
        if r > self.rank:
            self._grow(r)
        self.clear_slot(slot)
        for name, (b, a) in factors.items():
            A, B = self._bank(name)
            A[slot, : a.shape[0]] = a.to(device=self.device, dtype=self.dtype)
            B[slot, :, : b.shape[1]] = b.to(device=self.device, dtype=self.dtype)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        for A, B in self.lora.values():
            A[slot].zero_()
            B[slot].zero_()

    # -- SHiRA -------------------------------------------------------------------------------

    def add_shira(self, name: str, entries: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        """Register a SHiRA adapter: ``{module: (flat indices [K] into the weight, values [K])}``."""
        coo: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        for mod, (flat, values) in entries.items():
            d_in = self.wrappers[mod].in_features
            flat = flat.to(device=self.device, dtype=torch.long)
            coo[mod] = (flat // d_in, flat % d_in, values.to(device=self.device, dtype=torch.float32))
        self.shira[name] = coo

    def remove_shira(self, name: str) -> None:
        if self.fused == name:
            self.unfuse()
        self.shira.pop(name, None)

    @torch.no_grad()
    def fuse(self, name: str) -> bool:
        """Rapid switching: scatter SHiRA adapter ``name`` into the base weights (previous one restored).

        Returns False (and changes nothing) when a targeted base weight is not a float tensor
        (a quantized base): such batches use the unfused sparse path.
        """
        if self.fused == name:
            return True
        entries = self.shira[name]
        if any(not self.wrappers[m].base_layer.weight.is_floating_point() for m in entries):
            return False
        self.unfuse()
        for mod, (rows, cols, values) in entries.items():
            W = self.wrappers[mod].base_layer.weight
            flat = rows * W.shape[1] + cols
            view = W.data.view(-1)
            old = view[flat].clone()
            self._saved[mod] = (flat, old)
            view[flat] = (old.float() + values).to(W.dtype)  # W[I] += v in fp32, cast once
        self.fused = name
        return True

    @torch.no_grad()
    def unfuse(self) -> None:
        """Restore the base entries saved by :meth:`fuse` exactly."""
        for mod, (flat, old) in self._saved.items():
            self.wrappers[mod].base_layer.weight.data.view(-1)[flat] = old
        self._saved.clear()
        self.fused = None

    # -- shared-basis bundles -----------------------------------------------------------------

    def add_bundle(self, key: str, tensors: Mapping[str, tuple[Tensor, Tensor, Tensor, Tensor]]) -> None:
        """Register a bundle: ``{module: (U [G, d_out, c], V [G, c, d_in], cores, group [n])}``."""
        self.bundles[key] = {
            mod: (
                U.to(device=self.device, dtype=self.dtype).contiguous(),
                V.to(device=self.device, dtype=self.dtype).contiguous(),
                cores.to(device=self.device, dtype=self.dtype).contiguous(),
                group.to(device=self.device, dtype=torch.long),
            )
            for mod, (U, V, cores, group) in tensors.items()
        }

    def remove_bundle(self, key: str) -> None:
        self.bundles.pop(key, None)

    # -- the batch ---------------------------------------------------------------------------

    def set_batch(self, rows: Sequence[RowSpec | None]) -> None:
        """Set the adapter of every row of the next forwards (one spec per request, None = base)."""
        B = len(rows)
        slots = torch.full((B,), self.null, dtype=torch.long)
        bundle_rows: dict[str, Tensor] = {}
        shira_rows: dict[str, list[int]] = {}
        for b, spec in enumerate(rows):  # one pass over requests (not tokens) to build index tensors
            if spec is None:
                continue
            if spec.kind == "lora":
                slots[b] = int(spec.key)  # type: ignore[call-overload]
            elif spec.kind == "bundle":
                key, idx = spec.key  # type: ignore[misc]
                bundle_rows.setdefault(key, torch.full((B,), -1, dtype=torch.long))[b] = int(idx)
            elif spec.kind == "shira":
                shira_rows.setdefault(str(spec.key), []).append(b)
            else:
                raise ValueError(f"row {b}: adapter kind {spec.kind!r} is not one of lora, bundle, shira")
        self._rows = list(rows)
        self._plan = plan_rows(slots.to(self.device), self.null, mode=self.plan_mode)
        self._bundle_rows = {}
        for key, rows_k in bundle_rows.items():  # host-side planning once per batch, none per layer
            group = next(iter(self.bundles[key].values()))[3]
            bplan = plan_bundle(rows_k.to(self.device), group)
            if bplan is not None:
                self._bundle_rows[key] = bplan
        self._shira_rows = {k: torch.tensor(v, device=self.device) for k, v in shira_rows.items()}
        only = next(iter(shira_rows)) if len(shira_rows) == 1 else None
        if only is not None and len(shira_rows[only]) == B and self.fuse(only):
            self._shira_rows = {}
        elif self.fused is not None:
            self.unfuse()

    def clear_batch(self) -> None:
        """Forget the batch (the fused SHiRA adapter stays fused until a batch needs another)."""
        self._rows = None
        self._plan = None
        self._bundle_rows = {}
        self._shira_rows = {}

    @property
    def batch_size(self) -> int | None:
        return None if self._rows is None else len(self._rows)

    # -- the per-layer delta -----------------------------------------------------------------

    def dense_delta(self, name: str, spec: RowSpec | None) -> Tensor | None:
        """The weight-layout delta of one row's adapter in module ``name`` (reference path)."""
        if spec is None:
            return None
        if spec.kind == "lora":
            if name not in self.lora:
                return None
            A, B = self.lora[name]
            return B[int(spec.key)] @ A[int(spec.key)]  # type: ignore[call-overload]  # [d_out, r] @ [r, d_in]
        if spec.kind == "bundle":
            key, i = spec.key  # type: ignore[misc]
            if name not in self.bundles[key]:
                return None
            U, V, cores, group = self.bundles[key][name]
            g = int(group[i])
            core = cores[i] if cores.dim() == 3 else torch.diag(cores[i])
            return U[g] @ core @ V[g]  # [d_out, c] @ [c, c] @ [c, d_in]
        if self.fused == spec.key:
            return None  # already inside the base weight
        entries = self.shira[str(spec.key)].get(name)
        if entries is None:
            return None
        rows, cols, values = entries
        w = self.wrappers[name]
        return dense_shira((w.out_features, w.in_features), rows * w.in_features + cols, values)

    def delta(self, name: str, x: Tensor) -> Tensor | None:
        """The adapter delta of module ``name`` for input ``x [B, T, d_in]`` (None: nothing to add)."""
        if self._rows is None:
            return None
        B = len(self._rows)
        squeeze = False
        if x.dim() == 2 and x.shape[0] == B:
            x, squeeze = x.unsqueeze(1), True  # [B, d_in] -> [B, 1, d_in]
        if x.dim() != 3 or x.shape[0] != B:
            raise RuntimeError(
                f"module {name!r}: input of shape {list(x.shape)} does not have the batch's {B} rows first"
            )
        xc = x if x.dtype == self.dtype else x.to(self.dtype)
        if self.reference:
            out: Tensor | None = reference_delta(xc, [self.dense_delta(name, s) for s in self._rows])
            if out is not None and out.shape[-1] == 0:
                out = None
        else:
            out = None
            if name in self.lora and self._plan is not None:
                A, Bf = self.lora[name]
                out = lora_delta(xc, A, Bf, self._plan)
            for key, bplan in self._bundle_rows.items():
                factors = self.bundles[key].get(name)
                if factors is not None:
                    d = shared_basis_apply(xc, *factors[:3], bplan)
                    out = d if out is None else out + d
            for adapter, idx in self._shira_rows.items():
                coo = self.shira[adapter].get(name)
                if coo is None:
                    continue
                rows_i, cols_i, values = coo
                d = sparse_delta(xc[idx], rows_i, cols_i, values.to(xc.dtype), self.wrappers[name].out_features)
                if out is None:
                    out = xc.new_zeros(B, x.shape[1], d.shape[-1])
                out.index_add_(0, idx, d)  # rows of this SHiRA adapter only
        if out is not None and squeeze:
            out = out.squeeze(1)
        return out
