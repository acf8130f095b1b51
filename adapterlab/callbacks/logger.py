"""``SparsityRankLogger``: the base's sparsity and the adapter's rank / size in the Trainer's logs."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

#: The keys this callback adds to every log entry.
LOG_KEYS = ("base_sparsity", "adapter_rank", "trainable_params", "adapter_density")


def base_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the decoder blocks' linear base weights (4-bit ones dequantized).

    Adapter modules are ignored (peft wrappers are looked through), so the value is the base's
    sparsity whether or not an adapter is attached.
    """
    from adapterlab.io import _decoder_linear_names
    from adapterlab.quant import base_named_modules, dequantize_weight

    names = _decoder_linear_names(model)
    zeros = total = 0
    for name, module in base_named_modules(model):
        if name in names:
            w = dequantize_weight(module)
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else 0.0


def adapter_rank(model: nn.Module) -> int | None:
    """The largest configured rank ``r`` over the model's active peft adapters (None: no rank)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapters", None) or list(configs)
    ranks = [int(configs[a].r) for a in active if a in configs and isinstance(getattr(configs[a], "r", None), int)]
    return max(ranks) if ranks else None


@torch.no_grad()
def trainable_stats(model: nn.Module) -> tuple[int, float]:
    """``(number of trainable entries, fraction of them that are nonzero)``."""
    total = nonzero = 0
    for p in model.parameters():
        if p.requires_grad:
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return total, (nonzero / total if total else 0.0)


def _unwrap_model(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


class SparsityRankLogger(TrainerCallback):
    """Adds ``base_sparsity``, ``adapter_rank``, ``trainable_params`` and ``adapter_density`` to the logs.

    Works under ``transformers.Trainer`` and trl's ``SFTTrainer``: on every ``on_log`` the values
    go into the ``logs`` dict that the reporting integrations see next, and into the entry
    ``Trainer.log`` just appended to ``state.log_history`` (so they are saved with checkpoints
    and returned in ``trainer.state.log_history``).

    * ``base_sparsity``: zeros / entries over the decoder linear base weights (a pruned base must
      stay at its sparsity through training).
    * ``adapter_rank``: the largest configured rank of the active adapters (DyLoRA's sampled rank
      is logged as ``dylora_rank`` by ``DyLoraCallback``).
    * ``trainable_params``: entries of parameters with ``requires_grad``.
    * ``adapter_density``: the fraction of those entries that are nonzero.

    Args:
        sparsity_every: recompute ``base_sparsity`` on every ``sparsity_every``-th log (it reads
            every base weight); the last value is reused in between.
    """

    def __init__(self, sparsity_every: int = 1) -> None:
        if isinstance(sparsity_every, bool) or not isinstance(sparsity_every, int) or sparsity_every < 1:
            raise ValueError(f"sparsity_every must be an integer >= 1, got {sparsity_every!r}")
        self.sparsity_every = sparsity_every
        self._logs_seen = 0
        self._sparsity: float | None = None
        self.last: dict[str, Any] = {}

    def values(self, model: nn.Module) -> dict[str, Any]:
        """The logged values for ``model`` now."""
        model = _unwrap_model(model)
        if self._sparsity is None or self._logs_seen % self.sparsity_every == 0:
            self._sparsity = base_sparsity(model)
        self._logs_seen += 1
        n, density = trainable_stats(model)
        out: dict[str, Any] = {"base_sparsity": self._sparsity, "trainable_params": n, "adapter_density": density}
        rank = adapter_rank(model)
        if rank is not None:
            out["adapter_rank"] = rank
        return out

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model")
        if model is None or logs is None:
            return
        self.last = self.values(model)
        logs.update(self.last)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.last)
