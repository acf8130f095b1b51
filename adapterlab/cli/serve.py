"""`adapterlab serve`: an HTTP endpoint on 127.0.0.1 serving many adapters on one base model."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import typer
from rich.table import Table

from adapterlab.cli._common import (
    HUB_DEFAULT_HELP,
    console,
    hub_option,
    progress,
    resolve_hub,
    setup_logging,
    short_path,
    user_errors,
)

logger = logging.getLogger(__name__)

HELP = (
    "Serve adapters over an OpenAI-compatible HTTP API on one base model loaded once. 'model' names the "
    "adapter ('base' = the base model), so the openai client works with base_url=http://127.0.0.1:PORT/v1; "
    "a batch mixing adapters runs as one forward (grouped LoRA, shared-basis bundles, SHiRA switching). "
    "Adapters are PEFT folders or hub:NAME refs (--adapter NAME=SOURCE), loaded on demand into an LRU cache "
    "(--capacity, --pin); registry names resolve through --hub. Decoding is greedy (temperature 0). Routes: "
    "POST /v1/completions and /v1/chat/completions (OpenAI's schema, stream: true = server-sent events), "
    "GET /v1/models, POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's), GET /v1/adapters, "
    "POST /v1/adapters/load, POST /v1/adapters/unload, GET /health. --check loads everything and exits "
    "without serving."
)


def _parse_adapters(items: list[str]) -> dict[str, str]:
    from adapterlab.serving.server import check_adapter_name

    out: dict[str, str] = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--adapter {item!r}: write NAME=FOLDER or NAME=hub:REF")
        check_adapter_name(name)
        if name in out:
            raise ValueError(f"--adapter: name {name!r} is given twice")
        out[name] = source
    return out


def _table(server: object, url: str | None, caption: str | None = None) -> Table:
    table = Table(title=f"adapterlab serve{' on ' + url if url else ''}", caption=caption)
    for col in ("adapter", "kind", "loaded", "pinned", "rank", "source"):
        table.add_column(col, justify="left")
    for row in server.adapters():  # type: ignore[attr-defined]
        table.add_row(
            row["name"],
            str(row["kind"] or "-"),
            "yes" if row["loaded"] else "no",
            "yes" if row["pinned"] else "no",
            str(row["rank"] if row["rank"] is not None else "-"),
            str(row["source"]),
        )
    return table


@user_errors
def command(
    model: str = typer.Option("default", "--model", help="Base model folder, or 'default' (the embedded model)."),
    adapter: list[str] = typer.Option([], "--adapter", "-a", help="NAME=FOLDER or NAME=hub:REF (repeatable)."),
    bundle: list[str] = typer.Option([], "--bundle", "-b", help="Shared-basis bundle folder or hub:REF (repeatable)."),
    pin: list[str] = typer.Option([], "--pin", help="Adapter names to load now and never evict (repeatable)."),
    hub: Path | None = hub_option(
        "Registry root for adapter names and hub: refs; a missing folder is an empty registry"
    ),
    capacity: int = typer.Option(32, "--capacity", help="LoRA/SHiRA adapters kept in memory (LRU)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Requests per batched forward."),
    queue: int = typer.Option(64, "--queue", help="Queued requests before answering 503."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", help="Largest max_tokens a request may ask for."),
    read_timeout: float = typer.Option(
        30.0, "--read-timeout", help="Seconds a connection may stall or idle before 408 / close."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback only)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port (0 = any free port)."),
    port_file: Path | None = typer.Option(None, "--port-file", help="Write the bound port to this file."),
    check: bool = typer.Option(False, "--check", help="Load the base, adapters and bundles, print them, exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.progress import rich_factory, track
    from adapterlab.serving import AdapterServer
    from adapterlab.serving.http import ServingHTTP

    setup_logging(verbose)
    for opt, value, low in (
        ("--capacity", capacity, 1),
        ("--max-batch", max_batch, 1),
        ("--queue", queue, 1),
        ("--max-new-tokens", max_new_tokens, 1),
        ("--port", port, 0),
    ):
        if value < low:
            raise ValueError(f"{opt} must be >= {low}, got {value}")
    if not read_timeout > 0:
        raise ValueError(f"--read-timeout must be > 0 seconds, got {read_timeout}")
    if port > 65535:
        raise ValueError(f"--port must be <= 65535, got {port}")
    try:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(
                f"--host {host!r} is not a loopback address; adapterlab serve binds to 127.0.0.1 / ::1 only"
            )
    except ValueError as exc:
        if "loopback" in str(exc):
            raise
        raise ValueError(f"--host {host!r} is not an IP address; use 127.0.0.1") from None
    from adapterlab.models import check_model_folder

    check_model_folder(model, "--model")  # config.json and safetensors weights, before anything loads
    specs = _parse_adapters(adapter)
    for name, source in specs.items():
        if not source.startswith("hub:") and not (Path(source).expanduser() / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"--adapter {name}: {source!r} is not a PEFT adapter folder (no adapter_config.json)"
            )
    root = resolve_hub(hub)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--hub {str(root)!r} is not a folder (the registry root: {HUB_DEFAULT_HELP})")
    from adapterlab.registry import AdapterRegistry

    # One rule for every command: a registry root that does not exist (yet) is an empty registry, so
    # serving folders and bundles needs no ./hub; the table says which registry was used.
    registry = AdapterRegistry(root)
    hub_note = f"registry {short_path(root)}" + ("" if root.is_dir() else " (does not exist: no registry adapters)")
    with console.status(f"loading base model {model!r}"):
        server = AdapterServer(model, registry, capacity=capacity, max_batch_size=max_batch, adapters=specs)
    with progress() as prog:
        factory = rich_factory(prog)
        for ref in track(bundle, "bundles", progress=factory):
            server.add_bundle(ref)
        for name in track(pin, "pinned adapters", progress=factory):
            server.load(name, pin=True)
        if check:
            for name in track([n for n in specs if n not in pin], "adapters", progress=factory):
                server.load(name)
    if check:
        console.print(_table(server, None, hub_note))
        console.print("check passed: base, adapters and bundles load")
        return
    try:
        app = ServingHTTP(
            server,
            host=host,
            port=port,
            max_queue=queue,
            max_batch=max_batch,
            max_new_tokens=max_new_tokens,
            read_timeout_s=read_timeout,
        )
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    if port_file is not None:
        port_file.write_text(f"{app.port}\n", encoding="utf-8")
    console.print(_table(server, app.url, hub_note))
    console.print(f"serving on {app.url} (Ctrl-C to stop)")
    app.serve_forever()
