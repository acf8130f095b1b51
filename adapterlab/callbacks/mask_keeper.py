"""``MaskKeeperCallback``: pruned weights stay exactly zero while base weights train.

Masking gradients alone does not keep pruned weights at zero: AdamW's decoupled weight decay and
momentum still move them, and transformers 5.23 clips gradients before ``on_pre_optimizer_step``.
The callback therefore

1. masks the gradient of every kept parameter with a tensor hook (so the clipping norm and the
   optimizer moments never see pruned entries), and
2. writes zeros back into the pruned entries in ``on_optimizer_step`` (after ``optimizer.step()``),
   which fires once per optimizer step, i.e. once per gradient-accumulation cycle.

Masks are the given ones or, by default, ``W != 0`` of every trainable decoder-block linear with zeros,
taken at ``on_train_begin``. On resume from a checkpoint the weights are loaded before
``on_train_begin`` and are already masked, so the masks are the same: the callback has no state of
its own to save. Under DDP the masks are checked equal on all ranks at ``on_train_begin`` (one clear
error otherwise); the gradient hook masks each rank's gradient before DDP averages it, and the
write-back after the step is the same on every rank.

Reference:
    Zimmer et al., PERP (FullFT with kept masks), https://arxiv.org/abs/2312.15230
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from adapterlab import distributed

logger = logging.getLogger(__name__)


def _canonical(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


class MaskKeeperCallback(TrainerCallback):
    """Keep pruned weights at zero through optimizer steps (see module docstring).

    Args:
        masks: keep masks ``{module name: bool (d_out, d_in)}`` (``True`` = kept), e.g.
            :func:`adapterlab.pruning.get_masks` of the pruned model; names may omit peft's
            ``base_model.model.`` prefix and ``.base_layer`` segments. Default: ``W != 0`` of every
            trainable decoder-block linear with at least one zero.
        mask_gradients: also zero the gradients of pruned entries (before clipping).
        strict: raise at train end if a pruned entry is non-zero (otherwise log an error).
    """

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        mask_gradients: bool = True,
        strict: bool = True,
    ) -> None:
        self.masks = dict(masks) if masks is not None else None
        self.mask_gradients = mask_gradients
        self.strict = strict
        self._kept: list[tuple[str, nn.Parameter, torch.Tensor]] = []  # (name, param, pruned bool)
        self._hooks: list[Any] = []

    # -- set-up --------------------------------------------------------------------------------
    def _collect(self, model: nn.Module) -> None:
        self._kept.clear()
        from adapterlab.quant import base_named_modules

        by_name: dict[str, nn.Module] = {}
        for name, module in base_named_modules(model):  # base layers only, never adapter factors
            if isinstance(getattr(module, "weight", None), nn.Parameter) and isinstance(module, nn.Linear):
                by_name.setdefault(_canonical(name), module)
        if self.masks is not None:
            for name, keep in self.masks.items():
                module = by_name.get(_canonical(name))
                if module is None:
                    raise ValueError(
                        f"MaskKeeperCallback: mask {name!r} names no linear layer of the model "
                        f"(e.g. {', '.join(list(by_name)[:3])})"
                    )
                w = module.weight
                if tuple(keep.shape) != tuple(w.shape):
                    raise ValueError(
                        f"MaskKeeperCallback: mask {name!r} has shape {tuple(keep.shape)}, the weight has {tuple(w.shape)}"
                    )
                self._kept.append((name, w, ~keep.to(device=w.device, dtype=torch.bool)))
        else:
            from adapterlab.pruning.pruner import prunable_linears

            decoder = {id(m) for m in prunable_linears(model).values()}
            for name, module in by_name.items():
                if id(module) not in decoder:  # embeddings / head are not pruned
                    continue
                w = module.weight
                if w.requires_grad and bool((w == 0).any()):
                    self._kept.append((name, w, (w.detach() == 0)))
        sharded = [name for name, w, _ in self._kept if distributed.is_sharded(w)]
        if sharded:
            raise ValueError(
                f"MaskKeeperCallback: {sharded[0]!r} is an FSDP shard; the callback keeps whole masks and needs whole "
                f"weights (train with DDP, or keep the pruned layers out of fully_shard)"
            )
        if not self._kept:
            logger.warning("MaskKeeperCallback: no trainable weight has pruned entries; nothing to keep")

    def _register_hooks(self) -> None:
        self._remove_hooks()
        if not self.mask_gradients:
            return
        for _, w, pruned in self._kept:
            if w.requires_grad:
                self._hooks.append(w.register_hook(lambda g, pruned=pruned: g.masked_fill(pruned, 0)))

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @torch.no_grad()
    def apply_(self) -> None:
        """Write zeros into every pruned entry now."""
        for _, w, pruned in self._kept:
            w.masked_fill_(pruned, 0)

    def violations(self) -> int:
        """How many pruned entries are non-zero right now."""
        return sum(int((w.detach()[pruned] != 0).sum()) for _, w, pruned in self._kept)

    # -- TrainerCallback -------------------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("MaskKeeperCallback needs the model (the Trainer passes it as `model`)")
        self._collect(model)
        distributed.check_equal_on_all_ranks(
            {name: pruned for name, _, pruned in self._kept}, "MaskKeeperCallback's pruning masks"
        )
        self.apply_()
        self._register_hooks()
        logger.info("MaskKeeperCallback: keeping %d pruned weight tensor(s) at zero", len(self._kept))

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.apply_()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._remove_hooks()
        bad = self.violations()
        if bad:
            msg = f"MaskKeeperCallback: {bad} pruned weight(s) are non-zero at the end of training"
            if self.strict:
                raise RuntimeError(msg)
            logger.error(msg)
