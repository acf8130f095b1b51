"""`adapterlab compensate` through typer's CliRunner on tiny model folders (calibration from the small `lee`
corpus). Runtime: a few seconds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from adapterlab.cli import compensate as compensate_cli
from adapterlab.models import load_model, tiny_llama, tiny_tokenizer

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("compensate", help=compensate_cli.HELP)(compensate_cli.command)
    app.command("noop")(lambda: None)  # two commands: typer keeps the sub-command name
    return app


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from adapterlab.pruning import prune_

    root = tmp_path_factory.mktemp("compensate-cli")
    dense = tiny_llama(seed=7)
    pruned = copy.deepcopy(dense)
    prune_(pruned, "magnitude", 0.5)
    out = {"dense": root / "dense", "pruned": root / "pruned", "other": root / "other"}
    dense.save_pretrained(out["dense"])
    pruned.save_pretrained(out["pruned"])
    tiny_llama(intermediate_size=192).save_pretrained(out["other"])
    for p in out.values():
        tiny_tokenizer().save_pretrained(p)
    return out


def _args(folders: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "compensate",
        "--dense",
        str(folders["dense"]),
        "--compressed",
        str(folders["pruned"]),
        "-o",
        str(out),
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--corpus",
        "lee",
        *extra,
    ]


def test_writes_a_peft_lora_with_the_library_s_logits(folders: dict[str, Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from adapterlab import data
    from adapterlab.extraction import compensate

    out = tmp_path / "adapter"
    res = runner.invoke(_app(), _args(folders, out, "--rank", "3"))
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compensation_report.json").read_text())
    assert report["settings"]["space"] == "activation" and set(report["ranks"].values()) == {3}
    assert report["calibration"]["corpus"] == "lee" and report["calibration"]["n_samples"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(folders["pruned"])
    # the library on the same calibration windows, added into the pruned weights
    calib = data.calibration_ids(tiny_tokenizer(), n_samples=4, seqlen=32, seed=0, corpus="lee")
    expected_model = load_model(folders["pruned"])
    compensate(load_model(folders["dense"]), expected_model, rank=3, calibration=calib).apply_(expected_model)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(load_model(folders["pruned"]), str(out))
    with torch.no_grad():
        got, expected = peft_model(ids).logits, expected_model(ids).logits
        pruned = load_model(folders["pruned"])(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, pruned, atol=1e-3)  # the adapter does something


def test_weight_space_and_put(folders: dict[str, Path], tmp_path: Path) -> None:
    from adapterlab.registry import AdapterRegistry

    out, hub = tmp_path / "w", tmp_path / "hub"
    res = runner.invoke(
        _app(), _args(folders, out, "--energy", "0.5", "--space", "weight", "--put", "comp", "--hub", str(hub))
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "compensation_report.json").read_text())
    assert report["settings"]["space"] == "weight" and report["calibration"] is None
    assert all(m["energy"] >= 0.5 for m in report["modules"] if m["rank"])
    assert AdapterRegistry(hub).resolve("comp")


@pytest.mark.parametrize(
    "case,extra,message",
    [
        ("both", ["--rank", "2", "--energy", "0.5"], "--rank/--energy"),
        ("neither", [], "--rank/--energy"),
        ("space", ["--rank", "2", "--space", "eigen"], "space is 'eigen'"),
        ("shape", ["--rank", "2", "--dense", "{other}"], "has shape"),
        ("missing", ["--rank", "2", "--dense", "{missing}"], "--dense"),
        ("missing-compressed", ["--rank", "2", "--compressed", "{missing}"], "--compressed"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    folders: dict[str, Path], tmp_path: Path, case: str, extra: list[str], message: str
) -> None:
    out = tmp_path / "out"
    subst = {"{other}": str(folders["other"]), "{missing}": str(tmp_path / "nope")}
    res = runner.invoke(_app(), _args(folders, out, *[subst.get(a, a) for a in extra]))
    assert res.exit_code == 2, res.output
    err = (res.stderr if hasattr(res, "stderr") else res.output).strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
