"""``DyLoraModel``: the peft tuner for DyLoRA (rank sampling, set_rank, export at a rank).

Reference:
    Valipour et al., DyLoRA, https://arxiv.org/abs/2210.07558.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from adapterlab.tuners._lowrank import AdapterlabTuner, tuner_layers, write_lora_dir
from adapterlab.tuners.dylora.config import NAME, PREFIX
from adapterlab.tuners.dylora.functional import sample_rank
from adapterlab.tuners.dylora.layer import DyLoraLayer

logger = logging.getLogger(__name__)


class DyLoraModel(AdapterlabTuner):
    """peft tuner model for :class:`DyLoraConfig` (built by ``peft.get_peft_model``).

    Besides peft's API (merge, unmerge, disable_adapter, merge_and_unload, save/load) it offers
    ``set_rank`` / ``sample_rank`` / ``lora_factors`` / ``save_at_rank``; a ``PeftModel`` forwards
    these attribute look-ups to it, so ``peft_model.set_rank(4)`` works.
    """

    prefix: str = PREFIX
    tuner_layer_cls = DyLoraLayer
    tuner_name = NAME

    # -- rank control ----------------------------------------------------------------------------
    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(self.peft_config)}")
        return name

    def _layers(self) -> list[tuple[str, DyLoraLayer]]:
        return list(tuner_layers(self.model, DyLoraLayer))

    def set_rank(self, rank: int, adapter_name: str | None = None) -> None:
        """Use rank ``rank`` for inference, merge and save (and in training when nothing is sampled).

        Also records it as the config's ``eval_rank`` so a saved adapter reloads at this rank.

        Raises:
            ValueError: ``rank`` outside ``[r_min, r]``.
            RuntimeError: the adapter is merged at another rank (unmerge first).
        """
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        if isinstance(rank, bool) or not isinstance(rank, int) or not cfg.r_min <= rank <= cfg.r:
            raise ValueError(f"rank={rank!r} is outside the trained range [r_min, r] = [{cfg.r_min}, {cfg.r}]")
        for _, layer in self._layers():
            if name in layer.dylora_A:
                layer.set_rank(name, rank)
        cfg.eval_rank = rank

    def get_rank(self, adapter_name: str | None = None) -> int:
        """The inference rank of the adapter."""
        return self.peft_config[self._adapter(adapter_name)].active_eval_rank

    def set_train_rank(self, rank: int | None, adapter_name: str | None = None) -> None:
        """The rank forward uses in training mode (None: fall back to the inference rank)."""
        name = self._adapter(adapter_name)
        for _, layer in self._layers():
            if name in layer.dylora_A:
                layer.set_train_rank(name, rank)

    def sample_rank(self, step: int, adapter_name: str | None = None) -> int:
        """Draw this optimizer step's rank from ``(config.seed, step)`` and use it for training.

        Call once per optimizer step (``DyLoraCallback`` does this in ``on_step_begin``).

        Returns:
            The sampled rank ``b``.
        """
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        b = sample_rank(cfg.seed, step, cfg.r_min, cfg.r)
        self.set_train_rank(b, name)
        return b

    # -- export -------------------------------------------------------------------------------
    def lora_factors(
        self, rank: int | None = None, adapter_name: str | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module key: (A[:b] (b, d_in), B[:, :b] (d_out, b))}`` at ``rank`` (default: the inference rank)."""
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        b = cfg.active_eval_rank if rank is None else rank
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= cfg.r:
            raise ValueError(f"rank={b!r} must be in [1, r] = [1, {cfg.r}]")
        out = {}
        for key, layer in self._layers():
            if name in layer.dylora_A:
                out[key] = (
                    layer.dylora_A[name].head(b).detach().clone(),  # (b, d_in)
                    layer.dylora_B[name].head(b).detach().clone(),  # (d_out, b)
                )
        return out

    def save_at_rank(
        self, save_directory: str | os.PathLike[str], rank: int | None = None, adapter_name: str | None = None
    ) -> Path:
        """Write the adapter truncated to ``rank`` as a plain peft LoRA directory any peft user loads.

        ``r' = b``, ``lora_alpha' = alpha`` and the config's ``use_rslora``, so peft's scale
        (``alpha / b``, or ``alpha / sqrt(b)``) equals DyLoRA's scale at rank b.
        """
        name = self._adapter(adapter_name)
        cfg = self.peft_config[name]
        b = cfg.active_eval_rank if rank is None else rank
        factors = self.lora_factors(b, name)
        return write_lora_dir(
            save_directory,
            factors,
            r=b,
            lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.use_rslora,
            base_model_name_or_path=cfg.base_model_name_or_path,
            metadata={"adapterlab_source": NAME, "dylora_r_max": str(cfg.r), "dylora_rank": str(b)},
        )
