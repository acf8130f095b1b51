"""`adapterlab bench`: list, run and summarise the benchmarks of a source checkout (``bench/``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from adapterlab.cli._common import console, short_path, user_errors

HELP = (
    "Run the benchmarks in a source checkout's bench/ folder (they compare adapterlab with its "
    "anchors: peft, mergekit, naive loops) or summarise their results.\n\n"
    "  adapterlab bench --list                  what there is\n"
    "  adapterlab bench merging speed --quick    run bench/merging.py with the rest of the arguments\n"
    "  adapterlab bench --summary               the headline values of every bench/results/*.json\n\n"
    "Timings are only meaningful on an otherwise idle machine; every result JSON records the machine "
    "and library versions. Benchmarks use the embedded model (`adapterlab assets` first)."
)


def find_bench_dir(explicit: Path | None = None) -> Path:
    """The bench/ folder: ``--dir``, ``$ADAPTERLAB_BENCH_DIR``, ./bench, or the checkout next to the package."""
    if explicit is not None:
        candidates: list[Path] = [explicit]
    elif os.environ.get("ADAPTERLAB_BENCH_DIR"):
        candidates = [Path(os.environ["ADAPTERLAB_BENCH_DIR"])]
    else:
        candidates = [Path.cwd() / "bench", Path(__file__).resolve().parents[2] / "bench"]
    for c in candidates:
        if c is not None and (c / "_common.py").is_file():
            return c
    where = ", ".join(str(c) for c in candidates if c is not None)
    raise FileNotFoundError(
        f"no bench/ folder found (looked in: {where}); benchmarks ship with the source checkout, not the wheel: "
        f"run from a clone of adapterlab or pass --dir"
    )


def list_benchmarks(bench_dir: Path) -> dict[str, str]:
    """name -> first docstring line of each bench/<name>.py (files starting with '_' are helpers)."""
    out = {}
    for path in sorted(bench_dir.glob("*.py")):
        if path.name.startswith("_"):
            continue
        text = path.read_text(encoding="utf-8")
        doc = ""
        for quote in ('"""', "'''"):
            if text.lstrip().startswith(quote):
                doc = text.lstrip()[3:].split("\n", 1)[0].strip()
                break
        out[path.stem] = doc
    return out


#: Keys that say how a result was made, not what it measured: never headline values.
_CONTEXT_KEY = re.compile(
    r"^(machine.*|env|versions|.*settings?|commands?|.*_command|source|commit|finished|table|notes?|statistic|"
    r"timing_scope|previous|tuned_dir|benchmark|parts?|arms_run|model|tasks?|targets|loadavg.*|.*_all|raw.*|"
    r"times_s|losses|step_s_isolated|kept_from_previous_run|memory_method|mergekit|demo_args)$"
)
#: A number is a headline value when a key on its path names a result (ratio, accuracy, perplexity, ...).
_HEADLINE_KEY = re.compile(
    r"(^|_)(headline|goal|derived|ppl|perplexity|acc|accuracy|mean|median|ratio|speedup|gain|met|wall|peak|vs|"
    r"recovery|closed)(_|$)"
)
_SUMMARY_FIRST = re.compile(r"^(goal|derived)\b")
#: Headline values shown per result file; the rest are counted ("+N more").
HEADLINE_LIMIT = 8


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _row_labels(rows: list[dict[str, Any]]) -> list[str]:
    """Labels of a list of result rows: the fewest leading identity fields (text or integers in every
    row that has them) that tell the rows apart, e.g. ``dense`` or ``2/adapterlab_lora``; else indices."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    ident = [
        k
        for k in keys
        if not _HEADLINE_KEY.search(str(k))
        and all(r.get(k) is None or (isinstance(r[k], (str, int)) and not isinstance(r[k], bool)) for r in rows)
    ]
    for n in range(1, len(ident) + 1):
        labels = ["/".join(str(r[k]) for k in ident[:n] if r.get(k) is not None) for r in rows]
        if all(labels) and len(set(labels)) == len(labels):
            return labels
    return [str(i) for i in range(len(rows))]


def _leaves(obj: Any, path: str, headline: bool) -> Iterator[tuple[str, object]]:
    """(dotted path, number or bool) of every headline leaf under ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = str(k)
            if _CONTEXT_KEY.match(key):
                continue
            yield from _leaves(v, f"{path}.{key}" if path else key, headline or bool(_HEADLINE_KEY.search(key)))
    elif isinstance(obj, list):
        if obj and all(isinstance(r, dict) for r in obj):
            for label, r in zip(_row_labels(obj), obj, strict=True):
                yield from _leaves(r, f"{path}[{label}]", headline)
        # lists of numbers are raw samples (per-round timings, losses): not headline values
    elif isinstance(obj, (int, float)) and headline:
        yield path, obj


