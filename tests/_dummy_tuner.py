"""A small real peft tuner that peft does not know, registered through ``adapterlab.peft_compat``.

Per target ``nn.Linear`` it adds a LoRA-like residual ``y = W x + s * B (A x)`` (A: r x d_in random,
B: d_out x r zeros, s = alpha / r) with exact merge/unmerge, built on peft's BaseTuner /
BaseTunerLayer. Importing this module registers it (the fresh-process test imports it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from torch import nn

from adapterlab.peft_compat import peft_type, register_tuner

NAME = "adapterlab_dummy"
PREFIX = "aldummy_"


@dataclass
class DummyConfig(PeftConfig):
    r: int = field(default=4)
    alpha: float = field(default=8.0)
    target_modules: list[str] | str | None = field(default=None)
    exclude_modules: list[str] | str | None = field(default=None)
    init_weights: bool = field(default=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type(NAME)
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")


class DummyLayer(BaseTunerLayer):
    adapter_layer_names = ("aldummy_A", "aldummy_B")
    other_param_names = ("scaling",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.aldummy_A = nn.ParameterDict({})
        self.aldummy_B = nn.ParameterDict({})
        self.scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def update_layer(self, adapter_name: str, config: DummyConfig) -> None:
        a = torch.empty(config.r, self.in_features)  # (r, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(self.out_features, config.r)  # (d_out, r)
        if not config.init_weights:
            nn.init.normal_(b, std=0.02)
        self.aldummy_A[adapter_name] = nn.Parameter(a)
        self.aldummy_B[adapter_name] = nn.Parameter(b)
        self.scaling[adapter_name] = config.alpha / config.r
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


class DummyLinear(nn.Module, DummyLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: DummyConfig, **kwargs: Any) -> None:
        super().__init__()
        DummyLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.aldummy_A[adapter], self.aldummy_B[adapter]
        return (b.float() @ a.float()) * self.scaling[adapter]  # (d_out, d_in)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.aldummy_A:
                continue
            w = self.get_base_layer().weight
            merged = w.data.float() + self.delta_weight(adapter)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs in merged weights of adapter {adapter}")
            w.data = merged.to(w.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            w = self.get_base_layer().weight
            w.data = (w.data.float() - self.delta_weight(adapter)).to(w.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.aldummy_A:
                continue
            a, b = self.aldummy_A[adapter], self.aldummy_B[adapter]
            result = result + ((x.to(a.dtype) @ a.T) @ b.T * self.scaling[adapter]).to(result.dtype)
        return result


class DummyModel(BaseTuner):
    prefix: str = PREFIX
    tuner_layer_cls = DummyLayer
    target_module_mapping = {"llama": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"]}

    def _create_and_replace(
        self,
        peft_config: DummyConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, DummyLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{NAME} supports nn.Linear only, got {type(target).__name__} at {current_key}")
        new_module = DummyLinear(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


register_tuner(NAME, DummyConfig, DummyModel, prefix=PREFIX)
