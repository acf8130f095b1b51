"""`adapterlab demo`: the main job, a tour of the adapter lifecycle on the embedded default model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

HELP = (
    "Run the adapterlab tour on the embedded SmolLM2-135M-Instruct: evaluate the dense model, prune it "
    "(magnitude, Wanda, SparseGPT), train a sparsity-preserving adapter (LoRS or SPP) on the best pruned "
    "base, merge it keeping every pruned zero, extract a LoRA from the merge (PHLoRA), compress it with "
    "two more LoRAs into a shared basis and serve a mixed batch; prints one table (wiki perplexity, task "
    "accuracy, sparsity, stored size, tokens/s, seconds). Needs `adapterlab assets` once. About 12-14 "
    "minutes on 2 CPU cores; --stages dense,prune runs the pruning comparison only."
)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


@user_errors
def command(
    methods: str = typer.Option("magnitude,wanda,sparsegpt", "--methods", help="Comma-separated pruning methods."),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Unstructured sparsity in [0, 1)."),
    pattern: str | None = typer.Option(None, "--pattern", help="N:M pattern instead (e.g. 2:4)."),
    stages: str = typer.Option(
        "dense,prune,adapt,merge,extract,compress,serve",
        "--stages",
        help="Stages to run, in tour order (dense and prune always run; each later stage needs the ones before it).",
    ),
    adapter: str = typer.Option("lors", "--adapter", help="Sparsity-preserving adapter: lors or spp."),
    rank: int = typer.Option(8, "--rank", help="Rank of the adapters and of the PHLoRA extraction."),
    steps: int = typer.Option(100, "--steps", help="Training steps of the sparsity-preserving adapter."),
    extra_steps: int = typer.Option(30, "--extra-steps", help="Training steps of each extra LoRA."),
    lr: float = typer.Option(2e-3, "--lr", help="AdamW learning rate of every adapter."),
    adapt_layers: int = typer.Option(
        30, "--adapt-layers", help="Adapt the last N decoder layers (30 = all layers of the embedded model)."
    ),
    compress_rank: int = typer.Option(12, "--compress-rank", help="Shared-basis rank c."),
    nsamples: int = typer.Option(16, "--nsamples", help="Calibration windows for Wanda/SparseGPT."),
    eval_windows: int = typer.Option(10, "--eval-windows", help="512-token wiki windows for perplexity (0 = all)."),
    task_n: int = typer.Option(200, "--task-n", help="Test examples scored per task (0 = all)."),
    seed: int = typer.Option(0, "--seed"),
    output: Path = typer.Option(
        Path("out/demo"), "--output", "-o", help="Folder for adapters, bundle and results.json."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.demo import DemoConfig, run_tour
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    cfg = DemoConfig(
        methods=_csv(methods),
        sparsity=sparsity,
        pattern=pattern,
        stages=_csv(stages),
        adapter=adapter,
        rank=rank,
        steps=steps,
        extra_steps=extra_steps,
        lr=lr,
        adapt_layers=adapt_layers,
        compress_rank=compress_rank,
        nsamples=nsamples,
        eval_windows=eval_windows or None,
        task_n=task_n or None,
        seed=seed,
    )
    from adapterlab.models import default_model_dir

    default_model_dir()  # fail fast (one line) if the embedded model is missing
    with progress() as prog:
        result = run_tour(cfg, output=output, progress=rich_factory(prog))
    table = Table(title=f"adapterlab demo — SmolLM2-135M-Instruct, {cfg.task} ({result.seconds / 60:.1f} min)")
    for col in ("stage", "model", "wiki ppl", f"{cfg.task} acc", "sparsity", "stored", "tok/s", "s", "note"):
        table.add_column(col, justify="left" if col in ("stage", "model", "note") else "right")
    for r in result.rows:
        table.add_row(
            r.stage,
            r.name,
            _num(r.perplexity, ".2f"),
            _num(r.accuracy, ".3f"),
            _num(r.sparsity, ".2%"),
            _size(r.size_bytes),
            _num(r.tokens_per_s, ".0f"),
            f"{r.seconds:.1f}",
            r.note,
        )
    console.print(table)
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(
        json.dumps({"config": cfg.__dict__, **result.to_dict()}, indent=2, default=str) + "\n"
    )
    console.print(f"results written to {output / 'results.json'}")
