"""Prune -> PERP retrain -> merge -> evaluate, as one Python call (used by the PERP recipe).

:func:`retrain_` trains whatever is trainable in a model with the causal-LM loss under
``transformers.Trainer`` (AdamW, linear schedule with warm-up, as the PERP reference), adding
:class:`adapterlab.callbacks.MaskKeeperCallback` whenever a pruned base weight is trainable.
:func:`run_perp_pipeline` runs the four steps on the embedded model (or a given one) and returns
the perplexities, the trainable fraction and the sparsity after the merge.

Reference:
    Zimmer et al., PERP, https://arxiv.org/abs/2312.15230
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterlab import distributed
from adapterlab.progress import ProgressFactory

logger = logging.getLogger(__name__)


class _Windows(torch.utils.data.Dataset):
    """``(n, seqlen)`` token windows as causal-LM examples."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _needs_mask_keeper(model: nn.Module) -> bool:
    from adapterlab.pruning.pruner import prunable_linears
    from adapterlab.quant import base_named_modules

    base = {id(m) for _, m in base_named_modules(model)}  # adapter factors (LoRA B = 0 at init) are not pruned
    return any(
        id(lin) in base and lin.weight.requires_grad and bool((lin.weight == 0).any())
        for lin in prunable_linears(model).values()
    )


