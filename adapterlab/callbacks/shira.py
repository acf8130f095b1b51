"""``ShiraMaskCallback``: calibrate grad/snip SHiRA masks from task data when training begins.

Reference:
    Bhardwaj et al., SHiRA, https://arxiv.org/abs/2406.13175 (SHiRA-Grad / SHiRA-SNIP masks).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from adapterlab import distributed
from adapterlab.callbacks.dylora import find_tuner
from adapterlab.tuners.shira.config import ShiraConfig
from adapterlab.tuners.shira.functional import DATA_MASK_TYPES
from adapterlab.tuners.shira.model import CalibrationReport, ShiraModel, calibrate_masks_, shira_layers

logger = logging.getLogger(__name__)


def pending_adapters(model: Any) -> list[str]:
    """Names of the grad/snip SHiRA adapters in ``model`` whose masks are not calibrated yet."""
    tuner = find_tuner(model, ShiraModel)
    out = []
    for name, cfg in tuner.peft_config.items():
        if isinstance(cfg, ShiraConfig) and cfg.mask_type in DATA_MASK_TYPES:
            if any(layer.shira_pending.get(name) == "calibrate" for _, layer in shira_layers(tuner.model, name)):
                out.append(name)
    return out


class ShiraMaskCallback(TrainerCallback):
    """Fix the masks of grad/snip SHiRA adapters in ``on_train_begin`` (before the first step).

    The gradient of the task loss w.r.t. each targeted base weight is accumulated over
    ``num_batches`` batches (default: the config's ``calibration_batches``, 64) and the top-K of
    ``|G|`` (grad) or ``|W * G|`` (snip) becomes the mask; gradients are dropped as soon as they are
    folded in and each layer's accumulator is freed after its top-K (see
    :func:`adapterlab.tuners.shira.calibrate_masks_`). Only the indices change, the K value
    parameters stay the same objects, so an optimizer built before is still valid.

    Adapters whose masks are already fixed (calibrated before, or loaded from a checkpoint when
    resuming) are skipped, so a resumed run keeps its masks.

    Under ``torchrun`` / ``accelerate launch`` (DDP) each rank calibrates on its shard of the
    batches, the gradient statistics are averaged over the ranks before the top-K (see
    :func:`~adapterlab.tuners.shira.calibrate_masks_`), and afterwards every SHiRA adapter's
    ``mask_type`` and ``random_seed`` and its masks are checked equal on all ranks (one clear error
    naming the value per rank otherwise); add the callback for ``random`` masks too, for that check.

    Args:
        batches: calibration batches (tensors of input ids or dicts with ``input_ids``); default:
            the Trainer's training dataloader (a separate pass over it).
        num_batches: how many batches (default: the adapter config's ``calibration_batches``).
        adapter_name: only this adapter (default: every pending grad/snip adapter).
        grad_accum: ``sum`` or ``abs`` (default: the config's).
    """

    def __init__(
        self,
        batches: Iterable[Any] | None = None,
        *,
        num_batches: int | None = None,
        adapter_name: str | None = None,
        grad_accum: str | None = None,
    ) -> None:
        if num_batches is not None and (
            isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
        ):
            raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
        self.batches = batches
        self.num_batches = num_batches
        self.adapter_name = adapter_name
        self.grad_accum = grad_accum
        self.reports: list[CalibrationReport] = []

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        pending = pending_adapters(model)
        if self.adapter_name is not None:
            if self.adapter_name not in find_tuner(model, ShiraModel).peft_config:
                raise ValueError(f"ShiraMaskCallback: unknown adapter {self.adapter_name!r}")
            pending = [n for n in pending if n == self.adapter_name]
        if not pending:
            logger.info("ShiraMaskCallback: no grad/snip mask awaiting calibration")
            check_masks_equal_on_all_ranks(model)
            return
        source = self.batches if self.batches is not None else kwargs.get("train_dataloader")
        if source is None:
            raise ValueError(
                "ShiraMaskCallback needs calibration batches: pass batches=... or train with a Trainer dataloader"
            )
        for name in pending:
            report = calibrate_masks_(
                model, source, adapter_name=name, max_batches=self.num_batches, grad_accum=self.grad_accum
            )
            self.reports.append(report)
            logger.info("ShiraMaskCallback: %s mask of %r from %d batches", report.mask_type, name, report.batches)
        check_masks_equal_on_all_ranks(model)


def check_masks_equal_on_all_ranks(model: Any) -> None:
    """Raise ``ValueError`` unless every SHiRA adapter has the same settings and masks on all ranks (no-op in one process)."""
    if not distributed.is_distributed():
        return
    tuner = find_tuner(model, ShiraModel)
    settings = {
        name: {"mask_type": cfg.mask_type, "random_seed": cfg.random_seed}
        for name, cfg in tuner.peft_config.items()
        if isinstance(cfg, ShiraConfig)
    }
    distributed.check_equal_on_all_ranks(settings, "the SHiRA adapters' mask_type / random_seed")
    for name in settings:
        digests = [
            distributed.fingerprint(layer.adapterlab_shira_indices[name]) for _, layer in shira_layers(model, name)
        ]
        digest = hashlib.sha256("|".join(digests).encode()).hexdigest()[:16]
        distributed.check_equal_on_all_ranks(digest, f"the mask (digest of the indices) of SHiRA adapter {name!r}")
