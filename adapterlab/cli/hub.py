"""`adapterlab hub ...`: the content-addressed adapter registry (put, get, resolve, ls, show, tag, verify, rm, gc)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from adapterlab.cli._common import (
    HUB_DEFAULT_HELP,
    console,
    err_console,
    hub_option,
    model_label,
    resolve_hub,
    setup_logging,
    short_path,
    user_errors,
)

logger = logging.getLogger(__name__)

HELP = (
    "The adapter registry: a content-addressed store of PEFT adapter folders and shared-basis bundles "
    f"under --hub ({HUB_DEFAULT_HELP}), given before or after the sub-command. Every get/load re-hashes "
    "the files; adapters record the base they were made for, and loads on another base are refused."
)

app = typer.Typer(name="hub", help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@app.callback()
def _root(
    ctx: typer.Context,
    hub: Path | None = hub_option(),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    setup_logging(verbose)
    ctx.obj = {"hub": hub}


def _registry(ctx: typer.Context, hub: Path | None) -> Any:
    """The registry of ``hub --hub DIR VERB`` or ``hub VERB --hub DIR`` (else $ADAPTERLAB_HUB, else ./hub)."""
    from adapterlab.registry import AdapterRegistry

    before = (ctx.obj or {}).get("hub")
    if before is not None and hub is not None and resolve_hub(before) != resolve_hub(hub):
        raise ValueError(
            f"--hub is given twice ({str(before)!r} before the sub-command, {str(hub)!r} after it); give one"
        )
    return AdapterRegistry(resolve_hub(hub if hub is not None else before))


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def ls_table(rows: list[dict[str, Any]], root: Path) -> Table:
    """The `hub ls` table of ``AdapterRegistry.ls`` rows: cells fold instead of being cut at 80 columns;
    the embedded base shows as ``default`` and paths are shortened (relative to the current folder, or ``~``)."""
    table = Table(title=f"adapterlab hub: {short_path(root)}")
    for col in ("name", "digest", "method", "rank", "size", "base", "provenance"):
        table.add_column(
            col,
            justify="right" if col in ("rank", "size") else "left",
            no_wrap=col == "digest",
            min_width=12 if col == "digest" else None,
            overflow="fold",
        )
    for r in rows:
        if "problem" in r:
            problem = Text(str(r["problem"]), style="red")
            table.add_row(r["name"] or "-", (r.get("digest") or "-")[:12], problem, "", "", "", "")
            continue
        table.add_row(
            r["name"] or "-",
            r["digest"][:12],
            str(r.get("method")),
            "-" if r.get("rank") is None else str(r["rank"]),
            _size(r.get("bytes")),
            model_label(r.get("base")),
            str(r.get("provenance") or "-"),
        )
    table.caption = f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}"
    return table


@app.command("put")
@user_errors
def put(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="PEFT adapter folder (or a shared-basis bundle folder with --bundle)."),
    name: str | None = typer.Option(None, "--name", "-n", help="Name to point at it (default: the folder name)."),
    tag: list[str] | None = typer.Option(None, "--tag", "-t", help="Extra names (repeatable)."),
    base: str | None = typer.Option(
        None, "--base", "-b", help="Base model folder or 'default': record its fingerprint."
    ),
    kind: str | None = typer.Option(
        None, "--kind", help="Provenance: trained, extracted, merged, compressed or imported (default: inferred)."
    ),
    parent: list[str] | None = typer.Option(None, "--parent", help="Parent adapter ref or path (repeatable)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe file to record in the provenance."),
    bundle: bool = typer.Option(False, "--bundle", help="SRC is a shared-basis bundle (stored under compressed/)."),
    hub: Path | None = hub_option(),
) -> None:
    """Store an adapter folder; prints its sha256 digest."""
    reg = _registry(ctx, hub)
    if kind is not None:
        from adapterlab.registry import PROVENANCE_KINDS

        if kind not in PROVENANCE_KINDS:
            raise ValueError(f"--kind {kind!r}: choose one of {', '.join(PROVENANCE_KINDS)}")
    provenance: dict[str, Any] = {"parents": list(parent or [])}
    if kind is not None:
        provenance["kind"] = kind
    if recipe is not None:
        if not recipe.is_file():
            raise FileNotFoundError(f"--recipe {str(recipe)!r} does not exist")
        provenance["recipe"] = {"path": str(recipe), "text": recipe.read_text(encoding="utf-8")}
    base_model = None
    if base is not None:
        from adapterlab.models import load_model

        with err_console.status(f"fingerprinting base {base} ..."):
            base_model = load_model(base)  # put checks the adapter's shapes against it, then fingerprints it
    if bundle:
        digest = reg.put_bundle(src, name, provenance=provenance, base=base_model, tags=tuple(tag or ()))
    else:
        digest = reg.put(src, name, provenance=provenance, base=base_model, tags=tuple(tag or ()))
    typer.echo(digest)  # plain: scripts read it


@app.command("get")
@user_errors
def get(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Name, hub:NAME, digest or digest prefix (>= 8 hex)."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Copy the verified adapter folder here (without manifest.json)."
    ),
    bundle: bool = typer.Option(False, "--bundle", help="REF is a shared-basis bundle."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    hub: Path | None = hub_option(),
) -> None:
    """Verify an adapter and print its folder (or copy it to --output)."""
    reg = _registry(ctx, hub)
    folder = reg.get_bundle(ref) if bundle else reg.get(ref)
    if output is None:
        typer.echo(str(folder))  # plain: scripts read it
        return
    from adapterlab.staging import staged_dir

    with staged_dir(output, overwrite) as stage:
        for f in folder.iterdir():
            if f.name != "manifest.json":
                shutil.copyfile(f, stage / f.name)
    console.print(f"wrote {output}", highlight=False)


@app.command("resolve")
@user_errors
def resolve(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Name, digest or digest prefix."),
    hub: Path | None = hub_option(),
) -> None:
    """Print the full digest a ref points to."""
    typer.echo(_registry(ctx, hub).resolve(ref))


@app.command("ls")
@user_errors
def ls(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", "-a", help="Also list objects no name points to."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON rows instead of a table."),
    hub: Path | None = hub_option(),
) -> None:
    """List names with their digest, method, rank, size, base and provenance."""
    reg = _registry(ctx, hub)
    rows = reg.ls(all=all_)
    if as_json:
        console.print_json(json.dumps(rows))
        return
    console.print(ls_table(rows, reg.root))


@app.command("show")
@user_errors
def show(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="Name, digest or digest prefix."),
    hub: Path | None = hub_option(),
) -> None:
    """Print an adapter's manifest (JSON)."""
    console.print_json(json.dumps(_registry(ctx, hub).show(ref), default=str))


