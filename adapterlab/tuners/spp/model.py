"""``SppModel``: the peft tuner for SPP (built by ``peft.get_peft_model``).

Reference:
    Lu et al., SPP, https://arxiv.org/abs/2405.16057.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from adapterlab.tuners._lowrank import AdapterlabTuner, tuner_layers
from adapterlab.tuners.spp.config import NAME, PREFIX
from adapterlab.tuners.spp.functional import check_patterns, zeros_preserved
from adapterlab.tuners.spp.layer import SppLayer


class SppModel(AdapterlabTuner):
    """peft tuner model for :class:`SppConfig`.

    Besides peft's API (merge, unmerge, disable_adapter, merge_and_unload, save/load) it offers
    ``delta_weights`` and ``check_sparsity``; a ``PeftModel`` forwards these look-ups to it.
    Loading an adapter onto a base whose nonzero pattern differs from the one it was trained on
    raises ``ValueError`` (a digest of each layer's pattern is saved, never the mask).
    """

    prefix: str = PREFIX
    tuner_layer_cls = SppLayer
    tuner_name = NAME

    @classmethod
    def check_loaded(cls, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        super().check_loaded(model, state_dict)
        check_patterns(model.state_dict(), state_dict, ".spp_pattern.")

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def delta_weights(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Module key -> ``Delta W`` (fp32, ``(d_out, d_in)``), one layer at a time in the caller's loop."""
        name = self._adapter(adapter_name)
        return {
            k: layer.delta_weight(name) for k, layer in tuner_layers(self.model, SppLayer) if name in layer.spp_alpha
        }

    def check_sparsity(self, adapter_name: str | None = None) -> bool:
        """True when merging ``adapter_name`` keeps every zero of every adapted base weight zero."""
        name = self._adapter(adapter_name)
        for _, layer in tuner_layers(self.model, SppLayer):
            if name in layer.spp_alpha:
                w0 = layer.base_weight().detach()
                if not zeros_preserved(w0, (w0.float() + layer.delta_weight(name)).to(w0.dtype)):
                    return False
        return True
