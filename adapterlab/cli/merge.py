"""`adapterlab merge CONFIG.yaml -o OUT`: merge LoRA adapters (linear, task arithmetic, TIES, DARE, RMM)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from adapterlab.cli._common import (
    console,
    hub_option,
    progress,
    resolve_hub,
    setup_logging,
    short_module_names,
    user_errors,
)

logger = logging.getLogger(__name__)

HELP = (
    "Merge LoRA adapters of one base as dense deltas with linear, task_arithmetic, ties, dare_linear, "
    "dare_ties or rmm, described by a YAML file (method, adapters with weights, params, output; "
    "examples in recipes/merge/). Writes a PEFT LoRA folder of a chosen rank (retained energy reported "
    "per module), a sparse delta, a full merged model (output.keep_sparsity: true keeps a pruned base's "
    "zeros), or an RMM bundle to OUTPUT. Relative adapter "
    "paths are looked up in the current folder, then next to the YAML file."
)


def _summary(result: Any, output: Path, limit: int = 40) -> Table:
    table = Table(title=f"adapterlab merge: {result.method} -> {output} ({result.output})")
    for col in ("module", "shape", "rank", "energy", "rel. error", "density", "time"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    short, dropped = short_module_names([m.name for m in result.modules])
    for m, name in zip(result.modules[:limit], short, strict=False):
        table.add_row(
            name,
            "x".join(map(str, m.shape)),
            "-" if m.rank is None else str(m.rank),
            "-" if m.energy is None else f"{m.energy:.4f}",
            "-" if m.error is None else f"{m.error:.2e}",
            "-" if m.density is None else f"{m.density:.2%}",
            f"{m.seconds * 1000:.1f} ms",
        )
    if len(result.modules) > limit:
        table.add_row(f"... {len(result.modules) - limit} more", "", "", "", "", "", "")
    energies = [m.energy for m in result.modules if m.energy is not None]
    table.caption = (
        f"{len(result.modules)} modules, {result.seconds:.2f} s"
        + (f", min energy {min(energies):.4f}" if energies else "")
        + ("" if result.base_zeros_hit is None else f", {result.base_zeros_hit} zero weights of the base filled")
        + (f"; module names without {', '.join(dropped)}" if dropped else "")
    )
    return table


@user_errors
def command(
    config: Path = typer.Argument(..., help="Merge YAML (see recipes/merge/)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the merged adapter / model to."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config and adapters, show the plan, write nothing."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a config key: --set params.density=0.3 (repeatable)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    put: str | None = typer.Option(None, "--put", help="Also put the merged LoRA into the registry under this name."),
    hub: Path | None = hub_option("Registry root for --put and hub: refs"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.jobs.merge import check_merge, put_merge, run_merge
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    plan = check_merge(config, output, sets=set_, overwrite=overwrite, put=put, hub=resolve_hub(hub))
    if dry_run:
        cfg = plan.config
        table = Table(title=f"adapterlab merge --dry-run: {cfg.method} ({cfg.output.format or 'auto'}) -> {output}")
        table.add_column("adapter", overflow="fold")
        table.add_column("weight", justify="right", overflow="fold")
        table.add_column("modules", justify="right", overflow="fold")
        table.add_column("rank(s)", justify="right", overflow="fold")
        for row in plan.adapters():
            table.add_row(
                row["name"],
                "-" if row["weight"] is None else f"{row['weight']:g}",
                str(row["modules"]),
                ",".join(map(str, row["ranks"])),
            )
        table.caption = f"{len(plan.shapes)} modules in the union; params {cfg.params or '{}'}; nothing written"
        console.print(table)
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with progress() as prog:
        job = run_merge(plan, progress=rich_factory(prog))
    result = job.result
    console.print(_summary(result, output))
    for note in result.warnings:
        logger.warning(note)
    console.print(f"wrote {output}")
    digest = put_merge(plan, job)
    if digest is not None:
        console.print(f"put {output} -> hub:{put} ({digest[:12]})", highlight=False)
