"""`adapterlab prune`: prune a model folder (magnitude, Wanda, SparseGPT; unstructured or N:M)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

if TYPE_CHECKING:
    from adapterlab.pruning import PruneReport

logger = logging.getLogger(__name__)

HELP = (
    "Prune every linear layer inside the decoder blocks of a model (embeddings, norms and the "
    "LM head stay dense) with magnitude, wanda or sparsegpt, unstructured (--sparsity) or N:M "
    "(--pattern 2:4). Calibration windows come from the packaged wiki corpus' training split. "
    "Writes the pruned model folder (safetensors + tokenizer), masks.safetensors and "
    "sparsity_report.json to OUTPUT."
)


def _validate_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"output {str(output)!r} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {str(output)!r} exists and is not empty (pass --overwrite to replace it)")


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


def _default_permissions(folder: Path) -> None:
    """mkdtemp and atomic writers create 0700/0600 entries; give them the umask's defaults."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _summary(report: PruneReport, output: Path) -> Table:
    """Per layer kind (q_proj, up_proj, ...) zeros, plus the total."""
    kinds: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in report.layers:
        k = kinds[row.name.rsplit(".", 1)[-1]]
        k[0] += 1
        k[1] += row.zeros
        k[2] += row.numel
    pattern = report.pattern or "unstructured"
    table = Table(title=f"adapterlab prune: {report.method} {pattern} -> {output}")
    table.add_column("layer")
    table.add_column("count", justify="right")
    table.add_column("zeros", justify="right")
    table.add_column("sparsity", justify="right")
    for name, (count, zeros, numel) in kinds.items():
        table.add_row(name, str(count), f"{zeros:,}", f"{zeros / numel:.2%}")
    table.add_row(
        "[bold]total[/]", str(len(report.layers)), f"{report.zeros:,}", f"[bold]{report.global_sparsity:.2%}[/]"
    )
    if report.nm_valid is not None:
        table.caption = f"{pattern} pattern valid in every group: {report.nm_valid}"
    return table


@user_errors
def command(
    model: str = typer.Option(
        "default", "--model", "-m", help="Model folder, or 'default' (embedded SmolLM2-135M-Instruct)."
    ),
    method: str = typer.Option("wanda", "--method", help="Pruning method: magnitude, wanda or sparsegpt."),
    sparsity: float | None = typer.Option(
        None, "--sparsity", help="Fraction pruned, in [0, 1) (unstructured; default 0.5). Ignored with --pattern."
    ),
    pattern: str | None = typer.Option(
        None, "--pattern", help="N:M semi-structured pattern, e.g. 2:4 or 4:8 (omit for unstructured)."
    ),
    scope: str | None = typer.Option(None, "--scope", help="Magnitude comparison scope: matrix (default) or row."),
    nsamples: int = typer.Option(128, "--nsamples", help="Calibration windows (wanda, sparsegpt)."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration windows."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward pass."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the pruned model, masks and report to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab import models
    from adapterlab.progress import rich_factory
    from adapterlab.pruning import PRUNERS, get_masks, prune_, save_masks
    from adapterlab.pruning.functional import parse_pattern, resolve_sparsity

    setup_logging(verbose)
    # --- validate everything before loading anything ---------------------------------------
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
    _validate_output(output, overwrite)
    path = models.resolve_model_path(model)
    if not models.is_default(model) and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model)!r} has no config.json")
    _validate_model_config(path, nm, seqlen if pruner_cls.needs_calibration else None)
    if nm is not None and sparsity is not None and abs(sparsity - target) > 1e-9:
        logger.warning("--pattern %s implies sparsity %.4g; ignoring --sparsity %g", pattern, target, sparsity)

    # --- load, calibrate, prune ------------------------------------------------------------
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich bar shows the progress
    tok = models.load_tokenizer(model)
    lm = models.load_model(model)
    calibration = None
    if pruner_cls.needs_calibration:
        data = importlib.import_module("adapterlab.data")
        calibration = data.calibration_ids(tok, n_samples=nsamples, seqlen=seqlen, seed=seed, corpus="wiki")
    with progress() as prog:
        report = prune_(
            lm,
            method,
            target if nm is None else None,
            pattern=pattern,
            calibration=calibration,
            scope=scope,
            progress=rich_factory(prog),
            batch_size=batch_size,
        )

    # --- write: stage next to the output, then move into place -----------------------------
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.stage-", dir=output.parent))
    try:
        lm.save_pretrained(str(staging))
        tok.save_pretrained(str(staging))
        digest = save_masks(
            staging / "masks.safetensors",
            get_masks(lm),
            metadata={"method": report.method, "pattern": report.pattern or "unstructured"},
        )
        info = report.to_dict()
        info.update(
            {
                "model": str(model),
                "mask_sha256": digest,
                "seed": seed,
                "seqlen": seqlen if calibration is not None else None,
            }
        )
        (staging / "sparsity_report.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        _default_permissions(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    console.print(_summary(report, output))
    console.print(f"wrote {output} (mask sha256 {digest[:12]}, {report.seconds:.1f} s)")
