"""``LoriModel``: the peft tuner for LoRI (mask calibration, LoRI-S switch, export, concatenation).

Reference:
    Zhang et al., LoRI, https://arxiv.org/abs/2504.07448.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from adapterlab import distributed
from adapterlab.tuners._lowrank import (
    check_loaded_shapes,
    check_target_modules,
    replace_with,
    tuner_layers,
    write_lora_dir,
)
from adapterlab.tuners.lori.config import NAME, PREFIX, LoriConfig
from adapterlab.tuners.lori.functional import concat_factors, magnitude_masks
from adapterlab.tuners.lori.layer import LoriLayer

logger = logging.getLogger(__name__)


@dataclass
class SparsifyReport:
    """What :meth:`LoriModel.sparsify_` did.

    Attributes:
        sparsity: the configured fraction masked.
        kept / total: trainable B entries after / before.
        per_layer: module key -> kept fraction (densities differ per layer with the global scope).
        swapped: ``(old parameter, new parameter)`` pairs, to update an optimizer.
    """

    sparsity: float
    kept: int
    total: int
    per_layer: dict[str, float] = field(default_factory=dict)
    swapped: list[tuple[nn.Parameter, nn.Parameter]] = field(default_factory=list, repr=False)

    @property
    def achieved_sparsity(self) -> float:
        return 1.0 - self.kept / self.total if self.total else 0.0


class LoriModel(BaseTuner):
    """peft tuner model for :class:`LoriConfig` (built by ``peft.get_peft_model``).

    Extra API (a ``PeftModel`` forwards these look-ups): ``extract_masks``, ``sparsify_``,
    ``apply_masks_``, ``masks``, ``lora_factors``, ``export_lora``, ``concat_lora_factors``,
    ``export_concat``.
    """

    prefix: str = PREFIX
    tuner_layer_cls = LoriLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: LoriConfig, adapter_name: str) -> None:
        check_target_modules(model, config.target_modules)

    def _check_new_adapter_config(self, config: LoriConfig) -> None:
        super()._check_new_adapter_config(config)
        for name, other in self.peft_config.items():
            if other is config or not isinstance(other, LoriConfig):
                continue
            if other.a_seed == config.a_seed and not (config.allow_shared_a or other.allow_shared_a):
                raise ValueError(
                    f"a_seed={config.a_seed} is already used by adapter {name!r} (task={other.task!r}): two LoRI "
                    f"adapters sharing A lose the near-orthogonal task subspaces; expected a distinct a_seed "
                    f"(set task=... or a_seed=...), or allow_shared_a=True to do it on purpose"
                )

    def _create_and_replace(
        self,
        peft_config: LoriConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        replace_with(self, LoriLayer, peft_config, adapter_name, target, target_name, parent, current_key, NAME)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        # LoRI-S tensors (values/indices) do not exist on a freshly built (dense) layer, so peft's
        # structural remap leaves them without the adapter name: add it (LoriB adopts the sparse
        # form while loading).
        wrapped = any(k.startswith("base_model.model.") for k in model.state_dict())
        fixed: dict[str, torch.Tensor] = {}
        for key, value in out.items():
            if key.endswith((".lori_B.values", ".lori_B.indices")):
                head, _, leaf = key.rpartition(".")
                key = f"{head}.{adapter_name}.{leaf}"
                if not wrapped:
                    key = key.removeprefix("base_model.model.")
            fixed[key] = value
        check_loaded_shapes(model, fixed)
        return fixed

    # -- helpers ------------------------------------------------------------------------------
    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def _layers(self, name: str) -> list[tuple[str, LoriLayer]]:
        return [(k, layer) for k, layer in tuner_layers(self.model, LoriLayer) if name in layer.lori_B]

    @staticmethod
    def _refuse_sharded(layers: list[tuple[str, LoriLayer]], name: str) -> None:
        sharded = [k for k, layer in layers if distributed.is_sharded(layer.lori_B[name].dense())]
        if sharded:
            raise ValueError(
                f"LoRI's D -> S switch cannot run on sharded parameters ({sharded[0]!r} is an FSDP shard): it replaces "
                f"parameters, which FSDP does not allow after fully_shard; switch before sharding (or train with DDP)"
            )

    def masks(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Module key -> bool ``(d_out, r)`` trainable mask of B (all True in LoRI-D)."""
        name = self._adapter(adapter_name)
        return {k: layer.lori_B[name].mask() for k, layer in self._layers(name)}

    def trainable_b_count(self, adapter_name: str | None = None) -> int:
        name = self._adapter(adapter_name)
        return sum(layer.lori_B[name].trainable_numel() for _, layer in self._layers(name))

    # -- LoRI-D -> LoRI-S -------------------------------------------------------------------------
    def extract_masks(
        self,
        sparsity: float | None = None,
        *,
        scope: str | None = None,
        exclude: Mapping[str, torch.Tensor] | None = None,
        adapter_name: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Magnitude masks of the current B (default: the config's ``sparsity`` and ``mask_scope``).

        Exactly ``floor((1 - sparsity) * T)`` entries are kept over the ``T`` entries of all B
        (global scope; ties broken by ``topk``). ``exclude``: masks of an earlier task whose
        positions may not be reused (continual learning).
        """
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        self._refuse_sharded(self._layers(name), name)
        weights = {k: layer.lori_B[name].dense().detach() for k, layer in self._layers(name)}
        return magnitude_masks(
            weights,
            cfg.sparsity if sparsity is None else sparsity,
            scope=cfg.mask_scope if scope is None else scope,
            exclude=exclude,
        )

    def apply_masks_(
        self,
        masks: Mapping[str, torch.Tensor],
        *,
        keep_values: bool = True,
        adapter_name: str | None = None,
        sync: bool | None = None,
    ) -> SparsifyReport:
        """Switch every layer of the adapter to LoRI-S with ``masks`` (module key -> bool (d_out, r)).

        Masked entries stop being parameters (set to 0); the kept ones keep their values
        (``keep_values=False`` restarts them at 0, as the reference's fresh LoRI-S run).
        Sets ``config.variant = "S"``. Any optimizer holding the old parameters must be updated
        with ``report.swapped`` (``LoriCallback`` does it).

        Under ``torch.distributed`` (``sync=None``: whenever a process group of more than one
        process is initialised; every rank must then call it) the masks of rank 0 are used on every
        rank, the new sparse parameters start from rank 0's values, and their gradients are averaged
        over the ranks in backward (:func:`adapterlab.distributed.share_new_parameters_`): a
        ``DistributedDataParallel`` built before the switch does not know these parameters and
        would leave every replica on its own gradients.
        """
        name = self._adapter(adapter_name)
        layers = self._layers(name)
        missing = [k for k, _ in layers if k not in masks]
        if missing:
            raise ValueError(
                f"masks has no entry for {len(missing)} layer(s), e.g. {missing[0]!r}; expected one per LoRI layer"
            )
        self._refuse_sharded(layers, name)
        sync = distributed.is_distributed() if sync is None else sync
        chosen = {k: masks[k].detach().to(torch.bool).clone() for k, _ in layers}
        if sync:
            distributed.broadcast_tensors_([chosen[k] for k, _ in layers])  # rank 0 decides
        report = SparsifyReport(sparsity=float(self.peft_config[name].sparsity), kept=0, total=0)
        for key, layer in layers:
            lb = layer.lori_B[name]
            old, new = lb.to_sparse_(chosen[key], keep_values=keep_values)
            report.swapped.append((old, new))
            report.kept += new.numel()
            report.total += lb.shape[0] * lb.shape[1]
            report.per_layer[key] = new.numel() / (lb.shape[0] * lb.shape[1])
        if sync:
            distributed.share_new_parameters_([new for _, new in report.swapped])
        self.peft_config[name].variant = "S"
        logger.info(
            "LoRI-S: %d of %d B entries trainable (%.2f%% sparse)",
            report.kept,
            report.total,
            100 * report.achieved_sparsity,
        )
        return report

    def sparsify_(
        self,
        sparsity: float | None = None,
        *,
        scope: str | None = None,
        keep_values: bool = True,
        adapter_name: str | None = None,
        sync: bool | None = None,
    ) -> SparsifyReport:
        """LoRI-D -> LoRI-S in place: :meth:`extract_masks` then :meth:`apply_masks_` (``sync``: see there)."""
        name = self._adapter(adapter_name)
        if sparsity is not None:
            if isinstance(sparsity, bool) or not 0.0 <= float(sparsity) < 1.0:
                raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
            self.peft_config[name].sparsity = float(sparsity)
        masks = self.extract_masks(scope=scope, adapter_name=name)
        return self.apply_masks_(masks, keep_values=keep_values, adapter_name=name, sync=sync)

    # -- export / concatenation -------------------------------------------------------------------
    def lora_factors(self, adapter_name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module key -> ``(A (r, d_in), dense B (d_out, r))`` (zeros outside the mask)."""
        name = self._adapter(adapter_name)
        out = {}
        for key, layer in self._layers(name):
            a = layer.lori_A[name].weight.detach().clone()  # (r, d_in)
            b = layer.lori_B[name].dense().detach().clone()  # (d_out, r)
            out[key] = (a, b)
        return out

    def export_lora(self, save_directory: str | os.PathLike[str], adapter_name: str | None = None) -> Path:
        """Write the adapter as a plain peft LoRA directory (A stored explicitly, dense B)."""
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        return write_lora_dir(
            save_directory,
            self.lora_factors(name),
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.use_rslora,
            base_model_name_or_path=cfg.base_model_name_or_path,
            metadata={"adapterlab_source": NAME, "lori_variant": cfg.variant, "lori_a_seed": str(cfg.a_seed)},
        )

    def concat_lora_factors(
        self, adapter_names: Sequence[str], weights: Sequence[float] | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Concatenate LoRI adapters into one LoRA of rank ``sum r_t`` and scale 1 (peft's ``cat``).

        ``Delta W = sum_t w_t s_t B_t A_t`` exactly per layer; block t of the rank dimension is task t.
        Every adapter must target the same modules.

        Returns:
            Module key -> ``(A_m (sum r_t, d_in), B_m (d_out, sum r_t))``.
        """
        if not adapter_names:
            raise ValueError("adapter_names is empty; expected at least one LoRI adapter name")
        names = [self._adapter(n) for n in adapter_names]
        per = [dict(self._layers(n)) for n in names]
        keys = set(per[0])
        for n, layers in zip(names[1:], per[1:]):
            if set(layers) != keys:
                raise ValueError(
                    f"adapter {n!r} targets other modules than {names[0]!r}; concatenation needs the same targets"
                )
        out = {}
        for key in sorted(keys):
            facs = []
            for n, layers in zip(names, per):
                a, b, s = layers[key].merge_factors(n)
                facs.append((a.detach(), b.detach(), s))
            out[key] = concat_factors(facs, weights)
        return out

    def export_concat(
        self,
        save_directory: str | os.PathLike[str],
        adapter_names: Sequence[str],
        weights: Sequence[float] | None = None,
    ) -> Path:
        """Write the concatenation of several LoRI adapters as one plain peft LoRA directory
        (``r = lora_alpha = sum r_t``, so peft's scale is 1 and the weights live in A)."""
        factors = self.concat_lora_factors(adapter_names, weights)
        rank = next(iter(factors.values()))[0].shape[0]
        cfg = self.peft_config[self._adapter(adapter_names[0])]
        return write_lora_dir(
            save_directory,
            factors,
            r=rank,
            lora_alpha=rank,
            use_rslora=False,
            base_model_name_or_path=cfg.base_model_name_or_path,
            metadata={"adapterlab_source": NAME, "lori_concat": list(adapter_names), "weights": list(weights or [])},
        )
