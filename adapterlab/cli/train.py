"""`adapterlab train RECIPE.yaml`: train one adapter from a recipe, evaluate it, save it, put it in the hub."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

logger = logging.getLogger(__name__)

HELP = (
    "Train an adapter from a YAML recipe (examples in recipes/train/): base ('default' = the embedded "
    "SmolLM2-135M-Instruct, or a model folder; optional 4/8-bit quantization and in-memory pruning), "
    "adapter method and params (lora, rslora, dylora, lori, and shira, snell, spp, lors where installed), "
    "data (a packaged task), trainer arguments (transformers Trainer, or trl SFTTrainer with backend: sft). "
    "Evaluates task accuracy before and after, writes the PEFT adapter folder to the recipe's output and "
    "puts it in the registry (ADAPTERLAB_HUB or ./hub) unless --no-put. Every check runs before any work. "
    "On many processes: torchrun --nproc_per_node N -m adapterlab train RECIPE.yaml (or accelerate launch -m "
    "adapterlab train ...): every process trains (DDP), rank 0 alone evaluates, writes and puts, and only rank 0 "
    "prints; the others print their warnings and errors prefixed 'rank N:'."
)


def _quiet_rank(rank: int, verbose: bool) -> None:
    """Logging of a rank > 0: warnings and errors only (debug with -v), each line prefixed ``rank N:``, to stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format=f"rank {rank}: %(levelname)s %(message)s",
        force=True,
    )
    for noisy in ("transformers", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stop_on_sigterm() -> None:
    """torchrun stops the other processes with SIGTERM when one fails: unwind (staging folders are removed)."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@user_errors
def command(
    recipe: Path = typer.Argument(..., help="Train recipe YAML (see recipes/train/)."),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a key: --set trainer.max_steps=50 (repeatable; value parsed as YAML)."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the recipe and show the plan; load no weights, write nothing."
    ),
    no_put: bool = typer.Option(False, "--no-put", help="Do not put the trained adapter into the registry."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab import distributed

    rank = distributed.rank()  # the launcher's RANK before any process group exists
    if distributed.world_size() > 1:
        _stop_on_sigterm()
    if rank == 0:
        setup_logging(verbose)
        _run(recipe, set_, dry_run, no_put)
        return
    _quiet_rank(rank, verbose)
    from adapterlab.recipe.processes import RankZeroFailed

    try:
        _run(recipe, set_, dry_run, no_put, show=False)
    except RankZeroFailed:  # rank 0 printed the reason
        raise typer.Exit(1) from None
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise type(exc)(f"rank {rank}: {msg}") from None


def _run(recipe: Path, set_: list[str] | None, dry_run: bool, no_put: bool, show: bool = True) -> None:
    """Check, (dry-run or) train, print; ``show=False`` (ranks > 0 of a launch): print nothing."""
    from adapterlab.progress import rich_factory
    from adapterlab.recipe import check_train_recipe, load_train_recipe, train_adapter

    cfg = load_train_recipe(str(recipe), set_)
    try:
        checked = check_train_recipe(cfg, put=not no_put)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise type(exc)(f"{recipe}: {exc}") from None
    if dry_run and not show:
        return
    if dry_run:
        table = Table(title=f"adapterlab train --dry-run: {recipe}")
        table.add_column("key")
        table.add_column("value")
        base = cfg.base + (f" ({cfg.quantize}-bit)" if cfg.quantize else "")
        if cfg.prune is not None:
            base += f", pruned: {cfg.prune.method} {cfg.prune.pattern or cfg.prune.sparsity or 0.5}"
        table.add_row("base", base)
        table.add_row("adapter", f"{cfg.adapter.method} {type(checked[0]).__name__}({cfg.adapter.params})")
        table.add_row("callbacks", ", ".join(type(c).__name__ for c in checked[1]) or "-")
        table.add_row(
            "data", f"{cfg.data.task}: {cfg.data.max_examples or 'all'} examples, max_length {cfg.data.max_length}"
        )
        table.add_row("trainer", f"{cfg.backend}: {cfg.trainer}")
        table.add_row(
            "eval", "-" if cfg.eval is None else f"{cfg.eval.split} n={cfg.eval.n}, zero-shot {cfg.eval.zero_shot}"
        )
        table.add_row("output", cfg.output)
        table.add_row("put", "no" if (no_put or cfg.put is None) else f"hub:{cfg.put.name or Path(cfg.output).name}")
        console.print(table)
        console.print("nothing written")
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not show:
        train_adapter(cfg, put=not no_put, provenance={"recipe_file": str(recipe)}, checked=checked)
        return
    with progress() as prog:
        result = train_adapter(
            cfg, put=not no_put, progress=rich_factory(prog), provenance={"recipe_file": str(recipe)}, checked=checked
        )
    table = Table(title=f"adapterlab train: {cfg.adapter.method} on {cfg.data.task} -> {result.output}")
    for col in ("zero-shot", "accuracy", "steps", "trainable", "time", "hub"):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    table.add_row(
        fmt(result.zero_shot),
        fmt(result.accuracy),
        str(result.steps),
        f"{result.trainable_params:,}",
        f"{result.seconds:.1f} s",
        result.ref or "-",
    )
    console.print(table)
    console.print(f"wrote {result.output}" + (f" (sha256 {result.digest[:12]})" if result.digest else ""))
