"""``LoriCallback``: LoRI-D -> global magnitude mask -> LoRI-S inside one Trainer run.

Reference:
    Zhang et al., LoRI, https://arxiv.org/abs/2504.07448 (src/extract_mask.py, src/mask_trainers.py).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from adapterlab.callbacks.dylora import find_tuner
from adapterlab.tuners.lori.model import LoriModel, SparsifyReport

logger = logging.getLogger(__name__)


def _unwrap(obj: Any, attr: str) -> Any:
    """accelerate wraps optimizers/schedulers (``.optimizer`` / ``.scheduler``); return the inner one."""
    while hasattr(obj, attr) and getattr(obj, attr) is not obj:
        inner = getattr(obj, attr)
        if inner is None:
            break
        obj = inner
    return obj


def swap_optimizer_params_(
    optimizer: torch.optim.Optimizer,
    swapped: list[tuple[torch.nn.Parameter, torch.nn.Parameter]],
    *,
    lr: float | None = None,
    scheduler: Any = None,
) -> int:
    """Replace old parameters by new ones in an optimizer's param groups and drop their state.

    The new parameters start with a fresh optimizer state (the reference's LoRI-S is a new run).
    With ``lr``, every group holding a new parameter gets ``lr`` as its base LR (in the
    scheduler's ``base_lrs`` too, since LR schedulers rewrite ``group["lr"]`` every step).

    Returns:
        How many parameters were swapped.
    """
    opt = _unwrap(optimizer, "optimizer")
    by_id = {id(old): new for old, new in swapped}
    count = 0
    touched: set[int] = set()
    for gi, group in enumerate(opt.param_groups):
        params = group["params"]
        for i, p in enumerate(params):
            new = by_id.get(id(p))
            if new is not None:
                opt.state.pop(p, None)
                params[i] = new
                touched.add(gi)
                count += 1
    if lr is not None:
        sched = _unwrap(scheduler, "scheduler") if scheduler is not None else None
        for gi in touched:
            group = opt.param_groups[gi]
            old_base = group.get("initial_lr", group["lr"])
            factor = group["lr"] / old_base if old_base else 1.0
            group["initial_lr"] = lr
            group["lr"] = lr * factor
            if sched is not None and hasattr(sched, "base_lrs"):
                sched.base_lrs[gi] = lr
    return count


class LoriCallback(TrainerCallback, ExportableState):
    """Switch a LoRI adapter from LoRI-D to LoRI-S at ``switch_step`` (an optimizer step count).

    At the start of the first optimizer step with ``state.global_step >= switch_step`` it extracts
    one global magnitude mask over all B of the model at ``sparsity`` (default: the config's,
    0.9), keeps only the unmasked entries as parameters (``B <- B * M``, or 0 with
    ``keep_values=False``), puts the new parameters into the optimizer with a fresh state, and
    optionally sets the LoRI-S learning rate ``lr_s`` (the paper uses about 10x the LoRI-D LR).
    Masked entries are then not parameters at all: AdamW weight decay, stale Adam moments and
    gradient clipping (which transformers 5.x does before ``on_pre_optimizer_step``) cannot see
    or move them.

    Resuming from a checkpoint saved after the switch: the saved adapter is LoRI-S
    (``variant="S"``) and loads as such, so the optimizer is built over the sparse parameters and
    its saved state fits; the switch is skipped because the model is already sparse. The
    callback's settings and ``switched_at`` are saved in ``trainer_state.json`` through
    ``ExportableState`` (restored with ``restore_callback_states_from_checkpoint=True``).

    Args:
        switch_step: optimizer step at which LoRI-S starts (``>= 0``).
        sparsity: fraction of B masked; None = the adapter config's ``sparsity``.
        lr_s: LoRI-S learning rate; None keeps the current schedule.
        keep_values: start LoRI-S from the dense B's kept values (True) or from 0.
        adapter_name: the LoRI adapter (default: the active one).
    """

    def __init__(
        self,
        switch_step: int,
        *,
        sparsity: float | None = None,
        lr_s: float | None = None,
        keep_values: bool = True,
        adapter_name: str | None = None,
    ) -> None:
        if isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0:
            raise ValueError(f"switch_step must be an integer >= 0, got {switch_step!r}")
        if sparsity is not None and not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if lr_s is not None and not float(lr_s) > 0:
            raise ValueError(f"lr_s must be a positive learning rate, got {lr_s!r}")
        self.switch_step = switch_step
        self.sparsity = sparsity
        self.lr_s = lr_s
        self.keep_values = keep_values
        self.adapter_name = adapter_name
        self.report: SparsifyReport | None = None
        self.switched_at: int | None = None

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "switch_step": self.switch_step,
                "sparsity": self.sparsity,
                "lr_s": self.lr_s,
                "keep_values": self.keep_values,
                "adapter_name": self.adapter_name,
            },
            "attributes": {"switched_at": self.switched_at},
        }

    def _is_sparse(self, tuner: LoriModel) -> bool:
        """True when every B of the adapter is sparse already (switched before, or a LoRI-S
        checkpoint was loaded into a LoRI-D model, as ``Trainer`` does on resume; the config then
        still says ``variant="D"`` and is corrected here)."""
        name = tuner._adapter(self.adapter_name)
        layers = tuner._layers(name)
        sparse = bool(layers) and all(layer.lori_B[name].is_sparse for _, layer in layers)
        if sparse and tuner.peft_config[name].variant != "S":
            tuner.peft_config[name].variant = "S"
        return sparse

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step < self.switch_step:
            return
        tuner: LoriModel = find_tuner(kwargs.get("model"), LoriModel)
        if self._is_sparse(tuner):
            return
        self.report = tuner.sparsify_(self.sparsity, keep_values=self.keep_values, adapter_name=self.adapter_name)
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            n = swap_optimizer_params_(
                optimizer, self.report.swapped, lr=self.lr_s, scheduler=kwargs.get("lr_scheduler")
            )
            if n != len(self.report.swapped):
                logger.warning(
                    "LoriCallback: %d of %d B parameters were not in the optimizer",
                    len(self.report.swapped) - n,
                    len(self.report.swapped),
                )
        self.report.swapped.clear()  # do not keep the old dense tensors alive
        self.switched_at = state.global_step
        logger.info(
            "LoriCallback: LoRI-S from step %d (%.1f%% of B masked)",
            state.global_step,
            100 * self.report.achieved_sparsity,
        )
