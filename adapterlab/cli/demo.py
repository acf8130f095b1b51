"""`adapterlab demo`: the main job, a tour on the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

HELP = (
    "Run the adapterlab tour on the embedded SmolLM2-135M-Instruct: evaluate the dense model, "
    "prune it with magnitude, Wanda and SparseGPT, evaluate each pruned model (held-out wiki "
    "perplexity, sentiment accuracy, exact sparsity) and print a table. Needs `adapterlab assets` "
    "once. Takes a few minutes on 2 CPU cores."
)


@user_errors
def command(
    methods: str = typer.Option("magnitude,wanda,sparsegpt", "--methods", help="Comma-separated pruning methods."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Unstructured sparsity in [0, 1)."),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M pattern instead (e.g. 2:4)."),
    nsamples: int = typer.Option(32, "--nsamples", help="Calibration windows for Wanda/SparseGPT."),
    eval_windows: int = typer.Option(20, "--eval-windows", help="512-token wiki windows for perplexity (0 = all)."),
    task_n: int = typer.Option(300, "--task-n", help="Sentiment test examples to score (0 = all)."),
    output: Path = typer.Option(Path("out/demo"), "--output", "-o", help="Folder for results.json."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.demo import DemoConfig, rows_to_dicts, run_demo
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    cfg = DemoConfig(
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        sparsity=sparsity,
        pattern=pattern,
        nsamples=nsamples,
        eval_windows=eval_windows or None,
        task_n=task_n or None,
    )
    from adapterlab.models import default_model_dir

    default_model_dir()  # fail fast (one line) if the embedded model is missing
    with progress() as prog:
        rows = run_demo(cfg, progress=rich_factory(prog))
    table = Table(title="adapterlab demo — SmolLM2-135M-Instruct (weights on a 4-bit grid)")
    for col in ("model", "wiki ppl", f"{cfg.task} acc", "sparsity", "prune s"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(
            r.name,
            f"{r.perplexity:.2f}",
            f"{r.accuracy:.3f}",
            f"{r.sparsity:.2%}",
            "" if r.prune_seconds is None else f"{r.prune_seconds:.1f}",
        )
    console.print(table)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(
        json.dumps({"config": cfg.__dict__, "rows": rows_to_dicts(rows)}, indent=2)
    )
    console.print(f"results written to {output / 'results.json'}")
