"""``SnellModel``: the peft tuner for SNELL (per-layer keep budgets, sparse delta export).

Reference:
    Shen et al., SNELL, https://arxiv.org/abs/2411.01800; SNELLA, https://arxiv.org/abs/2510.24037.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from adapterlab.tuners._lowrank import AdapterlabTuner, tuner_layers
from adapterlab.tuners.snell.config import NAME, PREFIX
from adapterlab.tuners.snell.functional import keep_count
from adapterlab.tuners.snell.layer import SnellLayer

logger = logging.getLogger(__name__)


class SnellModel(AdapterlabTuner):
    """peft tuner model for :class:`SnellConfig` (built by ``peft.get_peft_model``).

    Extra API (a ``PeftModel`` forwards these look-ups): ``snell_layers``, ``layer_sparsities``,
    ``keep_counts``, ``set_sparsity_``, ``set_keep_counts_``, ``sparse_deltas``.
    """

    prefix: str = PREFIX
    tuner_layer_cls = SnellLayer
    tuner_name = NAME

    # -- helpers ------------------------------------------------------------------------------
    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def snell_layers(self, adapter_name: str | None = None) -> list[tuple[str, SnellLayer]]:
        """``(module key, layer)`` of every SNELL layer holding the adapter, in model order."""
        name = self._adapter(adapter_name)
        return [(k, layer) for k, layer in tuner_layers(self.model, SnellLayer) if name in layer.snell_P]

    def keep_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Module key -> entries that survive the competition."""
        name = self._adapter(adapter_name)
        return {k: layer.keep(name) for k, layer in self.snell_layers(name)}

    def layer_sparsities(self, adapter_name: str | None = None) -> dict[str, float]:
        """Module key -> current sparsity ``1 - keep / (n * m)``."""
        name = self._adapter(adapter_name)
        return {k: layer.sparsity(name) for k, layer in self.snell_layers(name)}

    def set_keep_counts_(self, counts: Mapping[str, int], adapter_name: str | None = None) -> None:
        """Set per-layer keep counts (module key -> count); every key must be a SNELL layer."""
        name = self._adapter(adapter_name)
        layers = dict(self.snell_layers(name))
        unknown = sorted(set(counts) - set(layers))
        if unknown:
            raise ValueError(
                f"not SNELL layers of adapter {name!r}: {unknown[:3]}; expected keys like {next(iter(layers), '')!r}"
            )
        for key, count in counts.items():
            layers[key].set_keep_(name, int(count))

    def set_sparsity_(self, sparsity: float | Mapping[str, float], adapter_name: str | None = None) -> None:
        """Set the sparsity of every layer (a float) or of some layers (module key -> float), in [0, 1]."""
        name = self._adapter(adapter_name)
        layers = self.snell_layers(name)
        if isinstance(sparsity, Mapping):
            values = dict(sparsity)
        else:
            values = {k: sparsity for k, _ in layers}
        for key, s in values.items():
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= float(s) <= 1.0:
                raise ValueError(f"sparsity for {key!r} must be in [0, 1], got {s!r}")
        numel = {k: layer.numel for k, layer in layers}
        unknown = sorted(set(values) - set(numel))
        if unknown:
            raise ValueError(
                f"not SNELL layers of adapter {name!r}: {unknown[:3]}; expected keys like {next(iter(numel), '')!r}"
            )
        self.set_keep_counts_({k: keep_count(numel[k], float(s)) for k, s in values.items()}, name)
        if not isinstance(sparsity, Mapping):
            self.peft_config[name].sparsity = float(sparsity)

    def sparse_deltas(
        self, adapter_name: str | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]:
        """The merged update of each layer as ``(values fp32 (K,), flat row-major int64 indices (K,), (d_out, d_in))``.

        The mask is frozen from the current parameters (as at merge time); scatter ``values`` at
        ``indices`` into a zero ``(d_out, d_in)`` tensor to get the dense update.
        """
        name = self._adapter(adapter_name)
        out = {}
        for key, layer in self.snell_layers(name):
            delta = layer.delta_weight(name)  # (d_out, d_in)
            idx = delta.reshape(-1).nonzero().squeeze(1)  # (K,)
            out[key] = (delta.reshape(-1)[idx].clone(), idx, (layer.out_features, layer.in_features))
        return out
