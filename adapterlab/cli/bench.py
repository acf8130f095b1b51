"""`adapterlab bench`: list, run and summarise the benchmarks of a source checkout (``bench/``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
from rich.table import Table

from adapterlab.cli._common import console, user_errors

HELP = (
    "Run the benchmarks in a source checkout's bench/ folder (they compare adapterlab with its "
    "anchors: peft, mergekit, naive loops) or summarise their results.\n\n"
    "  adapterlab bench --list                  what there is\n"
    "  adapterlab bench merging speed --quick    run bench/merging.py with the rest of the arguments\n"
    "  adapterlab bench --summary               one line per bench/results/*.json\n\n"
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


def summarise(bench_dir: Path) -> list[tuple[str, str, str]]:
    """(result file, command that made it, machine/versions line) for every bench/results/*.json."""
    rows = []
    for path in sorted((bench_dir / "results").glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            rows.append((path.name, "", f"unreadable: {exc}"))
            continue
        env = data.get("env") or data.get("machine") or {}
        versions = ", ".join(
            f"{k} {env[k]}" for k in ("torch", "peft", "transformers") if isinstance(env, dict) and k in env
        )
        rows.append((path.name, str(data.get("command", "")), versions))
    return rows


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
        table = Table("result", "command", "versions", title=f"{folder / 'results'}")
        for row in summarise(folder):
            table.add_row(*row)
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
