"""`adapterlab eval`: perplexity, task accuracy and sparsity of a model folder."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

HELP = (
    "Evaluate a model: windowed perplexity on held-out text (wiki, lee), accuracy on packaged "
    "tasks, and the per-layer sparsity of its decoder linears. MODEL is a local folder or "
    "'default' (the embedded SmolLM2-135M-Instruct)."
)


@user_errors
def command(
    model: str = typer.Option("default", "--model", "-m", help="Model folder, or 'default'."),
    corpus: list[str] = typer.Option(
        ["wiki"], "--corpus", help="Held-out corpus for perplexity: wiki or lee (repeatable)."
    ),
    task: list[str] = typer.Option(
        [], "--task", help="Task to score (repeatable): see `adapterlab.data.task_names()`."
    ),
    n: int | None = typer.Option(None, "--n", help="Score only the first N test examples of each task."),
    seqlen: int = typer.Option(512, "--seqlen", help="Perplexity window length in tokens."),
    max_windows: int | None = typer.Option(None, "--max-windows", help="Evaluate only the first K windows."),
    bits: int | None = typer.Option(None, "--bits", help="Load the model quantized with bitsandbytes (4 or 8)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the results as JSON here."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab import data, evaluate, models
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    # validate everything before loading anything
    for c in corpus:
        if c not in data.CORPORA:
            raise ValueError(f"unknown corpus {c!r}; choose one of: {', '.join(data.CORPORA)}")
    for t in task:
        data.get_task(t)
    if bits is not None and bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8, got {bits}")
    models.resolve_model_path(model)

    tok = models.load_tokenizer(model)
    if bits is None:
        lm = models.load_model(model)
    else:
        from adapterlab.quant import load_quantized

        lm = load_quantized(model, bits=bits)
    results: dict[str, object] = {"model": model, "bits": bits, "perplexity": {}, "tasks": {}}
    with progress() as prog:
        factory = rich_factory(prog)
        for c in corpus:
            ids = data.eval_ids(tok, corpus=c, split="test")
            results["perplexity"][c] = evaluate.perplexity(  # type: ignore[index]
                lm, ids, seqlen=seqlen, max_windows=max_windows, progress=factory
            )
        for t in task:
            res = evaluate.task_accuracy(lm, tok, t, n=n, progress=factory)
            results["tasks"][t] = res.to_dict()  # type: ignore[index]
    rep = evaluate.sparsity_report(lm)
    results["sparsity"] = rep.global_sparsity

    table = Table(title=f"adapterlab eval: {model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for c, v in results["perplexity"].items():  # type: ignore[union-attr]
        table.add_row(f"perplexity[{c}] (seqlen {seqlen})", f"{v:.3f}")
    for t, v in results["tasks"].items():  # type: ignore[union-attr]
        table.add_row(f"accuracy[{t}] (n={v['n']})", f"{v['accuracy']:.4f}")
    table.add_row("decoder-linear sparsity", f"{rep.global_sparsity:.2%}")
    console.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2))
