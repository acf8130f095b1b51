"""`adapterlab export`: any adapter -> a plain PEFT LoRA folder that vLLM / LoRAX / SGLang serve."""

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
    "Export any adapter (LoRA, rsLoRA, LoRI, DyLoRA, SHiRA, SNELL, SPP, LoRS, a shared-basis bundle member, an RMM "
    "task, a merge) as a plain PEFT LoRA folder. Exact where the math allows (error 0); otherwise a truncated SVD per "
    "module with its relative Frobenius error, the rank fixed (--rank) or per module by kept energy (--energy); "
    "--max-error refuses to write above a bound. --for vllm pads ranks to vLLM's set (zero columns, exact) and "
    "records --served-name as the base. Writes the folder plus export_report.json to OUTPUT."
)


def summary(result: Any, output: Path | None, limit: int = 40) -> Table:
    """The per-module table: how each module was exported, its rank and error."""
    table = Table(title=f"adapterlab export ({result.kind} -> lora){f' -> {output}' if output else ''}")
    for col in ("module", "shape", "how", "rank", "from rank", "rel. error", "energy"):
        table.add_column(col, justify="left" if col in ("module", "how") else "right", overflow="fold")
    short, dropped = short_module_names([m.name for m in result.modules])
    for m, name in zip(result.modules[:limit], short):
        table.add_row(
            name,
            "x".join(map(str, m.shape)),
            m.how,
            str(m.rank),
            "-" if m.source_rank is None else str(m.source_rank),
            f"{m.error:.3e}",
            f"{m.energy:.4f}",
        )
    if len(result.modules) > limit:
        table.add_row(f"... {len(result.modules) - limit} more", "", "", "", "", "", "")
    worst = max((m.error for m in result.modules), default=0.0)
    table.caption = (
        f"{'exact' if result.exact else 'truncated'}: total relative error {result.total_error:.3e}, worst module "
        f"{worst:.3e}; written rank {result.rank}{' (vLLM)' if result.for_vllm else ''}, {result.dtype}; "
        f"{result.seconds:.2f} s" + (f"; module names without {', '.join(dropped)}" if dropped else "")
    )
    return table


@user_errors
def command(
    adapter: str = typer.Argument(
        ..., help="Adapter folder, hub:NAME, a shared-basis bundle (with --member) or an RMM merge (with --task)."
    ),
    to: str = typer.Option("lora", "--to", help="The output format: lora (a plain PEFT LoRA)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the LoRA to."),
    rank: int | None = typer.Option(
        None, "--rank", "-r", help="Rank of every module (DyLoRA: its nested rank, exact; below r: truncated)."
    ),
    energy: float | None = typer.Option(
        None, "--energy", "-e", help="Per module: the smallest rank keeping this fraction of the spectral energy."
    ),
    max_error: float | None = typer.Option(
        None, "--max-error", help="Refuse (write nothing, exit 2) when a module's relative error is above this."
    ),
    for_: str | None = typer.Option(None, "--for", help="Serving engine to make it servable by: vllm."),
    served_name: str | None = typer.Option(
        None, "--served-name", help="base_model_name_or_path to write: the name the server serves the base under."
    ),
    base: str | None = typer.Option(
        None, "--base", "-b", help="Base model for DyLoRA / SNELL / SPP / LoRS adapters (default: their recorded base)."
    ),
    member: str | None = typer.Option(None, "--member", help="The adapter of a shared-basis bundle to export."),
    task: str | None = typer.Option(None, "--task", help="The task of an RMM merge to export."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Written dtype: float32, float16 or bfloat16 (default: the adapter's)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    put: str | None = typer.Option(None, "--put", help="Also put the exported LoRA into the registry under this name."),
    hub: Path | None = hub_option("Registry root for hub: refs and --put"),
    rows: int = typer.Option(40, "--rows", help="Rows shown in the table."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.jobs.export import check_export, put_export, run_export
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    plan = check_export(
        adapter,
        output=output,
        to=to,
        rank=rank,
        energy=energy,
        max_error=max_error,
        for_=for_,
        served_name=served_name,
        base=base,
        member=member,
        task=task,
        dtype=dtype,
        overwrite=overwrite,
        put=put,
        hub=resolve_hub(hub),
    )
    with progress() as prog:
        job = run_export(plan, progress=rich_factory(prog))
    console.print(summary(job.result, output, rows))
    console.print(f"wrote {output} (report: {output / 'export_report.json'})", highlight=False)
    digest = put_export(plan, job)
    if digest is not None:
        console.print(f"put {output} -> hub:{put} ({digest[:12]})", highlight=False)
