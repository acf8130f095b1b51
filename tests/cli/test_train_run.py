"""`adapterlab train` and `adapterlab run` through typer's CliRunner on a tiny model folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterlab.cli.app import app
from adapterlab.recipe import training
from tests.recipe._helpers import FakeRegistry, tiny_base, train_dict, write_yaml

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("cli-train-base") / "tiny")


def _one_line_error(result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for p in parts:
        assert p in lines[0], (p, lines[0])


def test_help_lists_train_and_run():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and " train " in result.output and " run " in result.output
    for verb in ("train", "run"):
        result = runner.invoke(app, [verb, "--help"])
        assert result.exit_code == 0 and "--dry-run" in result.output and "--set" in result.output


def test_train_dry_run_shows_the_plan_and_writes_nothing(base, tmp_path):
    path = write_yaml(tmp_path / "r.yaml", train_dict(base, tmp_path / "out"))
    result = runner.invoke(app, ["train", str(path), "--dry-run", "--set", "adapter.method=dylora"])
    assert result.exit_code == 0, result.output
    assert "dylora" in result.output and "DyLoraCallback" in result.output and "nothing written" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sets, parts",
    [
        (["trainer.max_step=3"], ("r.yaml: trainer.max_step: unknown key",)),
        (["adapter.parms.r=3"], ("r.yaml: adapter.parms: unknown key",)),
        (["adapter.method=lorra"], ("adapter.method: unknown adapter method 'lorra'", "choose one of")),
        (["adapter.params.target_modules=[c_attn]"], ("adapter.params.target_modules: 'c_attn' match no module",)),
        (["base=/does/not/exist"], ("base: model path '/does/not/exist' does not exist",)),
        (["trainer.max_steps"], ("expected KEY=VALUE",)),
    ],
)
def test_train_bad_input_one_line_exit_2_nothing_written(base, tmp_path, sets, parts):
    path = write_yaml(tmp_path / "r.yaml", train_dict(base, tmp_path / "out"))
    args = ["train", str(path)]
    for s in sets:
        args += ["--set", s]
    _one_line_error(runner.invoke(app, args), *parts)
    assert not (tmp_path / "out").exists()


@pytest.mark.assets
def test_train_runs_end_to_end(base, tmp_path, monkeypatch):
    reg = FakeRegistry()
    monkeypatch.setattr(training, "registry_or_none", lambda root=None: reg)
    path = write_yaml(tmp_path / "r.yaml", train_dict(base, tmp_path / "out", put={"name": "cli-a"}))
    result = runner.invoke(app, ["train", str(path), "--set", "trainer.max_steps=2", "--set", "eval.n=4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "hub:cli-a" in result.output and [p["name"] for p in reg.puts] == ["cli-a"]
    assert reg.puts[0]["provenance"]["recipe_file"] == str(path)
    # --no-put
    result = runner.invoke(
        app,
        [
            "train",
            str(path),
            "--set",
            "trainer.max_steps=1",
            "--set",
            "eval=null",
            "--set",
            f"output={tmp_path / 'out2'}",
            "--no-put",
        ],
    )
    assert result.exit_code == 0, result.output
    assert len(reg.puts) == 1 and (tmp_path / "out2" / "adapter_config.json").is_file()


def _pipeline(base: Path, tmp_path: Path) -> dict:
    return {
        "steps": [
            {"prune": {"model": str(base), "method": "magnitude", "sparsity": 0.5, "output": str(tmp_path / "pruned")}},
            {"train": train_dict("${prune}", tmp_path / "adapter", eval=None, put=None)},
            {"evaluate": {"model": "${prune}", "adapter": "${train}", "task": "sentiment", "n": 4}},
        ]
    }


def test_run_dry_run_prints_the_plan(base, tmp_path):
    path = write_yaml(tmp_path / "p.yaml", _pipeline(base, tmp_path))
    result = runner.invoke(app, ["run", str(path), "--dry-run", "--set", "steps.0.prune.sparsity=0.6"])
    assert result.exit_code == 0, result.output
    for word in ("prune", "train", "evaluate", "magnitude 60%", "nothing run"):
        assert word in result.output, word
    assert not (tmp_path / "pruned").exists()


@pytest.mark.parametrize(
    "sets, parts",
    [
        (["steps.1.train.adapter.parms={}"], ("p.yaml: steps.1.train.adapter.parms: unknown key",)),
        (
            ["steps.2.evaluate.adapter=${steps.trian.output}"],
            ("steps.2.evaluate.adapter: ${steps.trian.output} names no earlier step",),
        ),
        (["steps.0.prune.model=/no/such/model"], ("steps.0.prune.model: '/no/such/model' does not exist",)),
        (["steps.1.train.data.task=sentimnt"], ("steps.1.train.data.task: unknown task 'sentimnt'",)),
    ],
)
def test_run_bad_input_fails_before_any_work(base, tmp_path, sets, parts):
    path = write_yaml(tmp_path / "p.yaml", _pipeline(base, tmp_path))
    args = ["run", str(path)]
    for s in sets:
        args += ["--set", s]
    _one_line_error(runner.invoke(app, args), *parts)
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "adapter").exists()


@pytest.mark.assets
def test_run_executes_a_pipeline(base, tmp_path):
    path = write_yaml(tmp_path / "p.yaml", _pipeline(base, tmp_path))
    result = runner.invoke(app, ["run", str(path), "--set", "steps.1.train.trainer.max_steps=1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and (tmp_path / "pruned" / "config.json").is_file()
    assert "accuracy=" in result.output
