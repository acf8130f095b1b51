"""Demo wall time, CPU time and peak memory: ``adapterlab demo`` (defaults) in a child process (issue 16).

    python bench/demo.py                          # the default (fast) tour -> bench/results/demo.json, .md
    python bench/demo.py --name demo_full -- --full   # anything after -- goes to `adapterlab demo`

One run of ``adapterlab demo`` as a fresh process (the console script, or ``python -c`` through
``adapterlab.cli.app:main`` when it is not on PATH), outputs in a temporary folder (or ``--output``).
Recorded: wall time (``time.perf_counter`` around the child), CPU seconds (user + system of the child
from ``resource.getrusage(RUSAGE_CHILDREN)``, after minus before), peak resident memory (the child's
``ru_maxrss``), the table it printed and every row of its ``results.json``, the load average before,
after and sampled every 5 s during the run, the torch / transformers / peft versions and the torch
thread count. The anchor is the long tour, ``-- --full`` (the defaults before the fast tour).

This is one measurement, not a median: the demo is minutes long and the machine is shared, so read
the wall time next to the load average it ran under (CPU seconds move less with the load, but
oversubscribed OpenMP threads spin, so they move too).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _command(extra: list[str], output: Path) -> list[str]:
    exe = shutil.which("adapterlab")
    head = [exe] if exe else [sys.executable, "-c", "from adapterlab.cli.app import main; main()"]
    return [*head, "demo", "-o", str(output), *extra]


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in ("torch", "transformers", "peft", "adapterlab"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _threads() -> int:
    """The torch thread count a fresh process gets here (what the demo child ran with)."""
    code = "import torch; print(torch.get_num_threads())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run(extra: list[str], output: Path) -> dict[str, Any]:
    """Run the demo once; return the measurement (the child's stdout is echoed as it comes)."""
    cmd = _command(extra, output)
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        while not done.wait(5.0):
            samples.append((round(time.perf_counter() - start, 1), os.getloadavg()[0]))

    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS=os.environ.get("COLUMNS", "160"))
    with tempfile.TemporaryFile("w+") as err:  # progress bars, logging and the rows as they come
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        code = proc.wait()
        err.seek(0)
        err_tail = err.read().splitlines()[-40:]
    wall = time.perf_counter() - start
    done.set()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    results_path = output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    during = [s[1] for s in samples]
    return {
        "command": " ".join(cmd),
        "returncode": code,
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "peak_rss_bytes": after.ru_maxrss * 1024,  # Linux: kilobytes
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "loadavg_during": {
            "min": min(during, default=None),
            "mean": sum(during) / len(during) if during else None,
            "max": max(during, default=None),
            "samples": samples,
        },
        "printed": "".join(lines),
        "stderr_tail": err_tail,
        "rows": results.get("rows", []),
        "complete": results.get("complete"),
        "config": results.get("config", {}),
        "tour_seconds": results.get("seconds"),
        "details": {k: results.get("details", {}).get(k) for k in ("base", "merge", "compress")},
    }


def _row_table(rows: list[dict[str, Any]]) -> str:
    out = ["| stage | model | wiki ppl | acc | sparsity | stored | s | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ppl = f"{r['perplexity']:.2f}" if r.get("perplexity") is not None else ""
        acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else ""
        sp = f"{r['sparsity']:.2%}" if r.get("sparsity") is not None else ""
        size = f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else ""
        note = str(r.get("note", "")).replace("|", "/")
        out.append(f"| {r['stage']} | {r['name']} | {ppl} | {acc} | {sp} | {size} | {r['seconds']:.1f} | {note} |")
    return "\n".join(out)


def markdown(payload: dict[str, Any]) -> str:
    m = payload["measurement"]
    la = m["loadavg_during"]
    rows = m["rows"]
    acc = {r["stage"]: r.get("accuracy") for r in rows}
    base = payload.get("base_method") or ""
    base_acc = next((r.get("accuracy") for r in rows if r["stage"] == "prune" and r["name"].split()[0] == base), None)
    fmt = "{:.2f}".format
    learn = ""
    if acc.get("adapt") is not None and base_acc is not None:
        learn = (
            f"The adapter takes the pruned base from {base_acc:.3f} (zero-shot) to {acc['adapt']:.3f} on "
            f"{m['config'].get('task', 'the task')} ({m['config'].get('task_n')} test examples); dense zero-shot "
            f"{acc.get('dense', float('nan')):.3f}.\n\n"
        )
    return (
        "# `adapterlab demo`: wall time, CPU time, peak memory\n\n"
        f"Command: `{m['command']}` (one run, exit code {m['returncode']}). "
        f"{payload['machine']['cpu_count']} CPU cores, torch threads {payload['machine']['torch_threads']}, "
        f"torch {payload['machine']['versions']['torch']}, transformers {payload['machine']['versions']['transformers']}, "
        f"peft {payload['machine']['versions']['peft']}.\n\n"
        "| wall | CPU (user + sys) | peak RSS | load avg before (1/5/15 min) | during (1 min: min / mean / max) | after |\n"
        "|---|---|---|---|---|---|\n"
        f"| {m['wall_s'] / 60:.2f} min ({m['wall_s']:.0f} s) | {m['cpu_s']:.0f} s | {m['peak_rss_bytes'] / 1e9:.2f} GB | "
        f"{'/'.join(map(fmt, m['loadavg_before']))} | "
        f"{fmt(la['min']) if la['min'] is not None else '-'} / {fmt(la['mean']) if la['mean'] is not None else '-'} / "
        f"{fmt(la['max']) if la['max'] is not None else '-'} | {'/'.join(map(fmt, m['loadavg_after']))} |\n\n"
        f"{learn}"
        "Rows of `results.json` (`s` = seconds of the stage as the demo measured it):\n\n"
        f"{_row_table(rows)}\n\n"
        "A load average above the core count means other work shared the cores: the wall time is then an "
        "upper bound of what the demo needs alone.\n"
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", default="demo", help="results file name (bench/results/NAME.json, .md)")
    ap.add_argument("--output", type=Path, default=None, help="demo output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        output = args.output or Path(tmp) / "demo"
        measurement = run(extra, output)
    payload = {
        "benchmark": "demo",
        "demo_args": extra,
        "measurement": measurement,
        "base_method": (measurement["details"].get("base") or {}).get("method"),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": _threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "python": platform.python_version(),
            "versions": _versions(),
        },
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(payload))
    print(f"wrote {RESULTS / f'{args.name}.json'} and .md")
    if measurement["returncode"] != 0:
        raise SystemExit(measurement["returncode"])


if __name__ == "__main__":
    main()
