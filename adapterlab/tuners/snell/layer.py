"""SNELL tuner layer: a kernel-generated ``n x m`` delta, sparsified by magnitude in every forward.

Reference:
    Shen et al., SNELL, https://arxiv.org/abs/2411.01800; SNELLA, https://arxiv.org/abs/2510.24037.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.utils.checkpoint import checkpoint

from adapterlab.quant import dequantize_weight, is_4bit, is_8bit, restore_weight_, set_weight_, snapshot_weight
from adapterlab.tuners._lowrank import _base_features, lowrank_scale
from adapterlab.tuners.snell.config import SnellConfig
from adapterlab.tuners.snell.functional import (
    drop_path,
    head_coefficients,
    keep_count,
    keep_mask,
    kernel_matrix,
    sparsify,
)


def _branch(h: torch.Tensor, delta_fn: Any, *params: torch.Tensor) -> torch.Tensor:
    """``h @ sparse_delta`` as one function, so activation checkpointing can recompute the kernel."""
    return h @ delta_fn(*params)  # (..., n) @ (n, m) -> (..., m)


class SnellLayer(nn.Module, BaseTunerLayer):
    """One target linear layer with SNELL adapters.

    Per adapter: parameters ``snell_P (H, n, r/H)`` and ``snell_Q (H, m, r/H)``, SNELLA's
    ``snell_mix = (alpha, gamma, beta)`` (kernel ``"snella"`` only), the int64 buffer
    ``snell_keep`` (how many of the ``n * m`` entries survive the competition; saved, so a per-layer
    budget set by ``SnellCallback`` round-trips) and, with ``zero_init_offset``, the initial
    ``snell_P0`` / ``snell_Q0`` (buffers).

    Merge snapshots the mask from the current parameters, adds ``scale * K_sparse^T`` in fp32 (cast
    once; bitsandbytes bases: dequantize, add, requantize) and keeps the overwritten weight, so
    unmerge restores it bit for bit.

    Semantics:
        K = kernel_matrix(P, Q, c, p, mix) [- kernel_matrix(P0, Q0, c, p, mix0)]     # (n, m)
        K_sparse = sparsify(K, keep [, tie_break=|kernel_matrix(P0, Q0, c, p, mix0)|])  # exactly `keep` non-zeros
        y = base(x) + scale * drop_path(dropout(x) @ K_sparse)
        merge: W <- W + scale * K_sparse.T   (fp32)
    """

    adapter_layer_names = ("snell_P", "snell_Q", "snell_mix")
    other_param_names = ("snell_keep", "snell_P0", "snell_Q0", "snell_dropout", "snell_spec")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SnellConfig, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _base_features(self.get_base_layer())
        self.key: str = str(kwargs.get("key", ""))
        self.snell_P = nn.ParameterDict({})
        self.snell_Q = nn.ParameterDict({})
        self.snell_mix = nn.ParameterDict({})
        self.snell_keep = BufferDict({}, persistent=True)
        self.snell_P0 = BufferDict({}, persistent=True)
        self.snell_Q0 = BufferDict({}, persistent=True)
        self.snell_dropout = nn.ModuleDict({})
        #: adapter -> dict(coeff, heads, norm_p, square, scale, drop_path, checkpoint)
        self.snell_spec: dict[str, dict[str, Any]] = {}
        #: per merged adapter (parallel to merged_adapters): the weight snapshot taken before merging
        self._merge_snapshots: list[dict[str, Any]] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    @property
    def numel(self) -> int:
        """Entries of the generated delta ``n * m``."""
        return self.in_features * self.out_features

    def update_layer(self, adapter_name: str, config: SnellConfig, **kwargs: Any) -> None:
        n, m, heads = self.in_features, self.out_features, config.heads
        p_in = torch.empty(heads, n, config.r // heads)  # (H, n, r/H)
        q_out = torch.empty(heads, m, config.r // heads)  # (H, m, r/H)
        nn.init.kaiming_uniform_(p_in, a=math.sqrt(5))
        nn.init.kaiming_uniform_(q_out, a=math.sqrt(5))
        self.snell_P[adapter_name] = nn.Parameter(p_in)
        self.snell_Q[adapter_name] = nn.Parameter(q_out)
        if config.kernel == "snella":
            self.snell_mix[adapter_name] = nn.Parameter(torch.tensor([1.0, 1.0, 0.0]))  # alpha, gamma, beta
        if config.zero_init_offset:
            self.snell_P0[adapter_name] = p_in.detach().clone()
            self.snell_Q0[adapter_name] = q_out.detach().clone()
        self.snell_keep[adapter_name] = torch.tensor(keep_count(n * m, config.sparsity), dtype=torch.int64)
        self.snell_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        scale = 1.0 if config.lora_alpha is None else lowrank_scale(config.lora_alpha, config.r, config.use_rslora)
        self.snell_spec[adapter_name] = {
            "coeff": float(config.coeff),
            "heads": int(heads),
            "norm_p": float(config.norm_p),
            "square": bool(config.snell_reference_square),
            "scale": scale,
            "drop_path": float(config.drop_path),
            "checkpoint": bool(config.checkpoint_kernel),
        }
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move to the base layer's device only: P, Q (and P0, Q0, mix) stay fp32 on a bf16/fp16 base
        (peft's autocast convention), instead of being rounded through the base dtype at init."""
        target = device if device is not None else self.get_base_layer().weight.device
        for name in self.adapter_layer_names + ("snell_keep", "snell_P0", "snell_Q0", "snell_dropout"):
            container = getattr(self, name)
            if adapter_name in container and not any(t.is_meta for t in container.parameters()):
                container[adapter_name] = container[adapter_name].to(target)

    def _has_adapter(self, adapter: str) -> bool:
        return adapter in self.snell_P

    # -- the delta ---------------------------------------------------------------------------
    def keep(self, adapter: str) -> int:
        """How many entries of the delta survive the competition."""
        return int(self.snell_keep[adapter])

    def sparsity(self, adapter: str) -> float:
        """The layer's current sparsity ``1 - keep / (n * m)``."""
        return 1.0 - self.keep(adapter) / self.numel

    def set_keep_(self, adapter: str, keep: int) -> None:
        """Set how many entries survive (``0 <= keep <= n * m``)."""
        if isinstance(keep, bool) or not 0 <= int(keep) <= self.numel:
            raise ValueError(f"keep for {self.key!r} must be in [0, {self.numel}], got {keep!r}")
        self.snell_keep[adapter].fill_(int(keep))

    def _kernel_fn(self, adapter: str) -> Any:
        """A function ``(P, Q[, mix]) -> (K - K0, |K0| or None)``: the dense generated delta ``(n, m)`` and,
        with ``zero_init_offset``, the tie-break score of the competition."""
        spec = self.snell_spec[adapter]
        has_offset = adapter in self.snell_P0

        def fn(p_in: torch.Tensor, q_out: torch.Tensor, *mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            coeffs = head_coefficients(spec["heads"], spec["coeff"], dtype=p_in.dtype).to(p_in.device)
            mix_t = mix[0] if mix else None
            k = kernel_matrix(p_in, q_out, coeffs, norm_p=spec["norm_p"], mix=mix_t)  # (n, m)
            if not has_offset:
                return k, None
            with torch.no_grad():
                mix0 = None if mix_t is None else torch.tensor([1.0, 1.0, 0.0], dtype=p_in.dtype, device=p_in.device)
                k0 = kernel_matrix(
                    self.snell_P0[adapter].to(p_in.dtype),
                    self.snell_Q0[adapter].to(p_in.dtype),
                    coeffs,
                    norm_p=spec["norm_p"],
                    mix=mix0,
                )  # (n, m)
            # Ties of |K - K0| (all n*m entries at step 0, where K == K0) go to the largest |K0|: the
            # entries the reference (no offset) keeps at step 0, decided by the seeded init alone.
            return k - k0, k0.abs()

        return fn

    def _delta_fn(self, adapter: str) -> Any:
        """A function ``(P, Q[, mix]) -> K_sparse (n, m)`` for ``adapter`` (offset and keep bound in).

        Make a new one per forward: it remembers its first selection threshold, so that the
        activation-checkpoint recomputation in backward (same P, Q) skips the ``kthvalue``.
        """
        spec = self.snell_spec[adapter]
        keep = self.keep(adapter)
        kernel = self._kernel_fn(adapter)
        cache: dict[str, Any] = {}  # selection thresholds, reused by the checkpoint recomputation

        def fn(p_in: torch.Tensor, q_out: torch.Tensor, *mix: torch.Tensor) -> torch.Tensor:
            k, tie_break = kernel(p_in, q_out, *mix)
            return sparsify(k, keep, reference_square=spec["square"], cache=cache, tie_break=tie_break)  # (n, m)

        return fn

    def selection(self, adapter: str) -> torch.Tensor:
        """The bool ``(n, m)`` mask of the entries that survive the competition with the current parameters.

        Largest ``|K - K0|`` first; ties (with ``zero_init_offset`` every entry ties at step 0) by the
        largest ``|K0|``, then by the lowest flat position.
        """
        with torch.no_grad():
            k, tie_break = self._kernel_fn(adapter)(*(p.detach() for p in self._params(adapter)))
            return keep_mask(k.abs(), self.keep(adapter), tie_break=tie_break)

    def _params(self, adapter: str) -> tuple[torch.Tensor, ...]:
        params = (self.snell_P[adapter], self.snell_Q[adapter])
        if adapter in self.snell_mix:
            params = params + (self.snell_mix[adapter],)
        return params

    def sparse_delta(self, adapter: str) -> torch.Tensor:
        """The sparsified generated delta ``K_sparse`` (input-major ``(n, m)``), differentiable."""
        return self._delta_fn(adapter)(*self._params(adapter))

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``scale * K_sparse^T`` in fp32, shaped like the base weight ``(d_out, d_in)``."""
        with torch.no_grad():
            k = self._delta_fn(adapter)(*(p.detach().float() for p in self._params(adapter)))  # (n, m)
        return k.T * self.snell_spec[adapter]["scale"]  # (n, m) -> (m, n)

    get_delta_weight = delta_weight

    # -- merge ---------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``scale * K_sparse^T`` of each adapter to the base weight (mask frozen from the current parameters)."""
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self._has_adapter(adapter):
                continue
            delta = self.delta_weight(adapter)  # (d_out, d_in) fp32
            current = dequantize_weight(base) if (is_4bit(base) or is_8bit(base)) else base.weight.detach().float()
            merged = current + delta.to(current.device)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs/Infs in the merged weights of adapter {adapter!r}; the adapter is broken")
            self._merge_snapshots.append(snapshot_weight(base))
            set_weight_(base, merged)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo :meth:`merge` exactly (restores the weight snapshots, last merged first)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        while self.merged_adapters:
            self.merged_adapters.pop()
            restore_weight_(base, self._merge_snapshots.pop())

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if not self._has_adapter(adapter):
                continue
            spec = self.snell_spec[adapter]
            params = self._params(adapter)
            h = self.snell_dropout[adapter](x.to(params[0].dtype))  # (..., n)
            fn = self._delta_fn(adapter)
            if spec["checkpoint"] and torch.is_grad_enabled() and any(p.requires_grad for p in params):
                out = checkpoint(_branch, h, fn, *params, use_reentrant=False)  # (..., m)
            else:
                out = _branch(h, fn, *params)  # (..., m)
            out = drop_path(out, spec["drop_path"], self.training)
            result = result + (out * spec["scale"]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({super().__repr__()})"
