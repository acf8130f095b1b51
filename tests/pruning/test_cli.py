"""`adapterlab prune` through typer's CliRunner on a tiny model saved to a tmp folder."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from typer.testing import CliRunner

from adapterlab.cli import prune as prune_cli
from adapterlab.models import load_model, tiny_llama
from adapterlab.pruning import check_nm, load_masks, mask_hash, sparsity_of

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("prune", help=prune_cli.HELP)(prune_cli.command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps `prune` a sub-command, as in the real app
        pass

    return app


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t3", eos_token="t2", pad_token="t0")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(str(path))
    _tiny_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture
def calib_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace adapterlab.data.calibration_ids with random in-vocab windows; record the calls."""
    calls: list[dict[str, Any]] = []

    def fake(
        tokenizer: Any, n_samples: int = 128, seqlen: int = 2048, seed: int = 0, corpus: str = "wiki"
    ) -> torch.Tensor:
        calls.append({"n_samples": n_samples, "seqlen": seqlen, "seed": seed, "corpus": corpus})
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 128, (n_samples, seqlen), generator=g)

    try:
        import adapterlab.data  # noqa: F401

        monkeypatch.setattr("adapterlab.data.calibration_ids", fake)
    except ImportError:  # data.py not available: stand in a module
        monkeypatch.setitem(sys.modules, "adapterlab.data", types.SimpleNamespace(calibration_ids=fake))
    return calls


def _invoke(*args: str) -> Any:
    return runner.invoke(_app(), ["prune", *args])


def test_help_lists_options() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    for option in ("--model", "--method", "--sparsity", "--pattern", "--nsamples", "--seqlen", "--seed", "--output"):
        assert option in result.output


def test_magnitude_unstructured(model_dir: Path, tmp_path: Path, calib_calls: list) -> None:
    out = tmp_path / "pruned"
    result = _invoke("--model", str(model_dir), "--method", "magnitude", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert calib_calls == []  # magnitude needs no calibration data
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "masks.safetensors", "sparsity_report.json", "tokenizer.json"} <= names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # staging cleaned up
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["method"] == "magnitude" and report["pattern"] is None
    assert report["target_sparsity"] == 0.5 and report["global_sparsity"] == 0.5
    assert len(report["layers"]) == 14
    pruned = load_model(out)
    assert sparsity_of(pruned) == 0.5
    dense = load_model(model_dir)
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)
    assert torch.equal(pruned.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    masks = load_masks(out / "masks.safetensors")
    assert report["mask_sha256"] == mask_hash(masks)
    modules = dict(pruned.named_modules())
    for name, mask in masks.items():
        assert torch.equal(mask, modules[name].weight != 0)
    assert "total" in result.output and "50.00%" in result.output


def test_wanda_nm_with_calibration(model_dir: Path, tmp_path: Path, calib_calls: list) -> None:
    out = tmp_path / "wanda24"
    result = _invoke(
        "--model",
        str(model_dir),
        "--method",
        "wanda",
        "--pattern",
        "2:4",
        "--nsamples",
        "4",
        "--seqlen",
        "16",
        "--seed",
        "3",
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    assert calib_calls == [{"n_samples": 4, "seqlen": 16, "seed": 3, "corpus": "wiki"}]
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["pattern"] == "2:4" and report["nm_valid"] is True and report["n_calibration"] == 4
    assert report["global_sparsity"] == 0.5
    pruned = load_model(out)
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            assert check_nm(module.weight, 2, 4), name


def test_overwrite(model_dir: Path, tmp_path: Path, calib_calls: list) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = _invoke("--model", str(model_dir), "--method", "magnitude", "-o", str(out))
    assert result.exit_code == 2
    assert (out / "old.txt").exists()
    result = _invoke("--model", str(model_dir), "--method", "magnitude", "-o", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "sparsity_report.json").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--method", "prunit"], "magnitude, sparsegpt, wanda"),
        (["--pattern", "5:4"], "'5:4'"),
        (["--pattern", "two:four"], "'two:four'"),
        (["--sparsity", "1.5"], "[0, 1)"),
        (["--sparsity", "-0.2"], "[0, 1)"),
        (["--nsamples", "0"], "--nsamples"),
        (["--scope", "global", "--method", "magnitude"], "matrix, row"),
        (["--seqlen", "100000"], "context length"),
        (["--model", "/nonexistent/model/dir"], "/nonexistent/model/dir"),
        (["--pattern", "3:6", "--method", "magnitude"], "d_in % M == 0"),  # checked on a meta-device skeleton
    ],
)
def test_bad_input_exit_2_one_line_nothing_written(
    model_dir: Path, tmp_path: Path, calib_calls: list, args: list[str], needle: str
) -> None:
    out = tmp_path / "never"
    base = ["--model", str(model_dir), "--method", "wanda", "--nsamples", "2", "--seqlen", "8", "-o", str(out)]
    result = _invoke(*base, *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and needle in lines[0]
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    assert calib_calls == []  # validated before loading anything


def test_output_is_a_file(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "file.txt"
    out.write_text("keep me")
    result = _invoke("--model", str(model_dir), "--method", "magnitude", "-o", str(out))
    assert result.exit_code == 2
    assert out.read_text() == "keep me"


def test_missing_output_is_usage_error(model_dir: Path) -> None:
    result = _invoke("--model", str(model_dir))
    assert result.exit_code == 2
    assert "--output" in result.output
