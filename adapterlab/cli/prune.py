"""`adapterlab prune`: prune a model folder (magnitude, Wanda, SparseGPT; unstructured or N:M)."""

from __future__ import annotations

import logging
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
    from adapterlab.jobs.prune import check_prune, run_prune
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    plan = check_prune(  # validates everything before loading anything
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
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich bar shows the progress
    with progress() as prog:
        job = run_prune(plan, progress=rich_factory(prog))
    console.print(_summary(job.report, output))
    console.print(f"wrote {output} (mask sha256 {job.mask_sha256[:12]}, {job.report.seconds:.1f} s)")
