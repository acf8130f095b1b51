"""`adapterlab demo`: the main job, a tour of the adapter lifecycle on the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

HELP = (
    "Run the adapterlab tour on the embedded SmolLM2-135M-Instruct: evaluate the dense model, prune it "
    "(SparseGPT; --full compares magnitude, Wanda and SparseGPT), train a sparsity-preserving adapter (LoRS "
    "or SPP) on the pruned base, merge it keeping every pruned zero, extract a LoRA from the merge (PHLoRA), "
    "compress it with two more LoRAs into a shared basis and serve a mixed batch. Prints each stage's row "
    "(wiki perplexity, task accuracy, sparsity, stored size, tokens/s, seconds) as it finishes and rewrites "
    "OUTPUT/results.json after every stage. Needs `adapterlab assets` once. A few minutes on 2 CPU cores; "
    "--full is the long tour (about 14 minutes); --stages dense,prune stops after pruning."
)

#: The defaults that ``--full`` changes (fast tour, full tour); tests check them against adapterlab.demo.
PRESETS: dict[str, tuple[str, str]] = {
    "methods": ("sparsegpt", "magnitude,wanda,sparsegpt"),
    "nsamples": ("8", "16"),
    "eval_windows": ("2", "10"),
    "task_n": ("100", "200"),
    "steps": ("50", "100"),
    "extra_steps": ("10", "30"),
    "lr": ("0.005", "0.002"),
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _preset_help(text: str, key: str) -> str:
    fast, full = PRESETS[key]
    return f"{text} (default {fast}; --full: {full})"


COLUMNS = ("stage", "model", "wiki ppl", "acc", "sparsity", "stored", "tok/s", "s", "note")
_WIDTHS = {"stage": 8, "wiki ppl": 8, "acc": 5, "sparsity": 8, "stored": 8, "tok/s": 6, "s": 6}
#: Below this console width the note goes on its own line under the row instead of in a column.
WIDE = 130


def _cells(r: Any) -> list[str]:
    return [
        r.stage,
        r.name,
        _num(r.perplexity, ".2f"),
        _num(r.accuracy, ".3f"),
        _num(r.sparsity, ".2%"),
        _size(r.size_bytes),
        _num(r.tokens_per_s, ".0f"),
        f"{r.seconds:.1f}",
        r.note,
    ]


def render(rows: list[Any], *, width: int, header: bool = True, title: str | None = None) -> list[Any]:
    """The results table as rich renderables, with the same column widths for one row (printed as its
    stage finishes) and for all of them (the summary). Narrower than :data:`WIDE`, each note is a
    line of its own (under its row, or under the summary table)."""
    from rich.text import Text

    wide = width >= WIDE
    cols = [i for i, c in enumerate(COLUMNS) if wide or c not in ("tok/s", "note")]  # narrow: note on its own line
    fixed = sum(_WIDTHS.get(COLUMNS[i], 0) for i in cols) + 2 * (len(cols) - 1)  # + the gaps between columns
    model_width = 36 if wide else max(16, width - fixed - 1)
    table = Table(title=title, show_header=header, box=None, pad_edge=False)
    for i in cols:
        col = COLUMNS[i]
        if col == "model":
            table.add_column(col, width=model_width, overflow="fold")
        elif col == "note":
            table.add_column(col, min_width=30, overflow="fold")
        else:
            table.add_column(col, justify="left" if col == "stage" else "right", width=_WIDTHS[col], no_wrap=True)
    for r in rows:
        cells = _cells(r)
        table.add_row(*(cells[i] for i in cols))
    if wide:
        return [table]
    indent = " " * (_WIDTHS["stage"] + 2)  # under the model column
    if len(rows) == 1:
        return [table, *([Text(indent + rows[0].note, style="dim")] if rows[0].note else [])]
    return [table, *(Text(f"{r.stage:<{len(indent)}}{r.note}", style="dim") for r in rows if r.note)]


@user_errors
def command(
    full: bool = typer.Option(
        False,
        "--full",
        help="The long tour (the defaults before the fast one): magnitude, Wanda and SparseGPT compared on "
        "16 x 512 calibration tokens, 10 wiki windows, 200 examples per task, 100 + 2 x 30 training steps at "
        "a constant lr, every extra task scored (about 14 minutes on 2 CPU cores). Options given with it "
        "still apply.",
    ),
    methods: str | None = typer.Option(
        None, "--methods", help=_preset_help("Comma-separated pruning methods.", "methods"), show_default=False
    ),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Unstructured sparsity in [0, 1)."),
    pattern: str | None = typer.Option(None, "--pattern", help="N:M pattern instead (e.g. 2:4)."),
    stages: str = typer.Option(
        "all",
        "--stages",
        help="Comma-separated stages, in tour order: dense, prune, adapt, merge, extract, compress, serve "
        "(dense and prune always run; each later stage needs the ones before it).",
    ),
    adapter: str = typer.Option("lors", "--adapter", help="Sparsity-preserving adapter: lors or spp."),
    rank: int = typer.Option(8, "--rank", help="Rank of the adapters and of the PHLoRA extraction."),
    steps: int | None = typer.Option(
        None, "--steps", help=_preset_help("Training steps of the sparsity-preserving adapter.", "steps")
    ),
    extra_steps: int | None = typer.Option(
        None, "--extra-steps", help=_preset_help("Training steps of each extra LoRA.", "extra_steps")
    ),
    lr: float | None = typer.Option(None, "--lr", help=_preset_help("AdamW learning rate of every adapter.", "lr")),
    adapt_layers: int = typer.Option(
        30, "--adapt-layers", help="Adapt the last N decoder layers (30 = all layers of the embedded model)."
    ),
    compress_rank: int = typer.Option(12, "--compress-rank", help="Shared-basis rank c."),
    nsamples: int | None = typer.Option(
        None, "--nsamples", help=_preset_help("Calibration windows for Wanda/SparseGPT.", "nsamples")
    ),
    eval_windows: int | None = typer.Option(
        None,
        "--eval-windows",
        help=_preset_help("512-token wiki windows for perplexity (0 = all).", "eval_windows"),
    ),
    task_n: int | None = typer.Option(
        None, "--task-n", help=_preset_help("Test examples scored per task (0 = all).", "task_n")
    ),
    seed: int = typer.Option(0, "--seed"),
    output: Path = typer.Option(
        Path("out/demo"), "--output", "-o", help="Folder for adapters, bundle and results.json."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.demo import STAGES, DemoConfig, run_tour
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    # preset-dependent options: None = the preset's value; 0 evaluation windows / examples = all
    picked: dict[str, Any] = {
        "methods": _csv(methods) if methods is not None else None,
        "steps": steps,
        "extra_steps": extra_steps,
        "lr": lr,
        "nsamples": nsamples,
        "eval_windows": eval_windows,
        "task_n": task_n,
    }
    overrides = {k: (v or None if k in ("eval_windows", "task_n") else v) for k, v in picked.items() if v is not None}
    overrides.update(
        sparsity=sparsity,
        pattern=pattern,
        stages=list(STAGES) if stages.strip() == "all" else _csv(stages),
        adapter=adapter,
        rank=rank,
        adapt_layers=adapt_layers,
        compress_rank=compress_rank,
        seed=seed,
    )
    cfg = DemoConfig.full(**overrides) if full else DemoConfig(**overrides)
    from adapterlab.models import default_model_dir

    default_model_dir()  # fail fast (one line) if the embedded model is missing
    tour = "full tour" if full else "fast tour (--full: the long one)"
    title = f"adapterlab demo — SmolLM2-135M-Instruct, {cfg.task}, {tour}"
    with progress() as prog:
        prog.console.print(title)
        printed = [0]

        def on_row(row: Any) -> None:  # a row the moment its stage finishes, above the progress bars
            prog.console.print(*render([row], width=prog.console.width, header=printed[0] == 0), sep="\n")
            printed[0] += 1

        result = run_tour(cfg, output=output, progress=rich_factory(prog), on_row=on_row)
    summary = render(result.rows, width=console.width, title=f"{title} ({result.seconds / 60:.1f} min)")
    console.print(*summary, sep="\n")
    console.print(f"results written to {output / 'results.json'}")
