"""``SnellCallback``: SNELLA's bi-level budget schedule for SNELL adapters, driven by the Trainer step.

Reference:
    Shen et al., Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition (SNELLA),
    https://arxiv.org/abs/2510.24037 (reference ``sparse_allocator.py``); SNELL,
    https://arxiv.org/abs/2411.01800.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from adapterlab import distributed
from adapterlab.callbacks.dylora import find_tuner
from adapterlab.io import load_tensors, save_tensors
from adapterlab.tuners.snell.functional import allocate_budget, budget_schedule, importance, keep_count
from adapterlab.tuners.snell.model import SnellModel

logger = logging.getLogger(__name__)

ALLOCATIONS = ("importance", "uniform")
#: file the callback writes into each checkpoint folder (importance EMAs, safetensors)
STATE_FILE = "snell_callback.safetensors"
_KEEP_HISTORY = 1000


def _check_fraction(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class SnellCallback(TrainerCallback, ExportableState):
    """Anneal the SNELL keep budget from ``init_sparsity`` to ``target_sparsity`` and re-allocate it
    across layers by importance (SNELLA's across-layer competition; the in-layer magnitude
    competition stays in every forward).

    * ``on_optimizer_step`` (after ``optimizer.step()``, before ``zero_grad``, once per optimizer
      step, so gradient accumulation uses the accumulated gradients): element sensitivities
      ``I = |theta * grad|`` of every ``P`` and ``Q``, smoothed ``Ibar <- b1 Ibar + (1-b1) I`` and
      ``Ubar <- b2 Ubar + (1-b2) |I - Ibar|``; layer score ``S_l = mean(Ibar_P Ubar_P) + mean(Ibar_Q Ubar_Q)``.
    * ``on_step_begin`` of every ``mask_interval``-th optimizer step t: total budget
      ``V(t) = budget_schedule(t, total_steps, V_init, V_target, ...)`` (cubic), split over layers
      by :func:`~adapterlab.tuners.snell.functional.allocate_budget` in proportion to ``S_l``
      (``allocation="uniform"``, or before any score exists: in proportion to the layer size, i.e. the
      same sparsity everywhere); each layer then keeps exactly ``v_l`` entries.
    * ``on_train_end`` applies ``V(total_steps) = V_target``, so the saved adapter has the target
      sparsity overall; ``layer_sparsity`` (module key -> sparsity) records it.

    Under DDP the sensitivities come from the gradients after DDP averaged them (the reduced
    statistics), so every rank computes the same scores; the per-layer counts of rank 0 are
    broadcast all the same (decide once), and only the saving process writes the EMA file.

    The per-layer keep counts are buffers of the adapter, so they are saved with it. The callback's
    settings, last step and allocation go into ``trainer_state.json`` (``ExportableState``; restored
    with ``restore_callback_states_from_checkpoint=True``); the importance EMAs go into
    ``<checkpoint>/snell_callback.safetensors`` and are reloaded from there on resume.

    Args:
        target_sparsity: final overall sparsity; None = the adapter config's ``sparsity``.
        init_sparsity: overall sparsity at the start (0 = dense, SNELLA's default).
        total_steps: schedule length in optimizer steps; None = the Trainer's ``max_steps``.
        init_warmup / final_warmup: steps at ``init_sparsity`` / ``target_sparsity``.
        mask_interval: re-allocate every this many optimizer steps.
        allocation: ``"importance"`` (bi-level) or ``"uniform"`` (schedule only).
        beta1 / beta2: EMA factors of the sensitivity and its uncertainty (0.85).
        adapter_name: the SNELL adapter (default: the active one).
    """

    def __init__(
        self,
        target_sparsity: float | None = None,
        *,
        init_sparsity: float = 0.0,
        total_steps: int | None = None,
        init_warmup: int = 0,
        final_warmup: int = 0,
        mask_interval: int = 1,
        allocation: str = "importance",
        beta1: float = 0.85,
        beta2: float = 0.85,
        adapter_name: str | None = None,
    ) -> None:
        _check_fraction("target_sparsity", target_sparsity, allow_none=True)
        _check_fraction("init_sparsity", init_sparsity)
        _check_fraction("beta1", beta1)
        _check_fraction("beta2", beta2)
        if total_steps is not None:
            _check_count("total_steps", total_steps, 1)
        _check_count("init_warmup", init_warmup, 0)
        _check_count("final_warmup", final_warmup, 0)
        _check_count("mask_interval", mask_interval, 1)
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation={allocation!r} is not supported; choose one of: {', '.join(ALLOCATIONS)}")
        self.target_sparsity = target_sparsity
        self.init_sparsity = float(init_sparsity)
        self.total_steps = total_steps
        self.init_warmup = init_warmup
        self.final_warmup = final_warmup
        self.mask_interval = mask_interval
        self.allocation_mode = allocation
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.adapter_name = adapter_name
        # attributes restored from trainer_state.json
        self.last_step: int | None = None
        self.layer_sparsity: dict[str, float] = {}
        self.budget_history: list[list[int]] = []  # [step, V(step)]
        self.ema_path: str | None = None
        # run-time state
        self._ema: dict[str, torch.Tensor] = {}
        self._output_dir: str | None = None
        self._v_init = 0
        self._v_target = 0
        self._total = 1

    def state(self) -> dict[str, Any]:
        ema_path = None
        if self._output_dir is not None and self.last_step is not None and self.allocation_mode == "importance":
            ema_path = os.path.abspath(os.path.join(self._output_dir, f"checkpoint-{self.last_step}", STATE_FILE))
        return {
            "args": {
                "target_sparsity": self.target_sparsity,
                "init_sparsity": self.init_sparsity,
                "total_steps": self.total_steps,
                "init_warmup": self.init_warmup,
                "final_warmup": self.final_warmup,
                "mask_interval": self.mask_interval,
                "allocation": self.allocation_mode,
                "beta1": self.beta1,
                "beta2": self.beta2,
                "adapter_name": self.adapter_name,
            },
            "attributes": {
                "last_step": self.last_step,
                "layer_sparsity": dict(self.layer_sparsity),
                "budget_history": self.budget_history[-_KEEP_HISTORY:],
                "ema_path": ema_path,
            },
        }

    # -- internals -----------------------------------------------------------------------------
    def _tuner(self, kwargs: dict[str, Any]) -> SnellModel:
        return find_tuner(kwargs.get("model"), SnellModel)

    def layer_scores(self, tuner: SnellModel) -> dict[str, float]:
        """Module key -> ``S_l`` from the current EMAs (0 for layers without any yet)."""
        name = tuner._adapter(self.adapter_name)
        scores = {}
        for key, _ in tuner.snell_layers(name):
            s = 0.0
            for part in ("P", "Q"):
                ipt, unc = self._ema.get(f"{key}.ipt_{part}"), self._ema.get(f"{key}.unc_{part}")
                if ipt is not None and unc is not None:
                    s += float((ipt * unc).mean())
            scores[key] = s
        return scores

    def allocate_(self, tuner: SnellModel, step: int) -> dict[str, int]:
        """Set every layer's keep count for schedule step ``step``; returns module key -> count."""
        name = tuner._adapter(self.adapter_name)
        layers = tuner.snell_layers(name)
        keys = [k for k, _ in layers]
        caps = torch.tensor([layer.numel for _, layer in layers], dtype=torch.int64)  # (L,)
        budget = budget_schedule(
            step,
            self._total,
            self._v_init,
            self._v_target,
            init_warmup=self.init_warmup,
            final_warmup=self.final_warmup,
        )
        raw = self.layer_scores(tuner) if self.allocation_mode == "importance" else {}
        scores = torch.tensor([raw.get(k, 0.0) for k in keys], dtype=torch.float64)  # (L,)
        if float(scores.sum()) <= 0:
            scores = caps.to(torch.float64)  # no importance yet: the same sparsity in every layer
        counts = allocate_budget(budget, scores, caps)  # (L,)
        distributed.broadcast_tensor_(counts)  # DDP: every rank keeps rank 0's allocation
        result = {k: int(c) for k, c in zip(keys, counts)}
        tuner.set_keep_counts_(result, name)
        self.layer_sparsity = {k: 1.0 - result[k] / int(cap) for k, cap in zip(keys, caps)}
        self.budget_history.append([int(step), int(budget)])
        return result

    # -- events ----------------------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        tuner = self._tuner(kwargs)
        name = tuner._adapter(self.adapter_name)
        target = self.target_sparsity if self.target_sparsity is not None else float(tuner.peft_config[name].sparsity)
        if self.init_sparsity > target:
            raise ValueError(
                f"init_sparsity={self.init_sparsity} is above target_sparsity={target}; the budget decays from "
                f"init to target, so expected init_sparsity <= target_sparsity"
            )
        layers = tuner.snell_layers(name)
        if not layers:
            raise ValueError(f"adapter {name!r} has no SNELL layers")
        self._v_init = sum(keep_count(layer.numel, self.init_sparsity) for _, layer in layers)
        self._v_target = sum(keep_count(layer.numel, target) for _, layer in layers)
        self._total = int(self.total_steps or state.max_steps or 1)
        self._output_dir = args.output_dir
        if self.ema_path and not self._ema:
            if os.path.isfile(self.ema_path):
                self._ema = {k: v.float() for k, v in load_tensors(self.ema_path).items()}
                logger.info("SnellCallback: importance EMAs restored from %s", self.ema_path)
            else:
                logger.warning("SnellCallback: %s is missing; importance EMAs restart from zero", self.ema_path)

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.global_step % self.mask_interval == 0:
            self.allocate_(self._tuner(kwargs), state.global_step)

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self.allocation_mode != "importance":
            return
        tuner = self._tuner(kwargs)
        name = tuner._adapter(self.adapter_name)
        with torch.no_grad():
            for key, layer in tuner.snell_layers(name):
                for part, param in (("P", layer.snell_P[name]), ("Q", layer.snell_Q[name])):
                    ipt = importance(param, param.grad)
                    ik, uk = f"{key}.ipt_{part}", f"{key}.unc_{part}"
                    ibar = self._ema.get(ik)
                    if ibar is None or ibar.shape != ipt.shape:
                        ibar, ubar = torch.zeros_like(ipt), torch.zeros_like(ipt)
                    else:
                        ubar = self._ema[uk]
                    ibar = self.beta1 * ibar + (1 - self.beta1) * ipt
                    ubar = self.beta2 * ubar + (1 - self.beta2) * (ipt - ibar).abs()
                    self._ema[ik], self._ema[uk] = ibar, ubar

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.last_step = state.global_step

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.allocation_mode != "importance" or not self._ema or not args.should_save:
            return  # only the saving process (rank 0) writes
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            save_tensors(os.path.join(folder, STATE_FILE), {k: v.contiguous() for k, v in self._ema.items()})

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if model is None:
            return
        tuner = find_tuner(model, SnellModel)
        self.allocate_(tuner, max(self._total, state.global_step))
        logger.info("SnellCallback: final overall sparsity %.4f", self.overall_sparsity(tuner))

    def overall_sparsity(self, tuner: SnellModel) -> float:
        """``1 - sum(keep) / sum(n * m)`` over the adapter's layers."""
        name = tuner._adapter(self.adapter_name)
        layers = tuner.snell_layers(name)
        total = sum(layer.numel for _, layer in layers)
        return 1.0 - sum(layer.keep(name) for _, layer in layers) / total if total else 0.0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict | None = None,
        **kwargs: Any,
    ) -> None:
        if logs is None or kwargs.get("model") is None or not self.budget_history:
            return
        value = self.overall_sparsity(self._tuner(kwargs))
        logs["snell_sparsity"] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["snell_sparsity"] = value
