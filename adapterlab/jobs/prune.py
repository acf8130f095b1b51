"""Prune a model folder into a new folder: the job behind ``adapterlab prune`` and the pipeline's prune step.

:func:`check_prune` validates every option and the model's config (on a weightless meta-device
copy) and loads no weights; :func:`run_prune` loads, calibrates, prunes and writes the output folder
staged (model + tokenizer, ``masks.safetensors``, ``sparsity_report.json``; nothing partial on
error). :func:`prune_folder` does both.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterlab.progress import ProgressFactory
from adapterlab.staging import check_output_dir

if TYPE_CHECKING:
    from adapterlab.pruning import PruneReport

logger = logging.getLogger(__name__)

__all__ = ["PruneJobResult", "PrunePlan", "check_prune", "prune_folder", "run_prune"]


@dataclass(frozen=True)
class PrunePlan:
    """A validated prune job (see :func:`check_prune`); nothing is loaded yet."""

    model: str
    method: str
    target: float
    pattern: str | None
    scope: str | None
    nsamples: int
    seqlen: int
    seed: int
    batch_size: int
    output: Path
    overwrite: bool
    needs_calibration: bool

    @property
    def is_nm(self) -> bool:
        return self.pattern is not None


@dataclass
class PruneJobResult:
    """What :func:`run_prune` wrote.

    Attributes:
        output: the model folder written.
        report: the library's :class:`~adapterlab.pruning.PruneReport`.
        info: the content of ``sparsity_report.json`` (the report plus model, mask_sha256, seed, seqlen).
    """

    output: Path
    report: PruneReport
    info: dict[str, Any]

    @property
    def mask_sha256(self) -> str:
        return str(self.info["mask_sha256"])

    @property
    def sparsity(self) -> float:
        return self.report.global_sparsity


def _validate_model_config(path: Path, nm: tuple[int, int] | None, seqlen: int | None) -> None:
    """Check the context length and, for N:M, every prunable layer's d_in on a weightless
    (meta-device) copy of the model, before any weights are loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterlab.pruning import prunable_linears

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    limit = getattr(config, "max_position_embeddings", None)
    if seqlen is not None and limit is not None and seqlen > limit:
        raise ValueError(f"--seqlen {seqlen} exceeds the model's context length {limit}")
    if nm is None:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    for name, lin in prunable_linears(skeleton).items():
        if lin.in_features % nm[1]:
            raise ValueError(
                f"pattern '{nm[0]}:{nm[1]}' needs d_in % M == 0, but layer {name!r} has "
                f"d_in={lin.in_features} (M={nm[1]})"
            )


def check_prune(
    *,
    output: str | os.PathLike[str],
    model: str = "default",
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | None = None,
    scope: str | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
) -> PrunePlan:
    """Validate a prune job without loading weights.

    Raises:
        ValueError / FileNotFoundError / FileExistsError: one line naming the option and value.
    """
    from adapterlab import models
    from adapterlab.pruning import PRUNERS
    from adapterlab.pruning.functional import parse_pattern, resolve_sparsity

    out = Path(output)
    pruner_cls = PRUNERS.get(method)
    nm = parse_pattern(pattern)
    target = resolve_sparsity(0.5 if sparsity is None and nm is None else sparsity, nm)
    if scope is not None and scope not in pruner_cls.scopes:
        raise ValueError(
            f"unknown scope {scope!r} for pruning method {method!r}; choose one of: {', '.join(pruner_cls.scopes)}"
        )
    for flag, value in (("--nsamples", nsamples), ("--seqlen", seqlen), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    check_output_dir(out, overwrite)
    path = models.resolve_model_path(model)
    if not models.is_default(model) and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model)!r} has no config.json")
    _validate_model_config(path, nm, seqlen if pruner_cls.needs_calibration else None)
    if nm is not None and sparsity is not None and abs(sparsity - target) > 1e-9:
        logger.warning("--pattern %s implies sparsity %.4g; ignoring --sparsity %g", pattern, target, sparsity)
    return PrunePlan(
        model=model,
        method=method,
        target=target,
        pattern=pattern,
        scope=scope,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        batch_size=batch_size,
        output=out,
        overwrite=overwrite,
        needs_calibration=pruner_cls.needs_calibration,
    )


def run_prune(plan: PrunePlan, *, progress: ProgressFactory | None = None) -> PruneJobResult:
    """Load the model, calibrate (wanda, sparsegpt), prune and write the output folder staged."""
    from adapterlab import models
    from adapterlab.pruning import get_masks, prune_, save_masks
    from adapterlab.staging import staged_dir

    tok = models.load_tokenizer(plan.model)
    lm = models.load_model(plan.model)
    calibration = None
    if plan.needs_calibration:
        data = importlib.import_module("adapterlab.data")
        calibration = data.calibration_ids(
            tok, n_samples=plan.nsamples, seqlen=plan.seqlen, seed=plan.seed, corpus="wiki"
        )
    report = prune_(
        lm,
        plan.method,
        plan.target if not plan.is_nm else None,
        pattern=plan.pattern,
        calibration=calibration,
        scope=plan.scope,
        progress=progress,
        batch_size=plan.batch_size,
    )
    with staged_dir(plan.output, plan.overwrite) as stage:
        lm.save_pretrained(str(stage))
        tok.save_pretrained(str(stage))
        digest = save_masks(
            stage / "masks.safetensors",
            get_masks(lm),
            metadata={"method": report.method, "pattern": report.pattern or "unstructured"},
        )
        info = report.to_dict()
        info.update(
            {
                "model": str(plan.model),
                "mask_sha256": digest,
                "seed": plan.seed,
                "seqlen": plan.seqlen if calibration is not None else None,
            }
        )
        (stage / "sparsity_report.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return PruneJobResult(output=plan.output, report=report, info=info)


def prune_folder(
    output: str | os.PathLike[str],
    *,
    model: str = "default",
    method: str = "wanda",
    sparsity: float | None = None,
    pattern: str | None = None,
    scope: str | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
) -> PruneJobResult:
    """Prune the decoder linears of ``model`` (a folder or ``"default"``) and write the result to ``output``.

    Every option is checked before any weights load (see :func:`check_prune`); on an error nothing
    is written.

    Args:
        output: the folder to write (model + tokenizer, ``masks.safetensors``, ``sparsity_report.json``).
        model: a model folder or ``"default"`` (the embedded model).
        method: ``magnitude``, ``wanda`` or ``sparsegpt``.
        sparsity: unstructured fraction in ``[0, 1)`` (default 0.5); implied by ``pattern`` if given.
        pattern: ``"N:M"`` semi-structured, or None.
        scope: the magnitude comparison scope (``matrix`` / ``row``).
        nsamples, seqlen, seed, batch_size: the calibration windows (wanda, sparsegpt).
        overwrite: replace a non-empty ``output``.
        progress: a :data:`~adapterlab.progress.ProgressFactory` (default: silent).
    """
    plan = check_prune(
        output=output,
        model=model,
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        scope=scope,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        batch_size=batch_size,
        overwrite=overwrite,
    )
    return run_prune(plan, progress=progress)