@dataclass
class RetrainResult:
    """Loss history and cost of :func:`retrain_`."""

    steps: int
    losses: list[float]
    seconds: float
    mask_keeper: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retrain_(
    model: nn.Module,
    train_ids: torch.Tensor,
    *,
    steps: int,
    lr: float = 5e-4,
    batch_size: int = 2,
    grad_accum: int = 1,
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    seed: int = 0,
    mask_keeper: bool | None = None,
    callbacks: Sequence[Any] = (),
) -> RetrainResult:
    """Train the trainable parameters of ``model`` on token windows with the causal-LM loss, in place.

    Args:
        model: a causal LM (e.g. prepared by :func:`adapterlab.perp_`).
        train_ids: ``(n, seqlen)`` LongTensor of training windows (cycled over).
        steps: optimizer steps.
        lr / warmup_ratio / weight_decay / max_grad_norm: AdamW with a linear schedule.
        batch_size / grad_accum: windows per micro-batch / micro-batches per step.
        mask_keeper: add :class:`~adapterlab.callbacks.MaskKeeperCallback` (default: when a
            pruned decoder weight is trainable).
        callbacks: more ``TrainerCallback`` s.

    Under ``torchrun`` / ``accelerate launch`` every process calls it with its model (the Trainer runs
    DDP; ``batch_size`` is per process); the seed, the step count and the trainable parameters are
    checked equal on all ranks first.

    Returns:
        A :class:`RetrainResult`.
    """
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from adapterlab.callbacks.mask_keeper import MaskKeeperCallback

    if train_ids.dim() != 2:
        raise ValueError(f"train_ids must be (n, seqlen) token windows, got shape {tuple(train_ids.shape)}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameter (call adapterlab.perp_ first)")
    trainable = [f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters() if p.requires_grad]
    distributed.check_equal_on_all_ranks(
        {"seed": seed, "steps": steps, "trainable": hashlib.sha256("|".join(trainable).encode()).hexdigest()[:16]},
        "retrain_'s seed, steps and trainable parameters",
    )
    keep = _needs_mask_keeper(model) if mask_keeper is None else bool(mask_keeper)
    cbs = list(callbacks) + ([MaskKeeperCallback()] if keep else [])
    scratch = Path(tempfile.mkdtemp(prefix="adapterlab-retrain-"))
    args = TrainingArguments(
        output_dir=str(scratch),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=int(round(warmup_ratio * steps)),
        weight_decay=weight_decay,
        max_grad_norm=max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    start = time.perf_counter()
    try:
        trainer = Trainer(model=model, args=args, train_dataset=_Windows(train_ids), callbacks=cbs)
        trainer.remove_callback(PrinterCallback)
        model.train()
        trainer.train()
    finally:
        model.eval()
        shutil.rmtree(scratch, ignore_errors=True)
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    return RetrainResult(
        steps=int(trainer.state.global_step), losses=losses, seconds=time.perf_counter() - start, mask_keeper=keep
    )


@dataclass
class PerpPipelineResult:
    """What :func:`run_perp_pipeline` measured."""

    settings: dict[str, Any]
    ppl_dense: float | None
    ppl_pruned: float
    ppl_retrained: float
    trainable: int
    trainable_fraction: float
    sparsity_after_merge: float
    nm_valid: bool | None
    losses: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    output_dir: str | None = None

    @property
    def gap_closed(self) -> float | None:
        """``(ppl_pruned - ppl_retrained) / (ppl_pruned - ppl_dense)``."""
        if self.ppl_dense is None or self.ppl_pruned == self.ppl_dense:
            return None
        return (self.ppl_pruned - self.ppl_retrained) / (self.ppl_pruned - self.ppl_dense)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gap_closed": self.gap_closed}


def run_perp_pipeline(
    model: nn.Module | None = None,
    tokenizer: Any = None,
    *,
    method: str = "wanda",
    sparsity: float | None = 0.5,
    pattern: str | None = None,
    calib_samples: int = 32,
    calib_seqlen: int = 256,
    scope: str | Sequence[str] = "mask_lora",
    r: int = 4,
    alpha: float = 8.0,
    steps: int = 60,
    lr: float = 5e-4,
    batch_size: int = 2,
    grad_accum: int = 1,
    seqlen: int = 256,
    eval_seqlen: int = 512,
    eval_windows: int | None = 16,
    evaluate_dense: bool = True,
    corpus: str = "wiki",
    seed: int = 0,
    output_dir: str | Path | None = None,
    progress: ProgressFactory | None = None,
) -> PerpPipelineResult:
    """Prune -> PERP retrain -> merge -> evaluate (wiki perplexity), in one call.

    Args:
        model / tokenizer: the dense model (default: the embedded SmolLM2-135M); modified in place.
        method / sparsity / pattern / calib_samples / calib_seqlen: passed to :func:`adapterlab.prune_`
            with calibration windows of the packaged wiki train split.
        scope / r / alpha: passed to :func:`adapterlab.perp_`.
        steps / lr / batch_size / grad_accum / seqlen: the retraining budget (windows of the wiki
            train split, drawn with ``seed + 1``, disjoint in seed from the calibration windows).
        eval_seqlen / eval_windows: perplexity on the held-out wiki split.
        evaluate_dense: also measure the dense model first.
        corpus: packaged corpus for calibration, retraining and perplexity (``wiki`` | ``lee``).
        output_dir: if given, the merged model (safetensors) and ``perp_result.json`` are written there
            (staged and renamed: nothing partial on failure; by rank 0 only in a distributed run).

    Returns:
        A :class:`PerpPipelineResult`.
    """
    from adapterlab.data import calibration_ids, eval_ids
    from adapterlab.evaluate import perplexity
    from adapterlab.models import load_default_model
    from adapterlab.pruning import prune_, sparsity_of
    from adapterlab.retrain.perp import merge_perp_, perp_, resolve_scope

    subsets = resolve_scope(scope)  # validate before the expensive steps
    if model is None:
        model, tokenizer = load_default_model()
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    settings = {
        "method": method,
        "sparsity": sparsity,
        "pattern": pattern,
        "calib_samples": calib_samples,
        "calib_seqlen": calib_seqlen,
        "scope": list(subsets),
        "r": r,
        "alpha": alpha,
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "seqlen": seqlen,
        "eval_seqlen": eval_seqlen,
        "eval_windows": eval_windows,
        "seed": seed,
        "corpus": corpus,
    }
    ids = eval_ids(tokenizer, corpus)
    timings: dict[str, float] = {}

    def ppl() -> float:
        return perplexity(model, ids, seqlen=eval_seqlen, max_windows=eval_windows, progress=progress)

    t = time.perf_counter()
    dense = ppl() if evaluate_dense else None
    timings["eval_dense"] = time.perf_counter() - t
    t = time.perf_counter()
    calib = calibration_ids(tokenizer, n_samples=calib_samples, seqlen=calib_seqlen, seed=seed, corpus=corpus)
    prune_(model, method, sparsity, pattern=pattern, calibration=calib, progress=progress)
    timings["prune"] = time.perf_counter() - t
    pruned = ppl()
    report = perp_(model, subsets, r=r, alpha=alpha, seed=seed)
    train = calibration_ids(
        tokenizer, n_samples=steps * batch_size * grad_accum, seqlen=seqlen, seed=seed + 1, corpus=corpus
    )
    result = retrain_(model, train, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed)
    timings["retrain"] = result.seconds
    nm_valid = None
    if report.needs_mask_keeper:
        model.requires_grad_(False)
    else:
        nm_valid = merge_perp_(model, pattern=pattern).nm_valid
    model.requires_grad_(False)
    t = time.perf_counter()
    retrained = ppl()
    timings["eval_retrained"] = time.perf_counter() - t
    out = PerpPipelineResult(
        settings=settings,
        ppl_dense=dense,
        ppl_pruned=pruned,
        ppl_retrained=retrained,
        trainable=report.trainable,
        trainable_fraction=report.fraction,
        sparsity_after_merge=sparsity_of(model),
        nm_valid=nm_valid,
        losses=result.losses,
        seconds=timings,
        output_dir=str(output_dir) if output_dir is not None else None,
    )
    if output_dir is not None and distributed.is_rank0():  # only rank 0 writes
        from adapterlab.staging import staged_dir

        with staged_dir(Path(output_dir), overwrite=True) as stage:
            model.save_pretrained(str(stage), safe_serialization=True)
            tokenizer.save_pretrained(str(stage))
            (stage / "perp_result.json").write_text(json.dumps(out.to_dict(), indent=2) + "\n", encoding="utf-8")
    logger.info("PERP pipeline: ppl dense %s, pruned %.3f, retrained %.3f", dense, pruned, retrained)
    return out
