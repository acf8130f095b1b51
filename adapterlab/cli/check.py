"""`adapterlab check --for vllm`: the pre-flight of an adapter folder before a serving engine loads it."""

from __future__ import annotations

from pathlib import Path

import typer

from adapterlab.cli._common import console, err_console, hub_option, resolve_hub, user_errors

HELP = (
    "Check that a serving engine accepts an adapter folder (--for vllm): one line per violation and exit code 2 on "
    "any (modules_to_save, a bias, DoRA, a rank above --max-lora-rank or outside vLLM's set, target modules the base "
    "lacks, an embedding / lm_head vocabulary other than the base's, NaN/Inf tensors, a base name other than "
    "--served-name / --base); one 'ok' line and exit 0 otherwise."
)


@user_errors
def command(
    adapter: str = typer.Argument(..., help="Adapter folder or hub:NAME."),
    for_: str = typer.Option(..., "--for", help="Serving engine: vllm."),
    base: str | None = typer.Option(
        None, "--base", "-b", help="Base model folder (or 'default'): target modules, shapes and its name are checked."
    ),
    served_name: str | None = typer.Option(
        None, "--served-name", help="The name vLLM serves the base under; base_model_name_or_path must equal it."
    ),
    max_lora_rank: int | None = typer.Option(
        None, "--max-lora-rank", help="vLLM's --max-lora-rank (16 by default there)."
    ),
    hub: Path | None = hub_option("Registry root for hub: refs"),
) -> None:
    from adapterlab.jobs.check import SERVERS, check_vllm

    if for_ not in SERVERS:
        raise ValueError(f"--for {for_!r}: choose one of: {', '.join(SERVERS)}")
    registry = None
    if adapter.startswith("hub:"):
        from adapterlab.registry import AdapterRegistry

        registry = AdapterRegistry(resolve_hub(hub))
    problems = check_vllm(adapter, base=base, served_name=served_name, max_lora_rank=max_lora_rank, registry=registry)
    if problems:
        for line in problems:
            err_console.print(f"{adapter}: {line}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(2)
    console.print(f"ok: {adapter} is servable by vLLM", highlight=False, markup=False)
