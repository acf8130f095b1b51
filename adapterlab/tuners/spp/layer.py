"""SPP tuner layer: ``y = base(x) + s * dropout(x) ((beta ⊙ R) ⊙ W)^T`` on a (pruned) linear layer.

Reference:
    Lu et al., SPP, https://arxiv.org/abs/2405.16057.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from adapterlab.quant import is_4bit, is_8bit
from adapterlab.tuners._lowrank import lowrank_scale
from adapterlab.tuners.spp.config import NAME, SppConfig
from adapterlab.tuners.spp.functional import check_groups, pattern_digest, spp_delta, spp_extra, zeros_preserved


class SparsityViolation(RuntimeError):
    """A merge would have turned a zero of the sparse base into a nonzero (a broken adapter)."""


class PatternBuffer(nn.Module):
    """Holds the base's pattern digest ``[d_out, d_in, nnz, h]`` (int64, saved with the adapter)."""

    def __init__(self, digest: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("digest", digest)


def check_dense_float_base(base: nn.Module, method: str, key: str) -> None:
    """Refuse bitsandbytes bases: SPP and LoRS read the dense weight (and its zeros) every forward."""
    if is_4bit(base) or is_8bit(base):
        bits = 4 if is_4bit(base) else 8
        raise ValueError(
            f"{method}: {key or type(base).__name__} is a bitsandbytes {bits}-bit layer; this tuner needs "
            f"the dense floating-point (pruned) weight; load the base unquantized (adapterlab.load_model)"
        )
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"{method}: {key} has no floating-point weight; expected a dense nn.Linear")


class SppLayer(nn.Module, BaseTunerLayer):
    """One target linear layer with SPP adapters.

    Semantics:
        for each active adapter a (alpha_a (g, d_in), beta_a (d_out, 1), s_a):
            for i, j: D[i, j] = s_a * beta_a[i] * alpha_a[i // (d_out // g), j] * W0[i, j]
            y += dropout_a(x) @ D.T
        merge:   W = W0 + sum_a D_a  (fp32, cast once; D_a from the pre-merge weight W0)
        unmerge: W = W0 (the pre-merge tensor is kept while merged: exact)
    """

    adapter_layer_names = ("spp_alpha", "spp_beta")
    other_param_names = ("r", "lora_alpha", "use_rslora", "groups", "forward_mode", "spp_dropout", "spp_pattern")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SppConfig, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.key: str = str(kwargs.get("key", ""))
        base = self.get_base_layer()
        check_dense_float_base(base, NAME, self.key)
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)
        self.spp_alpha = nn.ParameterDict({})
        self.spp_beta = nn.ParameterDict({})
        self.spp_dropout = nn.ModuleDict({})
        self.spp_pattern = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.groups: dict[str, int] = {}
        self.forward_mode: dict[str, str] = {}
        #: the base weight tensor before the first merge (exact unmerge; None while unmerged)
        self._pre_merge: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: SppConfig, **kwargs: Any) -> None:
        g = config.groups
        check_groups(self.out_features, g, self.key)
        alpha = torch.empty(g, self.in_features)  # (g, d_in)
        nn.init.kaiming_uniform_(alpha, a=math.sqrt(5))  # U(-1/sqrt(d_in), 1/sqrt(d_in))
        beta = torch.zeros(self.out_features, 1)  # (d_out, 1): Delta W = 0 at init
        if not config.init_weights:
            beta = torch.randn(self.out_features, 1) * 0.02
        self.spp_alpha[adapter_name] = nn.Parameter(alpha)
        self.spp_beta[adapter_name] = nn.Parameter(beta)
        p = float(config.lora_dropout)
        self.spp_dropout[adapter_name] = nn.Dropout(p) if p > 0 else nn.Identity()
        self.spp_pattern[adapter_name] = PatternBuffer(pattern_digest(self.base_weight()))
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.use_rslora[adapter_name] = config.use_rslora
        self.groups[adapter_name] = g
        self.forward_mode[adapter_name] = config.forward_mode
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    # -- pieces -------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        """The unmerged base weight ``W0 (d_out, d_in)`` (the pre-merge tensor while merged)."""
        return self._pre_merge if self._pre_merge is not None else self.get_base_layer().weight

    def scale(self, adapter: str) -> float:
        return lowrank_scale(self.lora_alpha[adapter], self.r[adapter], self.use_rslora[adapter])

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``Delta W`` of ``adapter`` in fp32, shape ``(d_out, d_in)`` (zero wherever ``W0`` is zero)."""
        alpha = self.spp_alpha[adapter].detach().float()
        beta = self.spp_beta[adapter].detach().float()
        return spp_delta(self.base_weight().detach().float(), alpha, beta, self.scale(adapter))

    # -- merge ----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W = W0 + Delta W`` per adapter (fp32, cast once); verifies every zero of ``W0`` stays zero."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.spp_alpha:
                continue
            w = self.get_base_layer().weight
            w0 = self.base_weight()
            merged = w.data.float() + self.delta_weight(adapter).to(w.device)  # (d_out, d_in) fp32
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs/Infs in the merged weights of adapter {adapter!r}; the adapter is broken")
            merged = merged.to(w.dtype)
            if not zeros_preserved(w0, merged):
                raise SparsityViolation(
                    f"merging SPP adapter {adapter!r} into {self.key} would fill zeros of the sparse base "
                    f"(non-finite adapter values?); nothing was merged into this layer"
                )
            if self._pre_merge is None:
                self._pre_merge = w.data
            w.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the exact pre-merge weight (all merged adapters are unmerged)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters.clear()
        if self._pre_merge is not None:
            self.get_base_layer().weight.data = self._pre_merge
            self._pre_merge = None

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        w0 = self.base_weight()
        for adapter in self.active_adapters:
            if adapter not in self.spp_alpha:
                continue
            alpha, beta = self.spp_alpha[adapter], self.spp_beta[adapter]
            h = self.spp_dropout[adapter](x.to(alpha.dtype))  # (..., d_in)
            out = spp_extra(h, w0, alpha, beta, self.scale(adapter), self.forward_mode[adapter])  # (..., d_out)
            result = result + out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"SppLayer({super().__repr__()})"
