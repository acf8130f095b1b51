"""Benchmark: start-up time of ``adapterlab --help``, every ``adapterlab VERB --help`` and ``import adapterlab``.

    python bench/cli_startup.py [--rounds 5]                 # this checkout
    python bench/cli_startup.py --src /path/to/other/checkout --name cli_startup_before \\
        --select 'python|adapterlab --help|merge|eval|hub ls'     # a subset of the cases

Each case is a fresh process: the ``adapterlab`` console script with ``--help``, with ``VERB --help``
for every command it lists (``hub``'s sub-commands too), ``python -c "import adapterlab"``, and two
floors for scale: ``python -c "pass"`` and ``python -c "import typer, rich"``. One untimed warm-up
round (page cache, ``.pyc`` files), then ``--rounds`` rounds, the cases interleaved in an order
that rotates every round. Wall time is ``time.perf_counter`` around the child; CPU time is the
child's user + system time from ``os.wait4``. Reported per case: median, min and all values.
The verb list comes from the app itself (``typer.main.get_command``), so a new verb is measured
without editing this file. ``--src`` puts another checkout first on ``PYTHONPATH`` (PathFinder
comes before an editable install's finder), which is how the "before" numbers were taken.

The anchor is the same commands before adapterlab's lazy import (eager ``import adapterlab``):
run with ``--src`` on that commit. Timings on a shared machine move with its load, recorded at
start and end. Writes bench/results/<name>.json and <name>.md (default name ``cli_startup``).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

_LIST_VERBS = """
import json
from typer.main import get_command
from adapterlab.cli.app import app
group = get_command(app)
out = []
for name, cmd in sorted(group.commands.items()):
    out.append([name])
    out.extend([name, sub] for sub in sorted(getattr(cmd, "commands", {})))
print(json.dumps(out))
"""


def _env(src: Path | None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _entry_point() -> list[str]:
    """The installed console script next to this interpreter (what users run), else ``python -m``."""
    script = Path(sys.executable).with_name("adapterlab")
    if script.is_file():
        return [str(script)]
    found = shutil.which("adapterlab")
    return [found] if found else [sys.executable, "-m", "adapterlab.cli.app"]


def cases(src: Path | None) -> dict[str, list[str]]:
    """Case label -> argv: the floors, ``import adapterlab``, ``--help`` and every ``VERB --help``."""
    listed = subprocess.run(
        [sys.executable, "-c", _LIST_VERBS],
        env=_env(src),
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=True,
    )
    verbs = json.loads(listed.stdout.strip().splitlines()[-1])
    exe = _entry_point()
    out: dict[str, list[str]] = {
        'python -c "pass"': [sys.executable, "-c", "pass"],
        'python -c "import typer, rich"': [sys.executable, "-c", "import typer, rich"],
        'python -c "import adapterlab"': [sys.executable, "-c", "import adapterlab"],
        "adapterlab --help": [*exe, "--help"],
    }
    for argv in verbs:
        out[f"adapterlab {' '.join(argv)} --help"] = [*exe, *argv, "--help"]
    return out


def run_once(argv: list[str], env: dict[str, str], cwd: str) -> tuple[float, float]:
    """(wall s, child CPU s = user + system) of one run in ``cwd``; raises if the child fails."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in (
        "adapterlab",
        "typer",
        "click",
        "rich",
        "pydantic",
        "torch",
        "transformers",
        "peft",
        "bitsandbytes",
        "datasets",
        "trl",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _git_commit(src: Path) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def markdown(result: dict[str, Any]) -> str:
    """A table: case, median wall s, median CPU s, min wall s."""
    lines = [
        f"# CLI start-up ({result['source']}, commit {str(result['commit'])[:10]})",
        "",
        f"{result['rounds']} rounds after {result['warmup']} warm-up, interleaved; load average "
        f"{result['machine']['loadavg_at_start']} at start, {result['machine']['loadavg_at_end']} at end.",
        "",
        "| command | wall median (s) | CPU median (s) | wall min (s) |",
        "|---|---:|---:|---:|",
    ]
    for label, row in result["cases"].items():
        lines.append(
            f"| `{label}` | {row['wall_median_s']:.3f} | {row['cpu_median_s']:.3f} | {row['wall_min_s']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    parser.add_argument("--src", type=Path, default=None, help="another checkout to measure (first on PYTHONPATH)")
    parser.add_argument("--name", default="cli_startup", help="result file stem under bench/results/")
    parser.add_argument("--select", default=None, help="only the cases whose label matches this regex")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    src = args.src.resolve() if args.src is not None else None
    if src is not None and not (src / "adapterlab" / "__init__.py").is_file():
        parser.error(f"--src {src}: no adapterlab/__init__.py there")
    env = _env(src)
    table = cases(src)
    if args.select is not None:
        table = {k: v for k, v in table.items() if re.search(args.select, k)}
        if not table:
            parser.error(f"--select {args.select!r} matches no case")
    labels = list(table)
    # an empty working folder: ``python -c`` puts the cwd first on sys.path, which would shadow --src
    cwd = tempfile.mkdtemp(prefix="cli_startup_")
    load_start = os.getloadavg()
    walls: dict[str, list[float]] = {k: [] for k in labels}
    cpus: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(args.warmup + args.rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate: no case always runs first
        for label in order:
            wall, cpu = run_once(table[label], env, cwd)
            if r >= args.warmup:
                walls[label].append(wall)
                cpus[label].append(cpu)
        print(f"round {r + 1}/{args.warmup + args.rounds} done", file=sys.stderr)
    result: dict[str, Any] = {
        "command": " ".join(["python", "bench/cli_startup.py", *(argv if argv is not None else sys.argv[1:])]),
        "source": str(src or REPO),
        "commit": _git_commit(src or REPO),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "cases": {
            k: {
                "argv": [Path(table[k][0]).name, *table[k][1:]],
                "wall_median_s": statistics.median(walls[k]),
                "cpu_median_s": statistics.median(cpus[k]),
                "wall_min_s": min(walls[k]),
                "wall_s": walls[k],
                "cpu_s": cpus[k],
            }
            for k in labels
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in load_start],
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": _versions(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.rmdir(cwd)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
