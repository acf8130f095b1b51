"""``DyLoraCallback``: one DyLoRA rank per optimizer step, drawn from (seed, global step).

Reference:
    Valipour et al., DyLoRA, https://arxiv.org/abs/2210.07558 (official run_glue.py samples in
    ``on_step_begin``).
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from adapterlab import distributed
from adapterlab.tuners.dylora.model import DyLoraModel

logger = logging.getLogger(__name__)


def find_tuner(model: nn.Module | None, tuner_cls: type) -> Any:
    """The first ``tuner_cls`` instance inside ``model`` (a PeftModel, or wrapped by accelerate/DDP)."""
    if model is None:
        raise ValueError(f"the callback got no model; expected a peft model with a {tuner_cls.__name__}")
    for module in model.modules():
        if isinstance(module, tuner_cls):
            return module
    raise ValueError(f"no {tuner_cls.__name__} inside {type(model).__name__}; build the model with get_peft_model")


class DyLoraCallback(TrainerCallback, ExportableState):
    """Drives DyLoRA rank sampling from a ``transformers.Trainer`` (or trl ``SFTTrainer``).

    * ``on_step_begin`` (once per optimizer step in transformers 5.x, before the first
      micro-batch, so all gradient-accumulation micro-batches share b): ``b`` is drawn from a
      generator seeded with ``(config.seed, state.global_step)``; every process of a distributed
      run draws the same b, and a resumed run repeats the schedule.
    * Outside training mode the layers use the inference rank (``set_rank``, default r_max), so
      evaluation during training never sees the last sampled rank.
    * ``on_log`` adds ``dylora_rank`` (the last sampled rank) to the logs.

    The schedule is a function of the seed and the step, so a run resumed from a checkpoint
    (``state.global_step`` restored) draws the same ranks as an uninterrupted one. The callback's
    own state (``adapter_name``, ``last_rank``) is saved in ``trainer_state.json`` through
    ``ExportableState`` and restored with ``restore_callback_states_from_checkpoint=True``.

    Under ``torchrun`` / ``accelerate launch`` every rank draws the same b without communication;
    ``on_train_begin`` checks that the schedule's inputs (``seed``, ``r_min``, ``r``) are equal on all
    ranks and raises one error naming each rank's value otherwise. The components above the sampled
    rank get no gradient, so DDP needs ``find_unused_parameters=True`` (the Trainer's default for a
    peft model); ``ddp_find_unused_parameters=False`` is refused at train begin.

    Args:
        adapter_name: the DyLoRA adapter to drive (default: the active one).
    """

    def __init__(self, adapter_name: str | None = None) -> None:
        self.adapter_name = adapter_name
        self.last_rank: int | None = None
        self.history: list[tuple[int, int]] = []  # (global_step, rank)

    def state(self) -> dict[str, Any]:
        return {"args": {"adapter_name": self.adapter_name}, "attributes": {"last_rank": self.last_rank}}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner: DyLoraModel = find_tuner(kwargs.get("model"), DyLoraModel)
        name = tuner._adapter(self.adapter_name)
        cfg = tuner.peft_config[name]
        distributed.check_equal_on_all_ranks(
            {"seed": cfg.seed, "r_min": cfg.r_min, "r": cfg.r}, f"DyLoRA adapter {name!r}'s rank schedule"
        )
        if distributed.is_distributed() and cfg.r_min < cfg.r and args.ddp_find_unused_parameters is False:
            raise ValueError(
                "DyLoRA trains a sampled prefix of the rank components, so every step leaves some parameters "
                "without a gradient and DDP with ddp_find_unused_parameters=False stops at the next step; "
                "set ddp_find_unused_parameters=True (the Trainer's default for a peft model)"
            )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner: DyLoraModel = find_tuner(kwargs.get("model"), DyLoraModel)
        self.last_rank = tuner.sample_rank(state.global_step, self.adapter_name)
        self.history.append((state.global_step, self.last_rank))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is not None:
            find_tuner(model, DyLoraModel).set_train_rank(None, self.adapter_name)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is not None and self.last_rank is not None:
            logs["dylora_rank"] = self.last_rank
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["dylora_rank"] = self.last_rank
