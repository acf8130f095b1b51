"""`adapterlab extract`: PHLoRA — a LoRA adapter from a base and a fully fine-tuned model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from adapterlab.cli._common import console, hub_option, progress, resolve_hub, setup_logging, user_errors

logger = logging.getLogger(__name__)

HELP = (
    "Extract a LoRA adapter from a full fine-tune (PHLoRA): per linear layer, a truncated SVD of the "
    "fp32 weight delta, rank fixed (--rank) or per layer by retained energy (--energy), split sqrt(S) "
    "on both factors. Changed embeddings / LM head / norms are stored as modules_to_save (or skipped "
    "with --skip-extras) and reported. Writes a PEFT LoRA folder plus phlora_report.json to OUTPUT."
)


def _summary(result: Any, output: Path, limit: int = 40) -> Table:
    table = Table(title=f"adapterlab extract -> {output}")
    for col in ("module", "shape", "stored as", "rank", "energy", "rel. change", "time"):
        table.add_column(col, justify="left" if col in ("module", "stored as") else "right")
    rows = [m for m in result.modules if m.stored_as != "unchanged"]
    for m in rows[:limit]:
        table.add_row(
            m.name,
            "x".join(map(str, m.shape)),
            m.stored_as,
            "-" if m.rank is None else str(m.rank),
            "-" if m.energy is None else f"{m.energy:.4f}",
            f"{m.delta_rel:.2e}",
            f"{m.seconds * 1000:.1f} ms",
        )
    if len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} more", "", "", "", "", "", "")
    unchanged = len(result.modules) - len(rows)
    table.caption = (
        f"global energy {result.global_energy:.4f}; {len(result.factors)} LoRA modules, "
        f"{len(result.extras)} modules_to_save, {unchanged} unchanged; {result.n_params():,} parameters; "
        f"{result.seconds:.2f} s"
    )
    return table


@user_errors
def command(
    base: str = typer.Option(
        ..., "--base", "-b", help="Base model folder, or 'default' (embedded SmolLM2-135M-Instruct)."
    ),
    tuned: str = typer.Option(..., "--tuned", "-t", help="Fully fine-tuned model folder of the same architecture."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the PEFT LoRA adapter to."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="Fixed rank for every layer."),
    energy: float | None = typer.Option(
        None, "--energy", "-e", help="Per-layer rank: smallest k keeping this energy fraction, in (0, 1]."
    ),
    energy_scope: str = typer.Option(
        "module",
        "--energy-scope",
        help="module: each layer keeps --energy of its own delta (PHLoRA); global: the fewest parameters that keep "
        "--energy of the whole model's delta (ranks go where σ²/(d_out+d_in) is largest).",
    ),
    min_rank: int = typer.Option(1, "--min-rank", help="Lower clip of the energy rank."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="Upper clip of the energy rank."),
    randomized: bool = typer.Option(False, "--randomized", help="Randomized SVD (needs --rank)."),
    solver: str = typer.Option(
        "svd",
        "--solver",
        help="svd (LAPACK, exact) or gram (eigh of the Gram matrix: "
        "same truncation, ~3x faster on CPU; tiny singular values lose precision).",
    ),
    skip_extras: bool = typer.Option(
        False, "--skip-extras", help="Do not store changed embeddings / LM head / norms (still reported)."
    ),
    threshold: float = typer.Option(
        1e-4, "--threshold", help="Relative change above which a non-linear parameter counts as changed."
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Saved dtype: float32, float16 or bfloat16 (default: the tuned model's)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    put: str | None = typer.Option(
        None, "--put", help="Also put the extracted LoRA into the registry under this name."
    ),
    hub: Path | None = hub_option("Registry root for --put"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.jobs.extract import check_extract, put_extract, run_extract
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    plan = check_extract(
        base=base,
        tuned=tuned,
        output=output,
        rank=rank,
        energy=energy,
        energy_scope=energy_scope,
        min_rank=min_rank,
        max_rank=max_rank,
        randomized=randomized,
        solver=solver,
        skip_extras=skip_extras,
        threshold=threshold,
        dtype=dtype,
        overwrite=overwrite,
        put=put,
        hub=resolve_hub(hub),
    )
    with progress() as prog:
        job = run_extract(plan, progress=rich_factory(prog))
    console.print(_summary(job.result, output))
    console.print(f"wrote {output}")
    digest = put_extract(plan, job)
    if digest is not None:
        console.print(f"put {output} -> hub:{put} ({digest[:12]})", highlight=False)