def headline_values(data: object) -> list[tuple[str, str]]:
    """The headline numbers of one bench result JSON, as (key path, formatted value), in file order.

    A top-level ``"headline"`` object, when present, is the whole answer. Otherwise every number or
    bool whose key path names a result (``goal``, ``derived``, ``ppl``, ``accuracy``, ``ratio``,
    ``speedup``, ``median``, ``wall``, ``peak``, ``*_vs_*``, ...) outside the run's context (machine,
    versions, settings, raw samples), ``goal`` / ``derived`` ones first; rows of a list are labelled by
    the fields that tell them apart.
    """
    if not isinstance(data, dict):
        return []
    if isinstance(data.get("headline"), dict):
        found = list(_leaves(data["headline"], "", True))
    else:
        found = list(_leaves(data, "", False))
        # what a bench declares its goal / derived comparison comes first, then file order
        found.sort(key=lambda kv: not _SUMMARY_FIRST.match(kv[0]))
    return [(k, _fmt(v)) for k, v in found]


def summarise(bench_dir: Path) -> list[tuple[str, list[tuple[str, str]], str, str]]:
    """(result file, its headline values, the command that made it, versions) per bench/results/*.json."""
    rows = []
    for path in sorted((bench_dir / "results").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            rows.append((path.name, [(f"unreadable: {exc}", "")], "", ""))
            continue
        env: Any = {}
        if isinstance(data, dict):
            for key in ("versions", "env", "machine"):
                cand = data.get(key)
                if isinstance(cand, dict) and isinstance(cand.get("versions"), dict):
                    cand = cand["versions"]
                if isinstance(cand, dict) and any(k in cand for k in ("torch", "peft", "transformers")):
                    env = cand
                    break
        versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "peft", "transformers") if k in env)
        command = str(data.get("command", "")) if isinstance(data, dict) else ""
        rows.append((path.name, headline_values(data), command, versions))
    return rows


def summary_table(folder: Path, limit: int = HEADLINE_LIMIT) -> Table:
    """One row per result file: its name, the command and versions under it, and its headline values
    (``key value`` lines, at most ``limit``, then ``+N more``). Cells fold; values are never cut."""
    table = Table(title=f"bench results in {short_path(folder / 'results')}")
    table.add_column("result", overflow="fold", ratio=2)
    table.add_column("headline values", overflow="fold", ratio=3)
    for name, values, cmd, versions in summarise(folder):
        made = Text(name, style="bold")
        for line in (cmd, versions):
            if line:
                made.append("\n" + line, style="dim")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(overflow="fold")
        grid.add_column(no_wrap=True, justify="right")
        for k, v in values[:limit]:
            grid.add_row(Text(k), Text(v))
        if len(values) > limit:
            grid.add_row(Text(f"+{len(values) - limit} more in the JSON", style="dim"), "")
        if not values:
            grid.add_row(Text("no headline values", style="dim"), "")
        table.add_row(made, grid)
    return table


@user_errors
def command(
    ctx: typer.Context,
    name: str | None = typer.Argument(
        None, help="Benchmark to run (a bench/NAME.py); the remaining arguments go to it."
    ),
    list_: bool = typer.Option(False, "--list", "-l", help="List the benchmarks and exit."),
    summary: bool = typer.Option(False, "--summary", help="Summarise bench/results/*.json and exit."),
    bench_dir: Path | None = typer.Option(
        None, "--dir", help="The bench/ folder (default: ./bench or the checkout's)."
    ),
) -> None:
    folder = find_bench_dir(bench_dir)
    found = list_benchmarks(folder)
    if list_ or (name is None and not summary):
        table = Table("benchmark", "what it measures", title=f"benchmarks in {folder}")
        for k, v in found.items():
            table.add_row(k, v)
        console.print(table)
        if name is None and not list_:
            console.print("run one with: adapterlab bench NAME [its arguments]   (see: python bench/NAME.py --help)")
        return
    if summary:
        table = summary_table(folder)
        console.print(table)
        return
    assert name is not None
    if name not in found:
        raise ValueError(f"unknown benchmark {name!r}; choose one of: {', '.join(found)}")
    cmd = [sys.executable, str(folder / f"{name}.py"), *ctx.args]
    console.print(f"[bold]running[/bold] {' '.join(cmd)}")
    proc = subprocess.run(cmd, cwd=str(folder.parent))
    if proc.returncode != 0:
        raise typer.Exit(proc.returncode)
