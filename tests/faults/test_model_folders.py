"""Issue 15, class 10 (and the base-model side of class 4): a model folder that holds only pickle
weights (``pytorch_model.bin``), or whose safetensors do not parse, is one line naming the folder or
file and saying safetensors is required, exit code 2, through ``serve --model``, ``train``, ``run``
and the library (``load_model``, ``AdapterServer``); no pickle is ever opened, nothing is written.

The check is :func:`adapterlab.models.check_model_folder`, which :func:`adapterlab.models.load_model`
(and so every command that loads a base) runs before transformers sees the folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapterlab.cli.app import app
from adapterlab.models import check_model_folder, load_model
from adapterlab.serving import AdapterServer
from tests.recipe._helpers import tiny_base, train_dict, write_yaml

runner = CliRunner()

PICKLE_ONLY = (
    "model folder '{folder}' has no .safetensors weights (it holds 'pytorch_model.bin': pickle is not read); "
    "safetensors is required: re-save the model with save_pretrained(..., safe_serialization=True)"
)


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("model-folders") / "good")


def _copy(good: Path, dest: Path) -> Path:
    shutil.copytree(good, dest)
    return dest


@pytest.fixture
def pickled(good: Path, tmp_path: Path) -> Path:
    folder = _copy(good, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture
def no_torch_load(monkeypatch):
    """A pickle must never be opened: torch.load fails the test if anything calls it."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a model folder")

    monkeypatch.setattr(torch, "load", refuse)


def _tree(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*")}


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_serve_model_pickle_only_is_one_line(pickled, tmp_path, no_torch_load):
    before = _tree(tmp_path)
    port_file = tmp_path / "port"
    result = runner.invoke(app, ["serve", "--model", str(pickled), "--port-file", str(port_file)])
    assert _one_line(result) == "error: --model: " + PICKLE_ONLY.format(folder=pickled)
    result = runner.invoke(app, ["serve", "--model", str(pickled), "--check"])
    assert _one_line(result) == "error: --model: " + PICKLE_ONLY.format(folder=pickled)
    assert _tree(tmp_path) == before and not port_file.exists()


def test_library_loaders_refuse_a_pickle_only_folder(pickled, no_torch_load):
    message = PICKLE_ONLY.format(folder=pickled)
    for call in (lambda: load_model(pickled), lambda: AdapterServer(str(pickled)), lambda: check_model_folder(pickled)):
        with pytest.raises(FileNotFoundError) as err:
            call()
        assert str(err.value) == message
    with pytest.raises(FileNotFoundError) as err:
        check_model_folder(pickled, "base")
    assert str(err.value) == "base: " + message


def test_train_and_run_refuse_a_pickle_only_base_before_any_work(pickled, tmp_path, monkeypatch, no_torch_load):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "hub"))
    recipe = train_dict(pickled, tmp_path / "out")
    train_yaml = write_yaml(tmp_path / "r.yaml", recipe)
    prune_yaml = write_yaml(
        tmp_path / "p.yaml", {"steps": [{"prune": {"model": str(pickled), "method": "magnitude", "output": "pr"}}]}
    )
    before = _tree(tmp_path)
    message = PICKLE_ONLY.format(folder=pickled)
    for args in (["train", str(train_yaml)], ["train", str(train_yaml), "--dry-run"]):
        assert _one_line(runner.invoke(app, args)) == f"error: {train_yaml}: base: {message}"
    for args in (["run", str(prune_yaml)], ["run", str(prune_yaml), "--dry-run"]):
        assert _one_line(runner.invoke(app, args)) == f"error: {prune_yaml}: steps.0.prune.model: {message}"
    assert _tree(tmp_path) == before


def _truncated(folder: Path) -> None:
    f = folder / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _empty(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _renamed_pickle(folder: Path) -> None:
    f = folder / "model.safetensors"
    state = load_file(f)
    f.unlink()
    torch.save(state, f)


@pytest.mark.parametrize(
    "spoil,reason",
    [
        (_truncated, "Error while deserializing header: incomplete metadata, file not fully covered"),
        (_empty, "Error while deserializing header: header too small"),
        (_renamed_pickle, "Error while deserializing header: header too large"),
    ],
    ids=["truncated", "empty", "renamed-pickle"],
)
def test_serve_model_with_corrupt_safetensors_is_one_line(good, tmp_path, spoil, reason, no_torch_load):
    folder = _copy(good, tmp_path / "spoiled")
    spoil(folder)
    before = _tree(tmp_path)
    file = folder / "model.safetensors"
    message = f"'{file}' is not a valid safetensors file ({reason}); re-save or remove it"
    assert _one_line(runner.invoke(app, ["serve", "--model", str(folder), "--check"])) == f"error: --model: {message}"
    with pytest.raises(ValueError) as err:
        load_model(folder)
    assert str(err.value) == message
    assert _tree(tmp_path) == before


def test_serve_model_other_bad_folders(good, tmp_path):
    no_config = _copy(good, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((good / "config.json").read_text())
    for folder, message in (
        (no_config, f"model folder '{no_config}' has no config.json"),
        (a_file, f"model path '{a_file}' is a file; give the model's folder"),
        (
            empty,
            f"model folder '{empty}' has no .safetensors weights; safetensors is required: re-save the model with "
            "save_pretrained(..., safe_serialization=True)",
        ),
    ):
        assert (
            _one_line(runner.invoke(app, ["serve", "--model", str(folder), "--check"])) == f"error: --model: {message}"
        )


def test_a_good_folder_still_loads(good):
    assert check_model_folder(good) == good
    assert sum(p.numel() for p in load_model(good).parameters()) > 0


def test_a_folder_without_a_working_tokenizer_is_one_line(good, tmp_path):
    """eval and prune read the tokenizer first: no tokenizer files, or files transformers cannot load
    (its reasons run over several lines), give one line naming the folder; nothing is written."""
    from adapterlab.models import load_tokenizer

    bare = _copy(good, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    broken = _copy(good, tmp_path / "broken")
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    missing = (
        f"model folder '{bare}' has no tokenizer (none of tokenizer.json, tokenizer.model, vocab.json, vocab.txt, "
        "tokenizer_config.json); save it next to the weights with tokenizer.save_pretrained(folder)"
    )
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(bare)
    assert str(err.value) == missing
    with pytest.raises(ValueError, match=rf"^model folder '{broken}': its tokenizer does not load \(.+\)$") as err:
        load_tokenizer(broken)
    assert "\n" not in str(err.value)
    before = _tree(tmp_path)
    out = tmp_path / "out"
    for args in (
        ["eval", "--model", str(bare), "--task", "sentiment", "--n", "2"],
        ["prune", "--model", str(bare), "--method", "magnitude", "--sparsity", "0.5", "-o", str(out)],
    ):
        assert _one_line(runner.invoke(app, args)) == f"error: {missing}"
    line = _one_line(runner.invoke(app, ["eval", "--model", str(broken), "--task", "sentiment", "--n", "2"]))
    assert line.startswith(f"error: model folder '{broken}': its tokenizer does not load (")
    assert _tree(tmp_path) == before and not out.exists()