@app.command("tag")
@user_errors
def tag(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The adapter to tag."),
    name: str = typer.Argument(..., help="The new name."),
    force: bool = typer.Option(False, "--force", "-f", help="Move the name if it points elsewhere."),
    hub: Path | None = hub_option(),
) -> None:
    """Point another name at an adapter."""
    digest = _registry(ctx, hub).tag(ref, name, force=force)
    console.print(f"{name} -> {digest}", highlight=False)


@app.command("verify")
@user_errors
def verify(
    ctx: typer.Context,
    ref: str | None = typer.Argument(None, help="One adapter (default: everything)."),
    hub: Path | None = hub_option(),
) -> None:
    """Re-hash stored files; exit 1 and list the problems if any."""
    reg = _registry(ctx, hub)
    problems = reg.verify(ref)
    if problems:
        for p in problems:
            err_console.print(f"[red]problem:[/] {escape(p)}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(escape(f"ok: {ref or short_path(reg.root)} verified"), highlight=False)


@app.command("rm")
@user_errors
def rm(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The name to remove (objects go at the next gc)."),
    hub: Path | None = hub_option(),
) -> None:
    """Remove a name; `hub gc` deletes objects no name points to."""
    digest = _registry(ctx, hub).rm(name)
    console.print(f"removed {name} (was {digest[:12]})", highlight=False)


@app.command("gc")
@user_errors
def gc(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go, delete nothing."),
    hub: Path | None = hub_option(),
) -> None:
    """Delete objects no name points to and leftovers of interrupted writes."""
    removed = _registry(ctx, hub).gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for d in removed:
        console.print(f"{verb} {d}", highlight=False)
    console.print(f"{verb} {len(removed)} object(s)", highlight=False)


__all__ = ["app"]
