"""`adapterlab compress` through typer's CliRunner on tiny LoRAs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from adapterlab.cli import compress as compress_cli
from adapterlab.compression import SharedBasisBundle
from tests.merging._helpers import make_lora_dirs

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("compress", help=compress_cli.HELP)(compress_cli.command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the verb on the command line
    return app


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("cli-compress"), 3)


def _err(result) -> str:
    return (result.stderr if hasattr(result, "stderr") else result.output).strip()


def test_compress_writes_a_bundle_and_prints_errors_and_sizes(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    res = runner.invoke(_app(), ["compress", *map(str, adapters), "--rank", "12", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "task0" in res.output and "mean error" in res.output and "smaller" in res.output
    assert "per layer" in res.output and "down_proj" in res.output
    cfg = json.loads((out / "compressed_config.json").read_text())
    assert cfg["rank_c"] == 12 and cfg["mode"] == "full" and cfg["n_loras"] == 3
    assert SharedBasisBundle.load(out).errors.mean < 1e-10


def test_compress_diagonal_with_clusters(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "diag"
    res = runner.invoke(
        _app(),
        [
            "compress",
            *map(str, adapters),
            "--rank",
            "4",
            "--mode",
            "diagonal",
            "--clusters",
            "2",
            "--niter",
            "10",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    b = SharedBasisBundle.load(out)
    assert b.mode == "diagonal" and b.n_clusters == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "--rank must be an integer >= 1"),
        (["--rank", "2", "--mode", "tucker"], "--mode 'tucker'"),
        (["--rank", "99"], "exceeds min"),
        (["--rank", "2", "--clusters", "9"], "clusters=9"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    adapters: list[Path], tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["compress", *map(str, adapters), *args, "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert message in _err(res) and len(_err(res).splitlines()) == 1
    assert not out.exists()


def test_missing_adapter_and_non_empty_output(adapters: list[Path], tmp_path: Path) -> None:
    res = runner.invoke(_app(), ["compress", str(tmp_path / "nope"), "--rank", "2", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "does not exist" in _err(res)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    res = runner.invoke(_app(), ["compress", *map(str, adapters), "--rank", "2", "-o", str(busy)])
    assert res.exit_code == 2 and "not empty" in _err(res)
    assert (busy / "keep.txt").read_text() == "x"


def test_put_stores_the_bundle_in_the_registry(adapters: list[Path], tmp_path: Path) -> None:
    from adapterlab.registry import AdapterRegistry

    hub = tmp_path / "hub"
    out = tmp_path / "bundle"
    res = runner.invoke(
        _app(),
        ["compress", *map(str, adapters), "--rank", "3", "-o", str(out), "--put", "three-tasks", "--hub", str(hub)],
    )
    assert res.exit_code == 0, res.output
    back = SharedBasisBundle.load("hub:three-tasks", registry=AdapterRegistry(hub))
    assert back.names == ["task0", "task1", "task2"] and back.rank == 3
    res = runner.invoke(
        _app(),
        [
            "compress",
            *map(str, adapters),
            "--rank",
            "3",
            "-o",
            str(tmp_path / "b2"),
            "--put",
            "bad name!",
            "--hub",
            str(hub),
        ],
    )
    assert res.exit_code == 2 and not (tmp_path / "b2").exists()
