"""``SppModel``: the peft tuner for SPP (built by ``peft.get_peft_model``).

Reference:
    Lu et al., SPP, https://arxiv.org/abs/2405.16057.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from adapterlab.tuners._lowrank import check_loaded_shapes, check_target_modules, replace_with, tuner_layers
from adapterlab.tuners.spp.config import NAME, PREFIX, SppConfig
from adapterlab.tuners.spp.functional import check_patterns, zeros_preserved
from adapterlab.tuners.spp.layer import SppLayer


class SppModel(BaseTuner):
    """peft tuner model for :class:`SppConfig`.

    Besides peft's API (merge, unmerge, disable_adapter, merge_and_unload, save/load) it offers
    ``delta_weights`` and ``check_sparsity``; a ``PeftModel`` forwards these look-ups to it.
    Loading an adapter onto a base whose nonzero pattern differs from the one it was trained on
    raises ``ValueError`` (a digest of each layer's pattern is saved, never the mask).
    """

    prefix: str = PREFIX
    tuner_layer_cls = SppLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: SppConfig, adapter_name: str) -> None:
        check_target_modules(model, config.target_modules)

    def _create_and_replace(
        self,
        peft_config: SppConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        replace_with(self, SppLayer, peft_config, adapter_name, target, target_name, parent, current_key, NAME)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_shapes(model, out)
        check_patterns(model.state_dict(), out, ".spp_pattern.")
        return out

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def delta_weights(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Module key -> ``Delta W`` (fp32, ``(d_out, d_in)``), one layer at a time in the caller's loop."""
        name = self._adapter(adapter_name)
        return {k: layer.delta_weight(name) for k, layer in tuner_layers(self.model, SppLayer) if name in layer.spp_alpha}

    def check_sparsity(self, adapter_name: str | None = None) -> bool:
        """True when merging ``adapter_name`` keeps every zero of every adapted base weight zero."""
        name = self._adapter(adapter_name)
        for _, layer in tuner_layers(self.model, SppLayer):
            if name in layer.spp_alpha:
                w0 = layer.base_weight().detach()
                if not zeros_preserved(w0, (w0.float() + layer.delta_weight(name)).to(w0.dtype)):
                    return False
        return True
