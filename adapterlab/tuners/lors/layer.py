"""LoRS tuner layer: ``y = x (W + s (B A) ⊙ 1[W != 0])^T + b`` with weight recompute.

Reference:
    Hu et al., LoRS, https://arxiv.org/abs/2501.08582.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from adapterlab.tuners._lowrank import LowRankLayer, lowrank_scale
from adapterlab.tuners.lors.config import NAME, LorsConfig
from adapterlab.tuners.lors.functional import compute_dtype, lors_linear
from adapterlab.tuners.spp.functional import pattern_digest
from adapterlab.tuners.spp.layer import PatternBuffer, SparsityViolation, check_dense_float_base


class LorsLayer(LowRankLayer):
    """One target linear layer with LoRS adapters.

    Semantics:
        M = (W != 0)                                       # the pruned base's keep mask
        one active adapter, no dropout:  y = x @ (W + s * (B @ A) * M).T + b     (one fused matmul)
        otherwise:                       y = base(x) + sum_a dropout_a(x) @ (s_a * (B_a @ A_a) * M).T
        merge:   W0 = W;  W = (W.float() + s * (B @ A) * M).to(W.dtype)   (zeros of W verified to stay zero)
        unmerge: W = W0 (bit-exact; one copy of the weight while merged). With exact_unmerge=False:
                 W -= s * (B @ A) * M, M from the merged weight plus the rare entries a merge
                 cancelled to exactly 0, recorded at merge time
    """

    adapter_layer_names = ("lors_A", "lors_B")
    other_param_names = ("r", "lora_alpha", "use_rslora", "exact_unmerge", "lors_grad", "lors_dropout", "lors_pattern")
    dropout_name = "lors_dropout"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LorsConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        check_dense_float_base(self.get_base_layer(), NAME, self.key)
        self.lors_A = nn.ParameterDict({})
        self.lors_B = nn.ParameterDict({})
        self.lors_dropout = nn.ModuleDict({})
        self.lors_pattern = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.lors_grad: dict[str, str] = {}
        #: flat indices of mask entries that a merge cancelled to exactly 0 (kept for unmerge)
        self._lost: torch.Tensor | None = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: LorsConfig, **kwargs: Any) -> None:
        r = config.r
        if r > min(self.in_features, self.out_features):
            raise ValueError(
                f"r={r} exceeds min(d_in, d_out)={min(self.in_features, self.out_features)} of {self.key}; "
                f"choose r <= {min(self.in_features, self.out_features)}"
            )
        a = torch.empty(r, self.in_features)  # (r, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, r)  # (d_out, r)
        if not config.init_weights:
            b = torch.randn(self.out_features, r) * 0.02
        self.lors_A[adapter_name] = nn.Parameter(a)
        self.lors_B[adapter_name] = nn.Parameter(b)
        self._add_dropout(adapter_name, config.lora_dropout)
        self.lors_pattern[adapter_name] = PatternBuffer(pattern_digest(self.get_base_layer().weight))
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.use_rslora[adapter_name] = config.use_rslora
        self.exact_unmerge[adapter_name] = config.exact_unmerge
        self.lors_grad[adapter_name] = config.lors_grad
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        a = self.lors_A[adapter]  # (r, d_in)
        b = self.lors_B[adapter]  # (d_out, r)
        return a, b, lowrank_scale(self.lora_alpha[adapter], self.r[adapter], self.use_rslora[adapter])

    # -- mask / delta ---------------------------------------------------------------------------
    def keep_mask(self) -> torch.Tensor:
        """Bool ``(d_out, d_in)``: the base's nonzeros (valid merged or unmerged)."""
        w = self._pre_merge[1] if self._pre_merge is not None else self.get_base_layer().weight
        keep = w.detach() != 0
        if self._lost is not None:
            keep.view(-1)[self._lost] = True
        return keep

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``s (B A) ⊙ M`` in fp32 (fp64 for fp64 weights), shape ``(d_out, d_in)``."""
        a, b, s = self.merge_factors(adapter)
        w = self.get_base_layer().weight
        ct = compute_dtype(w, a, b)
        delta = (b.detach().to(ct) @ a.detach().to(ct)) * s  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
        return delta.masked_fill_(~self.keep_mask(), 0.0)

    # -- merge ----------------------------------------------------------------------------------
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """``W += s (B A) ⊙ M`` per adapter (fp32, cast once), then verify every zero stayed zero."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lors_A:
                continue
            w = self.get_base_layer().weight
            keep = self.keep_mask()
            delta = self.delta_weight(adapter)
            merged = w.data.to(delta.dtype) + delta  # (d_out, d_in)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs/Infs in the merged weights of adapter {adapter!r}; the adapter is broken")
            merged = merged.to(w.dtype)
            if not bool(((merged == 0) | keep).all()):
                raise SparsityViolation(
                    f"merging LoRS adapter {adapter!r} into {self.key} would fill zeros of the sparse base; "
                    f"nothing was merged into this layer"
                )
            lost = ((merged == 0) & keep).view(-1).nonzero().squeeze(1)  # (n_lost,)
            if lost.numel():
                self._lost = lost if self._lost is None else torch.cat([self._lost, lost])
            self._keep_pre_merge(adapter, w.data)
            w.data = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Put the pre-merge weight back (bit-exact); adapters merged with ``exact_unmerge=False`` are
        subtracted, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self._restore_pre_merge()
        w = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lors_A:
                continue
            delta = self.delta_weight(adapter)
            w.data = (w.data.to(delta.dtype) - delta).to(w.dtype)
        self._lost = None

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lors_A]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        drop = self.lors_dropout
        first = active[0]
        if len(active) == 1 and not (
            drop[first].training and isinstance(drop[first], nn.Dropout) and drop[first].p > 0
        ):
            a, b, s = self.factors(first)
            return lors_linear(x, base.weight, base.bias, a, b, s, grad_mode=self.lors_grad[first])
        result = self.base_layer(x, *args, **kwargs)
        for adapter in active:
            a, b, s = self.factors(adapter)
            h = drop[adapter](x.to(a.dtype))  # (..., d_in)
            out = lors_linear(h, base.weight, None, a, b, s, include_weight=False, grad_mode=self.lors_grad[adapter])
            result = result + out.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"LorsLayer({super().__repr__()})"
