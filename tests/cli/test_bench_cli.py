"""`adapterlab bench`: finds the checkout's bench/ folder, lists, refuses unknown names, passes arguments."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from adapterlab.cli.app import app

runner = CliRunner()


def _fake_bench(tmp_path: Path) -> Path:
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    (bench / "_common.py").write_text("")
    (bench / "echo.py").write_text(
        '"""Echo its arguments into a file."""\nimport sys, pathlib\n'
        'pathlib.Path(sys.argv[1]).write_text(" ".join(sys.argv[2:]))\n'
    )
    (bench / "results" / "echo.json").write_text(
        json.dumps({"command": "python bench/echo.py x", "env": {"torch": "2.13.0"}})
    )
    return bench


def test_list_and_summary(tmp_path: Path) -> None:
    bench = _fake_bench(tmp_path)
    res = runner.invoke(app, ["bench", "--list", "--dir", str(bench)])
    assert res.exit_code == 0, res.output
    assert "echo" in res.output and "Echo its arguments" in res.output
    res = runner.invoke(app, ["bench", "--summary", "--dir", str(bench)])
    assert res.exit_code == 0 and "echo.json" in res.output and "torch 2.13.0" in res.output


def test_runs_with_passthrough_arguments(tmp_path: Path) -> None:
    bench = _fake_bench(tmp_path)
    out = tmp_path / "out.txt"
    res = runner.invoke(app, ["bench", "--dir", str(bench), "echo", str(out), "--quick", "speed"])
    assert res.exit_code == 0, res.output
    assert out.read_text() == "--quick speed"


def test_unknown_benchmark_and_missing_dir(tmp_path: Path) -> None:
    bench = _fake_bench(tmp_path)
    res = runner.invoke(app, ["bench", "--dir", str(bench), "nope"])
    assert res.exit_code == 2 and "unknown benchmark 'nope'" in res.output
    res = runner.invoke(app, ["bench", "--dir", str(tmp_path / "missing"), "--list"])
    assert res.exit_code == 2


def test_real_checkout_lists_merging() -> None:
    from adapterlab.cli.bench import find_bench_dir, list_benchmarks

    names = list_benchmarks(find_bench_dir(Path(__file__).resolve().parents[2] / "bench"))
    assert "merging" in names and "foundation" in names
