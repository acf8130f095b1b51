"""Shared CLI helpers: one-line errors with a non-zero exit, rich console, progress bars, the --hub option,
short names for table cells."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from adapterlab._paths import MissingAssetError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Exceptions that mean "bad input or missing asset": one line, exit code 2, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MissingAssetError, KeyError)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: MESSAGE`` (the message verbatim: brackets in it are not rich markup) and exit."""
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn library validation errors into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            fail(str(msg).splitlines()[0] if str(msg) else type(exc).__name__)

    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("transformers", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def progress() -> Progress:
    """A rich progress bar that library functions can drive through ``ProgressCallback``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console,
        disable=not sys.stderr.isatty() and False,
    )


# ---- the registry root (--hub) -------------------------------------------------------------------

#: Where every command that takes --hub looks when it is not given (the registry's own default).
HUB_ENV = "ADAPTERLAB_HUB"
HUB_DEFAULT = "hub"
HUB_DEFAULT_HELP = f"default: ${HUB_ENV}, else ./{HUB_DEFAULT}"


def hub_option(what: str = "Registry root folder") -> Any:
    """The ``--hub`` option of every command: ``WHAT (default: $ADAPTERLAB_HUB, else ./hub).``

    No ``envvar=`` on purpose: :func:`resolve_hub` applies the environment variable, so an option
    given before a sub-command (``hub --hub DIR ls``) and one given after it are told apart.
    """
    return typer.Option(None, "--hub", help=f"{what} ({HUB_DEFAULT_HELP}).", show_default=False)


def resolve_hub(hub: str | os.PathLike[str] | None) -> Path:
    """The registry root a command uses: ``--hub``, else ``$ADAPTERLAB_HUB``, else ``./hub``.

    The same rule as ``AdapterRegistry(None)`` (tests/cli/test_hub_option.py pins the two together);
    an empty ``$ADAPTERLAB_HUB`` counts as unset.
    """
    if hub is not None and os.fspath(hub) != "":
        return Path(hub).expanduser()
    env = os.environ.get(HUB_ENV)
    return Path(env).expanduser() if env else Path(HUB_DEFAULT)


# ---- short names for table cells -----------------------------------------------------------------


def short_module_names(names: list[str]) -> tuple[list[str], list[str]]:
    """Module names shortened to the parts that tell them apart, for tables at 80 columns.

    Dotted components (``model``, ``layers``, ``self_attn``, ...) are dropped from every name that
    has them, most frequent first, as long as the names stay distinct. Kept always: numeric
    components (layer indices) and the last component of every name (``q_proj``, ``lm_head``).
    ``model.layers.0.self_attn.q_proj`` / ``model.layers.0.mlp.up_proj`` / ``lm_head`` become
    ``0.q_proj`` / ``0.up_proj`` / ``lm_head``.

    Returns:
        (short names in the order given, the dropped components in the order they were dropped).
    """
    parts = [n.split(".") for n in names]
    if len(set(names)) != len(names):
        return list(names), []  # already ambiguous: leave them as they are
    protected = {p[-1] for p in parts}
    counts: dict[str, int] = {}
    for p in parts:
        for c in dict.fromkeys(p[:-1]):
            if not c.isdigit() and c not in protected:
                counts[c] = counts.get(c, 0) + 1
    dropped: list[str] = []
    for comp in sorted(counts, key=lambda c: -counts[c]):  # stable: ties keep their first appearance
        trial = [[c for c in p if c != comp] for p in parts]
        joined = [".".join(p) for p in trial]
        if all(trial) and len(set(joined)) == len(joined):
            parts = trial
            dropped.append(comp)
    return [".".join(p) for p in parts], dropped


def short_path(path: str | os.PathLike[str]) -> str:
    """A path for a table cell: relative to the current folder when inside it, else ``~/...``, else as is."""
    text = os.fspath(path)
    p = Path(text).expanduser()
    if not p.is_absolute():
        return text
    try:
        rel = p.relative_to(Path.cwd())
        return str(rel) if str(rel) != "." else "."
    except ValueError:
        pass
    try:
        return str(Path("~") / p.relative_to(Path.home()))
    except ValueError:
        return text


def model_label(name_or_path: str | os.PathLike[str] | None) -> str:
    """A base model for a table cell: ``default`` for the embedded model (its id or its cache folder),
    a path shortened by :func:`short_path`, ``-`` for none."""
    if name_or_path is None or os.fspath(name_or_path) == "":
        return "-"
    from adapterlab._paths import cache_dir
    from adapterlab.models import DEFAULT_MODEL_ID, is_default  # torch: only commands that show a base call this

    text = os.fspath(name_or_path)
    if is_default(text) or text == DEFAULT_MODEL_ID:
        return "default"
    embedded = cache_dir() / "models" / DEFAULT_MODEL_ID
    try:
        if Path(text).expanduser().resolve() == embedded.resolve():
            return "default"
    except (OSError, RuntimeError):
        pass
    return short_path(text) if ("/" in text or text.startswith("~")) else text
