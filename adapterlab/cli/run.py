"""`adapterlab run RECIPE.yaml`: run a pipeline of steps (prune, train, perp, merge, extract, compress, put, evaluate)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

logger = logging.getLogger(__name__)

HELP = (
    "Run a pipeline YAML (examples in recipes/pipelines/): a list of steps, each one verb key (prune, train, "
    "perp, merge, extract, compress, put, evaluate) whose body is what that verb accepts on its own. A step "
    "uses an earlier step's result as ${steps.NAME.output} (or ${NAME}). The whole pipeline is checked "
    "(keys, references, inputs, outputs) before the first step runs. A file with a single verb key "
    "(recipes/prune/, recipes/extract/) is a one-step pipeline."
)


@user_errors
def command(
    recipe: Path = typer.Argument(..., help="Pipeline YAML (see recipes/pipelines/)."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a key: --set steps.1.train.trainer.max_steps=20 (repeatable)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the pipeline and print the plan; run nothing."),
    no_put: bool = typer.Option(False, "--no-put", help="Skip registry writes of train and put steps."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.progress import rich_factory
    from adapterlab.recipe import check_pipeline, load_pipeline, plan, run_pipeline

    setup_logging(verbose)
    pipeline = load_pipeline(recipe, set_)
    check_pipeline(pipeline, recipe)
    table = Table(title=f"adapterlab run{' --dry-run' if dry_run else ''}: {recipe}")
    for col in ("#", "step", "verb", "what"):
        table.add_column(col)
    for i, row in enumerate(plan(pipeline)):
        table.add_row(str(i + 1), row["name"], row["verb"], row["what"])
    console.print(table)
    if dry_run:
        console.print("nothing run")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with progress() as prog:
        result = run_pipeline(pipeline, source=recipe, put=not no_put, progress=rich_factory(prog), checked=True)
    done = Table(title="results")
    for col in ("step", "outputs", "time"):
        done.add_column(col)
    for name, outs in result.outputs.items():
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in outs.items() if v is not None
        )
        done.add_row(name, shown, f"{result.seconds[name]:.1f} s")
    console.print(done)
