from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from adapterlab.cli.app import app

runner = CliRunner()


def test_help_lists_the_verbs():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for verb in ("assets", "demo", "prune", "eval"):
        assert verb in res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["demo", "--methods", "bogus"], "unknown pruning method 'bogus'"),
        (["demo", "--sparsity", "1.5"], "sparsity"),
        (["demo", "--pattern", "5:4"], "5:4"),
        (["eval", "--corpus", "nope"], "unknown corpus 'nope'"),
        (["eval", "--task", "nope"], "unknown task 'nope'"),
        (["eval", "--bits", "3"], "--bits must be 4 or 8"),
        (["eval", "--model", "/definitely/not/here"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    out = tmp_path / "out"
    res = runner.invoke(app, args + (["-o", str(out)] if args[0] == "demo" else []))
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert res.output.strip().count("\n") == 0 or "error:" in res.output.splitlines()[0]
    assert not out.exists()


@pytest.mark.assets
def test_eval_cli_on_the_embedded_model(tmp_path):
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app, ["eval", "--task", "sentiment", "--n", "8", "--max-windows", "1", "--seqlen", "128", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert 1.0 < data["perplexity"]["wiki"] < 200.0
    assert data["tasks"]["sentiment"]["n"] == 8


@pytest.mark.assets
def test_demo_runs_end_to_end_small(tmp_path):
    """The main job on the embedded model with tiny settings: dense row + a magnitude-pruned row."""
    res = runner.invoke(
        app,
        ["demo", "--stages", "dense,prune", "--methods", "magnitude", "--eval-windows", "1", "--task-n", "8", "-o", str(tmp_path)],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "magnitude 50%"]
    assert rows[1]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert rows[1]["perplexity"] > rows[0]["perplexity"]  # pruning half the weights hurts
