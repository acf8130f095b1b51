"""DyLoRA tuner layer: full factors stored as per-component parameters, truncated at rank b.

Reference:
    Valipour et al., DyLoRA, https://arxiv.org/abs/2210.07558.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from adapterlab.tuners._lowrank import LowRankLayer
from adapterlab.tuners.dylora.config import DyLoraConfig
from adapterlab.tuners.dylora.functional import lowrank_scale


class RankComponents(nn.Module):
    """``n`` rank-1 components, each its own ``nn.Parameter``, stacked along ``dim`` on demand.

    One parameter per component lets the frozen-prefix mode be exact under any optimizer: the
    components outside the sampled one get no gradient (``grad is None``), and PyTorch optimizers
    skip such parameters entirely (no AdamW weight decay, no momentum). The state dict holds one
    stacked tensor ``weight`` (A: ``(r_max, d_in)``, B: ``(d_out, r_max)``), so the checkpoint has
    the plain full factors.
    """

    def __init__(self, full: torch.Tensor, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.n = full.shape[dim]
        for i, part in enumerate(full.unbind(dim)):  # n x (d,)
            self.register_parameter(f"c{i}", nn.Parameter(part.clone()))

    def part(self, i: int) -> nn.Parameter:
        return getattr(self, f"c{i}")

    def head(self, b: int, *, detach_prefix: bool = False) -> torch.Tensor:
        """The first ``b`` components stacked; with ``detach_prefix`` only the b-th one has a gradient."""
        parts = [self.part(i) for i in range(b)]
        if detach_prefix:
            parts = [p.detach() for p in parts[:-1]] + parts[-1:]
        return torch.stack(parts, dim=self.dim)  # A: (b, d_in); B: (d_out, b)

    def full(self) -> torch.Tensor:
        return self.head(self.n)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        w = self.full()
        destination[prefix + "weight"] = w if keep_vars else w.detach()

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
        key = prefix + "weight"
        for k in state_dict:
            if k.startswith(prefix) and k != key and "." not in k[len(prefix) :]:
                unexpected_keys.append(k)
        if key not in state_dict:
            missing_keys.append(key)
            return
        w = state_dict[key]
        expected = tuple(self.full().shape)
        if tuple(w.shape) != expected:
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, expected {expected}"
            )
            return
        with torch.no_grad():
            for i, row in enumerate(w.unbind(self.dim)):
                self.part(i).copy_(row)

    def extra_repr(self) -> str:
        return f"n={self.n}, dim={self.dim}"


class DyLoraLayer(LowRankLayer):
    """One target linear layer with DyLoRA adapters.

    Semantics:
        b = train_rank if training and a rank was sampled else rank
        A_b = A[:b]  (rows 0..b-2 detached in frozen mode while training);  B_b = B[:, :b]
        y = base(x) + (alpha / b) * dropout(x) A_b^T B_b^T        # alpha / sqrt(b) with rsLoRA
    """

    adapter_layer_names = ("dylora_A", "dylora_B")
    other_param_names = (
        "r",
        "r_min",
        "lora_alpha",
        "use_rslora",
        "exact_unmerge",
        "frozen_mode",
        "rank",
        "train_rank",
        "dylora_dropout",
    )
    dropout_name = "dylora_dropout"

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DyLoraConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.dylora_A = nn.ModuleDict({})
        self.dylora_B = nn.ModuleDict({})
        self.dylora_dropout = nn.ModuleDict({})
        self.r: dict[str, int] = {}
        self.r_min: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.frozen_mode: dict[str, bool] = {}
        self.rank: dict[str, int] = {}
        self.train_rank: dict[str, int | None] = {}
        self.merged_rank: dict[str, int] = {}
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def update_layer(self, adapter_name: str, config: DyLoraConfig, **kwargs: Any) -> None:
        r = config.r
        a = torch.empty(r, self.in_features)  # (r_max, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        bmat = torch.zeros(self.out_features, r)  # (d_out, r_max)
        if not config.init_weights:
            nn.init.normal_(bmat, std=0.02)
        self.dylora_A[adapter_name] = RankComponents(a, dim=0)
        self.dylora_B[adapter_name] = RankComponents(bmat, dim=1)
        self._add_dropout(adapter_name, config.lora_dropout)
        self.r[adapter_name] = r
        self.r_min[adapter_name] = config.r_min
        self.lora_alpha[adapter_name] = float(config.lora_alpha)
        self.use_rslora[adapter_name] = config.use_rslora
        self.exact_unmerge[adapter_name] = config.exact_unmerge
        self.frozen_mode[adapter_name] = config.frozen_mode
        self.rank[adapter_name] = config.active_eval_rank
        self.train_rank[adapter_name] = None
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def check_rank(self, adapter: str, rank: int) -> None:
        lo, hi = self.r_min[adapter], self.r[adapter]
        if isinstance(rank, bool) or not isinstance(rank, int) or not lo <= rank <= hi:
            raise ValueError(f"rank={rank!r} is outside the trained range [r_min, r_max] = [{lo}, {hi}]")

    def current_rank(self, adapter: str) -> int:
        """The rank forward uses now: the sampled train rank in training mode, else ``rank``."""
        tr = self.train_rank.get(adapter)
        return tr if (self.training and tr is not None) else self.rank[adapter]

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.factors_at(adapter, self.current_rank(adapter))

    def factors_at(self, adapter: str, b: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A_b (b, d_in), B_b (d_out, b), alpha / b)`` (frozen prefix detached while training)."""
        detach = self.frozen_mode[adapter] and self.training and torch.is_grad_enabled()
        a = self.dylora_A[adapter].head(b, detach_prefix=detach)  # (b, d_in)
        bm = self.dylora_B[adapter].head(b, detach_prefix=detach)  # (d_out, b)
        return a, bm, lowrank_scale(self.lora_alpha[adapter], b, self.use_rslora[adapter])

    def merge_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.factors_at(adapter, self.rank[adapter])

    def unmerge_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.factors_at(adapter, self.merged_rank.get(adapter, self.rank[adapter]))

    def _before_merge(self, adapter: str) -> None:
        self.merged_rank[adapter] = self.rank[adapter]

    def _after_unmerge(self, adapter: str) -> None:
        self.merged_rank.pop(adapter, None)

    def set_rank(self, adapter: str, rank: int) -> None:
        """Set the inference/merge rank; refuses while merged (merge/unmerge must use the same rank)."""
        self.check_rank(adapter, rank)
        if adapter in self.merged_adapters and rank != self.merged_rank.get(adapter):
            raise RuntimeError(
                f"adapter {adapter!r} is merged at rank {self.merged_rank.get(adapter)}; unmerge before set_rank({rank})"
            )
        self.rank[adapter] = rank

    def set_train_rank(self, adapter: str, rank: int | None) -> None:
        if rank is not None:
            self.check_rank(adapter, rank)
        self.train_rank[adapter] = rank
