"""SHiRA tuner layer: K trainable fp32 values + one flat index per value, exact merge/unmerge.

Reference:
    Bhardwaj et al., SHiRA, https://arxiv.org/abs/2406.13175.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from adapterlab.quant import dequantize_weight, is_4bit, is_8bit
from adapterlab.tuners._lowrank import QuantizedMergeError, _base_features
from adapterlab.tuners.shira.config import ShiraConfig
from adapterlab.tuners.shira.functional import (
    DATA_MASK_TYPES,
    budget,
    index_dtype,
    layer_seed,
    mask_indices,
    scatter_delta,
    sparse_linear,
)

VALUES = "adapterlab_shira_values"
INDICES = "adapterlab_shira_indices"
DIMS = "adapterlab_shira_dims"


class PendingMaskError(RuntimeError):
    """A grad/snip adapter is trained before its mask was calibrated."""


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense ``(d_out, d_in)`` tensor (dequantized fp32 for bnb layers)."""
    if is_4bit(base) or is_8bit(base):
        return dequantize_weight(base)
    return base.weight.detach()


class ShiraLayer(nn.Module, BaseTunerLayer):
    """One target linear layer with SHiRA adapters.

    Per adapter: ``adapterlab_shira_values`` (fp32 parameter ``(K,)``), ``adapterlab_shira_indices``
    (int32/int64 buffer ``(K,)`` of sorted flat row-major positions ``row * d_in + col``) and
    ``adapterlab_shira_dims`` (int64 buffer ``(2,)`` = ``(d_out, d_in)``, so loading onto a base with
    other shapes fails clearly). The scale ``alpha`` (``shira_scaling``, 1.0 in training) is an
    inference knob.

    Merging caches the base values it overwrites; unmerge writes them back, so merge -> unmerge and
    adapter switching restore the base bit for bit in any dtype. However many adapters are merged
    (at once or one after another), the stored weight is the fp32 sum rounded once.

    Semantics:
        y = x (W + sum_a alpha_a S_a)^T + b,   S_a = scatter(indices_a, values_a) of shape (d_out, d_in)
        merge({a: w_a}):  U = union of I_a;  cache = W.flat[U]
                          W.flat[U] = (cache.float() + sum_a w_a * alpha_a * S_a.flat[U]).to(W.dtype)
        unmerge:          W.flat[U] = cache
    """

    adapter_layer_names = (VALUES,)
    other_param_names = (INDICES, DIMS, "shira_scaling", "shira_pending", "_dims")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: ShiraConfig, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _base_features(self.get_base_layer())
        self.key: str = str(kwargs.get("key", ""))
        self.adapterlab_shira_values = nn.ParameterDict({})
        self.adapterlab_shira_indices = BufferDict({}, persistent=True)
        self.adapterlab_shira_dims = BufferDict({}, persistent=True)
        self.shira_scaling: dict[str, float] = {}
        #: adapter -> why its indices are placeholders ("calibrate" for grad/snip, "load" for inference builds)
        self.shira_pending: dict[str, str] = {}
        #: adapter -> (d_out, d_in) it was built / trained for (mirrors the dims buffer without a device sync)
        self._dims: dict[str, tuple[int, int]] = {}
        #: (positions, base values) of the entries the merged adapters overwrote; None when unmerged
        self._merge_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        #: merged adapter -> fusion weight (alpha applied on top), parallel to merged_adapters
        self._merged_weights: dict[str, float] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    # -- adapters ------------------------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: ShiraConfig, **kwargs: Any) -> None:
        m, n = self.shape
        k = budget(m, n, density=config.density, r=config.r)
        base = self.get_base_layer()
        device = base.weight.device
        idx: torch.Tensor | None = None
        if config.inference_mode:
            self.shira_pending[adapter_name] = "load"  # indices come from the checkpoint
        elif config.mask_type in DATA_MASK_TYPES:
            self.shira_pending[adapter_name] = "calibrate"
        else:
            weight = base_weight(base) if config.mask_type == "wm" or config.respect_base_sparsity else None
            allowed = (weight != 0) if config.respect_base_sparsity else None
            idx = mask_indices(
                config.mask_type,
                self.shape,
                k,
                weight=weight,
                seed=layer_seed(config.random_seed, self.key),
                allowed=allowed,
            )
            self.shira_pending.pop(adapter_name, None)
        if idx is None:
            idx = torch.arange(k, dtype=torch.int64)  # placeholder (values are 0, so the delta is 0)
        if config.init_weights:
            values = torch.zeros(k)
        else:
            values = (
                torch.randn(
                    k, generator=torch.Generator().manual_seed(layer_seed(config.random_seed + 1, self.key) % 2**31)
                )
                * 0.02
            )
        self.adapterlab_shira_values[adapter_name] = nn.Parameter(values.to(device))
        self.adapterlab_shira_indices[adapter_name] = idx.to(index_dtype(m * n)).to(device)
        self.adapterlab_shira_dims[adapter_name] = torch.tensor([m, n], dtype=torch.int64, device=device)
        self._dims[adapter_name] = (m, n)
        self.shira_scaling[adapter_name] = 1.0
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move to the base layer's device only: values stay fp32 (bf16 would round small deltas away)."""
        target = device if device is not None else self.get_base_layer().weight.device
        for name in (VALUES, INDICES, DIMS):
            container = getattr(self, name)
            if adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)

    def set_indices_(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Fix the mask of ``adapter_name`` (sorted flat indices, exactly K of them); clears pending."""
        m, n = self.shape
        k = self.adapterlab_shira_values[adapter_name].numel()
        if indices.dim() != 1 or indices.numel() != k:
            raise ValueError(
                f"{self.key}: expected {k} flat indices for adapter {adapter_name!r}, got shape {tuple(indices.shape)}"
            )
        dev = self.adapterlab_shira_values[adapter_name].device
        self.adapterlab_shira_indices[adapter_name] = indices.to(index_dtype(m * n)).to(dev)
        self.shira_pending.pop(adapter_name, None)

    def delta_weight(self, adapter: str, weight: float = 1.0) -> torch.Tensor:
        """``weight * alpha * S`` as a dense fp32 ``(d_out, d_in)`` tensor (for tests and conversions)."""
        return scatter_delta(
            self.adapterlab_shira_indices[adapter],
            self.adapterlab_shira_values[adapter],
            self.shape,
            weight * self.shira_scaling[adapter],
        )

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.shira_scaling:
            self.shira_scaling[adapter] = float(scale)

    def check_adapter(self, adapter: str) -> None:
        """Raise ``ValueError`` unless ``adapter`` fits this layer (dims, lengths, index range)."""
        if adapter not in self.adapterlab_shira_values:
            raise ValueError(
                f"{self.key}: adapter {adapter!r} is not loaded; loaded: {', '.join(self.adapterlab_shira_values) or '(none)'}"
            )
        dims = self._dims.get(adapter, self.shape)
        if dims != self.shape:
            raise ValueError(
                f"{self.key}: adapter {adapter!r} was trained for a layer of shape {dims}, this layer is "
                f"{self.shape} (expected dims={self.shape})"
            )
        if self.adapterlab_shira_indices[adapter].numel() != self.adapterlab_shira_values[adapter].numel():
            raise ValueError(
                f"{self.key}: adapter {adapter!r} has {self.adapterlab_shira_values[adapter].numel()} values but "
                f"{self.adapterlab_shira_indices[adapter].numel()} indices"
            )

    # -- merge / unmerge ---------------------------------------------------------------------------
    def _writable_weight(self) -> torch.Tensor:
        base = self.get_base_layer()
        if is_4bit(base) or is_8bit(base):
            raise QuantizedMergeError(
                f"{self.key}: SHiRA fusion writes into the base weight, which is a bitsandbytes quantized tensor; "
                f"forward/training work unmerged, to fuse load the base unquantized (adapterlab.load_model)"
            )
        return base.weight

    def fuse_(self, adapter: str, weight: float = 1.0, *, safe_merge: bool = False) -> None:
        """Add ``weight * alpha * values`` of ``adapter`` to the base weight (see :meth:`fuse_many_`)."""
        self.fuse_many_({adapter: weight}, safe_merge=safe_merge)

    def fuse_many_(self, weights: Mapping[str, float], *, safe_merge: bool = False) -> None:
        """Write ``W_base + sum_a w_a alpha_a S_a`` into the base weight: the fp32 sum of every adapter on
        the touched entries only, added to the fp32 base values and cast once.

        Adapters merged before stay merged: they are folded into the same sum (from the cached base
        values), so the stored weight is always one rounding away from the base, whatever the order
        of the merges. No dense ``(d_out, d_in)`` delta is built.

        Args:
            weights: adapter name -> fusion weight ``w_a`` (the scale ``alpha_a`` is applied too).
            safe_merge: refuse (nothing written) when the result has NaN/Inf.

        Raises:
            ValueError: ``safe_merge`` and the merged entries are not finite.
        """
        fused = dict(self._merged_weights)
        for name, w in weights.items():
            fused[name] = fused.get(name, 0.0) + float(w)
        if not fused:
            return
        w = self._writable_weight()
        flat = w.data.view(-1)  # (m*n,) a view: the writes below change the parameter in place
        previous = None
        if self._merge_cache is not None:  # restore the base, then write the whole sum once
            prev_pos, prev_orig = self._merge_cache
            previous = (prev_pos, flat.index_select(0, prev_pos))  # what is stored now
            flat.index_put_((prev_pos,), prev_orig)
        pos, orig, new = self._fused_entries(w, fused)
        if safe_merge and not torch.isfinite(new).all():
            if previous is not None:  # nothing changes on failure
                flat.index_put_(previous[:1], previous[1])
            raise ValueError(
                f"NaNs/Infs in the merged weights of adapter(s) {sorted(weights)!r}; the adapter is broken"
            )
        flat.index_put_((pos,), new)
        self._merge_cache = (pos, orig)
        self._merged_weights = fused
        self.merged_adapters = list(fused)

    def _fused_entries(
        self, w: torch.Tensor, weights: Mapping[str, float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(positions (U,), base values (U,), fused values (U,))`` of the entries the adapters touch.

        Semantics:
            pos = sorted(union of I_a);  delta = zeros(U) fp32
            for a in weights: delta[pos.index(I_a)] += values_a * (w_a * alpha_a)     # adapter order
            fused = (W.flat[pos].float() + delta).to(W.dtype)
        """
        flat = w.data.view(-1)  # (m*n,) a view of the base weight
        names = list(weights)
        idxs = [self.adapterlab_shira_indices[a].to(w.device) for a in names]  # (K_a,) int32/int64
        vals = []
        for a in names:
            v = self.adapterlab_shira_values[a].detach().to(device=w.device, dtype=torch.float32)  # (K_a,)
            scale = float(weights[a]) * self.shira_scaling[a]
            vals.append(v if scale == 1.0 else v * scale)
        single = idxs[0] if len(idxs) == 1 else None
        if single is not None and (single.numel() < 2 or bool((single[1:] > single[:-1]).all())):
            pos, delta = single, vals[0]  # sorted and unique (the stored layout): no union needed
        else:
            cat = torch.cat([i.long() for i in idxs])  # (sum K_a,)
            pos, inverse = torch.unique(cat, sorted=True, return_inverse=True)  # (U,), (sum K_a,)
            delta = torch.zeros(pos.numel(), dtype=torch.float32, device=w.device)  # (U,)
            for part, v in zip(inverse.split([i.numel() for i in idxs]), vals):
                delta.index_add_(0, part, v)  # one adapter at a time: a fixed summation order
        orig = flat.index_select(0, pos)  # (U,) the base entries, kept for the exact unmerge
        new = (orig.float() + delta).to(w.dtype)  # fp32 add, one cast
        return pos, orig, new

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.adapterlab_shira_values]
        if names:
            self.fuse_many_(dict.fromkeys(names, 1.0), safe_merge=safe_merge)

    def unmerge(self) -> None:
        """Restore the cached base entries of every merged adapter (exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        w = self._writable_weight()
        if self._merge_cache is not None:
            pos, orig = self._merge_cache
            w.data.view(-1).index_put_((pos,), orig)
        self._merge_cache = None
        self._merged_weights = {}
        self.merged_adapters = []

    # -- forward -----------------------------------------------------------------------------------
    def _fused_path_ok(self, base: nn.Module) -> bool:
        """``x (W + S)^T`` in one matmul: a plain fp32 ``nn.Linear`` without hooks (pitfall: hooks on the base
        would be skipped); otherwise ``base(x) + x S^T`` with the delta in fp32."""
        return (
            type(base) is nn.Linear
            and base.weight.dtype == torch.float32
            and not (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks)
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.adapterlab_shira_values]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        for a in active:
            if (
                self.shira_pending.get(a) == "calibrate"
                and self.training
                and self.adapterlab_shira_values[a].requires_grad
            ):
                raise PendingMaskError(
                    f"adapter {a!r} has mask_type grad/snip and its mask is not calibrated yet; call "
                    f"model.calibrate_masks_(batches) or train with adapterlab.callbacks.ShiraMaskCallback"
                )
        if len(active) == 1:
            a = active[0]
            idx = self.adapterlab_shira_indices[a]
            vals = self.adapterlab_shira_values[a]
            if self.shira_scaling[a] != 1.0:
                vals = vals * self.shira_scaling[a]
        else:
            idx = torch.cat([self.adapterlab_shira_indices[a].long() for a in active])  # (sum K,)
            vals = torch.cat([self.adapterlab_shira_values[a] * self.shira_scaling[a] for a in active])
        base = self.get_base_layer()
        if self._fused_path_ok(base):
            out = sparse_linear(x.to(torch.float32), vals, idx, self.shape, weight=base.weight)
            if base.bias is not None:
                out = out + base.bias
            return out.to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        delta = sparse_linear(x.to(vals.dtype), vals, idx, self.shape)  # (..., d_out) fp32
        return result + delta.to(result.dtype)

    # -- loading -----------------------------------------------------------------------------------
    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Adopt the checkpoint's K (values/indices length) and check its shapes before copying."""
        m, n = self.shape
        for adapter in list(self.adapterlab_shira_values):
            vkey, ikey, dkey = (
                f"{prefix}{VALUES}.{adapter}",
                f"{prefix}{INDICES}.{adapter}",
                f"{prefix}{DIMS}.{adapter}",
            )
            if dkey in state_dict:
                dims = tuple(int(d) for d in state_dict[dkey].flatten().tolist())
                if dims != (m, n):
                    raise ValueError(
                        f"cannot load adapter tensor {dkey!r}: the adapter was trained on a layer of shape {dims}, "
                        f"the base model's layer is {(m, n)} (expected dims={(m, n)}; a base with other shapes)"
                    )
                self._dims[adapter] = (m, n)
            if vkey not in state_dict or ikey not in state_dict:
                continue
            values, indices = state_dict[vkey], state_dict[ikey]
            if values.dim() != 1 or indices.shape != values.shape:
                raise ValueError(
                    f"{vkey} and {ikey} must be 1-D of equal length, got {tuple(values.shape)} and {tuple(indices.shape)}"
                )
            if indices.is_floating_point():
                raise ValueError(f"{ikey} must be an integer tensor, got {indices.dtype}")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= m * n):
                raise ValueError(
                    f"cannot load {ikey}: flat indices must be in [0, {m * n}) for a ({m}, {n}) layer, got range "
                    f"[{int(indices.min())}, {int(indices.max())}]; the adapter was trained on a base with other shapes"
                )
            old = self.adapterlab_shira_values[adapter]
            if old.shape != values.shape:
                self.adapterlab_shira_values[adapter] = nn.Parameter(
                    torch.empty(values.shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
                )
            self.adapterlab_shira_indices[adapter] = torch.empty(
                indices.shape, dtype=index_dtype(m * n), device=old.device
            )
            self.shira_pending.pop(adapter, None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __repr__(self) -> str:
        return f"adapterlab_shira.{super().__repr__()}"
