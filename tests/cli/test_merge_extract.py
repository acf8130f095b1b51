"""`adapterlab merge` and `adapterlab extract` through typer's CliRunner on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from adapterlab.cli import extract as extract_cli
from adapterlab.cli import merge as merge_cli
from adapterlab.jobs.merge import load_config
from adapterlab.models import tiny_llama
from tests.merging._helpers import make_lora_dirs

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("merge", help=merge_cli.HELP)(merge_cli.command)
    app.command("extract", help=extract_cli.HELP)(extract_cli.command)
    return app


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("cli-adapters"), 3)


def _write(tmp_path: Path, cfg: dict, name: str = "merge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cfg(adapters: list[Path], **extra) -> dict:
    cfg = {
        "method": "ties",
        "adapters": [{"path": str(p), "weight": 1.0} for p in adapters],
        "params": {"density": 0.3},
        "output": {"rank": 6},
    }
    cfg.update(extra)
    return cfg


def _err(result) -> str:
    return (result.stderr if hasattr(result, "stderr") else result.output).strip()


def test_merge_cli_writes_a_peft_lora(adapters: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "out"
    res = runner.invoke(
        _app(), ["merge", str(_write(tmp_path, _cfg(adapters))), "-o", str(out), "--set", "params.lambda=1.5"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["params"]["lambda"] == 1.5 and report["params"]["density"] == 0.3
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 6
    PeftModel.from_pretrained(tiny_llama(), str(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left


def test_merge_cli_dry_run_writes_nothing(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["merge", str(_write(tmp_path, _cfg(adapters))), "-o", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "nothing written" in res.output and not out.exists()


def test_merge_cli_rmm_and_relative_paths(adapters: list[Path], tmp_path: Path) -> None:
    cfg = {
        "method": "rmm",
        "adapters": [{"path": f"../{p.parent.name}/{p.name}", "name": f"t{i}"} for i, p in enumerate(adapters)],
        "params": {"K": 2},
    }
    cfg_dir = adapters[0].parent.parent / "cfgs"
    cfg_dir.mkdir(exist_ok=True)
    res = runner.invoke(_app(), ["merge", str(_write(cfg_dir, cfg)), "-o", str(tmp_path / "rmm")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "rmm" / "rmm_config.json").read_text())["tasks"] == ["t0", "t1", "t2"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(paramz={}), r"paramz: unknown key"),
        (lambda c: c["adapters"][1].update(wieght=1.0), r"adapters\.1\.wieght: unknown key"),
        (lambda c: c.update(adapters=[]), r"adapters: List should have at least 1 item"),
        (lambda c: c.update(method="tie"), r"method: unknown merge method 'tie'; choose one of"),
        (lambda c: c["params"].update(density=1.5), r"params\.density must be in \(0, 1\], got 1\.5"),
        (lambda c: c["params"].update(densty=0.2), r"params\.densty: unknown parameter for merge method 'ties'"),
        (
            lambda c: c["output"].update(format="dense"),
            r"output\.format: Input should be 'lora', 'sparse', 'full', 'shira' or 'lori'",
        ),
        (
            lambda c: c["adapters"][2].update(path="/nonexistent/adapter"),
            r"adapters\.2: adapter folder '/nonexistent/adapter' does not exist",
        ),
        (lambda c: c["adapters"][2].pop("weight"), r"adapters\.2\.weight: give a weight for every adapter or for none"),
    ],
)
def test_merge_cli_bad_input(adapters: list[Path], tmp_path: Path, mutate, message: str) -> None:
    import re

    cfg = _cfg(adapters)
    mutate(cfg)
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["merge", str(_write(tmp_path, cfg)), "-o", str(out)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert re.search(message, text), text
    assert not out.exists()


def test_merge_cli_different_bases_and_bad_set(adapters: list[Path], tmp_path: Path) -> None:
    other = make_lora_dirs(tmp_path, 1, hidden_size=128)[0]
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["merge", str(_write(tmp_path, _cfg([adapters[0], other]))), "-o", str(out)])
    assert res.exit_code == 2 and "made for different bases" in " ".join(res.output.split())
    res = runner.invoke(
        _app(), ["merge", str(_write(tmp_path, _cfg(adapters))), "-o", str(out), "--set", "params.density"]
    )
    assert res.exit_code == 2 and "expected KEY=VALUE" in res.output
    assert not out.exists()


def test_merge_cli_refuses_non_empty_output(adapters: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = runner.invoke(_app(), ["merge", str(_write(tmp_path, _cfg(adapters))), "-o", str(out)])
    assert res.exit_code == 2 and "not empty" in res.output
    assert (out / "keep.txt").read_text() == "x"


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    base, tuned = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if n.endswith("q_proj.weight"):
                p.add_(torch.randn(p.shape[0], 2) @ torch.randn(2, p.shape[1]) * 0.05)
        tuned.model.norm.weight.add_(0.1)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


def test_extract_cli(tmp_path: Path) -> None:
    from peft import PeftModel

    base, tuned = _folders(tmp_path)
    out = tmp_path / "ad"
    res = runner.invoke(
        _app(), ["extract", "--base", str(base), "--tuned", str(tuned), "--energy", "0.99", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "global energy" in res.output
    PeftModel.from_pretrained(tiny_llama(), str(out))
    report = json.loads((out / "phlora_report.json").read_text())
    assert report["modules_to_save"] == ["model.norm"] and set(report["ranks"].values()) == {2}


def test_extract_cli_bad_input(tmp_path: Path) -> None:
    base, tuned = _folders(tmp_path)
    tiny_llama(vocab_size=130).save_pretrained(tmp_path / "wide")
    out = tmp_path / "ad"
    cases = [
        (["--rank", "2", "--energy", "0.9"], "give exactly one"),
        ([], "give one of them"),
        (["--energy", "1.5"], "energy must be in (0, 1]"),
        (["--rank", "2", "--dtype", "int8"], "--dtype 'int8'"),
    ]
    for extra, msg in cases:
        res = runner.invoke(_app(), ["extract", "--base", str(base), "--tuned", str(tuned), "-o", str(out), *extra])
        assert res.exit_code == 2 and msg in " ".join(res.output.split()), res.output
    res = runner.invoke(
        _app(), ["extract", "--base", str(base), "--tuned", str(tmp_path / "wide"), "--rank", "2", "-o", str(out)]
    )
    assert res.exit_code == 2 and "has shape [130, 64] but the base has [128, 64]" in " ".join(res.output.split())
    assert not out.exists()


@pytest.mark.parametrize(
    "recipe", sorted((Path(__file__).resolve().parents[2] / "recipes" / "merge").glob("*.yaml")), ids=lambda p: p.name
)
def test_merge_recipes_validate(recipe: Path) -> None:
    from adapterlab.merging import MERGERS

    raw = yaml.safe_load(recipe.read_text())
    cfg = load_config(recipe)
    merger = MERGERS.get(cfg.method).from_params(cfg.params)
    # every parameter the recipe writes reaches the merger with its value (nothing dropped or defaulted)
    described = merger.describe()
    assert raw["params"] and {k: described[k] for k in raw["params"]} == raw["params"]
    assert cfg.method == raw["method"] and len(cfg.adapters) == len(raw["adapters"])
    assert cfg.output.format == raw.get("output", {}).get("format")


def test_merge_cli_shira_stays_sparse_and_goes_to_the_registry(tmp_path: Path) -> None:
    """SHiRA inputs with no output format give a SHiRA folder equal to the library's sparse merge."""
    from adapterlab.merging import merge_adapters, resolve_adapter
    from adapterlab.registry import AdapterRegistry
    from tests.merging.test_sparse import _set_entries, _shira_model

    dirs = []
    for i, how in enumerate(("even", "random")):
        pm = _shira_model()
        _set_entries(pm, how, seed=i)
        pm.save_pretrained(str(tmp_path / f"s{i}"))
        dirs.append(tmp_path / f"s{i}")
    cfg = {"method": "ties", "adapters": [{"path": str(p), "weight": 1.0} for p in dirs], "params": {"density": 0.5}}
    out, hub = tmp_path / "out", tmp_path / "hub"
    res = runner.invoke(
        _app(), ["merge", str(_write(tmp_path, cfg)), "-o", str(out), "--put", "ties-shira", "--hub", str(hub)]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"].lower() == "adapterlab_shira"
    want = merge_adapters(dirs, "ties", density=0.5)
    got = resolve_adapter(out)
    assert want.output == "shira" and set(got.modules) == set(want.shapes)
    for name in want.shapes:
        torch.testing.assert_close(got.delta(name), want.delta(name), rtol=0, atol=1e-6)
    rows = {r["name"]: r for r in AdapterRegistry(hub).ls()}
    assert rows["ties-shira"]["method"] == "adapterlab_shira", rows


@pytest.mark.parametrize("keep", [False, True])
def test_merge_cli_full_into_pruned_bf16_base(tmp_path: Path, keep: bool) -> None:
    """output.format full on a pruned bf16 base folder: one rounding, the bf16 checkpoint kept, keep_sparsity."""
    from safetensors.torch import load_file

    from adapterlab.pruning import prune_
    from tests.merging._helpers import make_dyadic_lora_dirs, oracle_deltas

    base = tiny_llama(dtype=torch.bfloat16)
    prune_(base, "magnitude", 0.5)
    base.save_pretrained(tmp_path / "base")
    dirs = make_dyadic_lora_dirs(tmp_path, 2, dtype=torch.bfloat16)
    cfg = {
        "method": "task_arithmetic",
        "base": str(tmp_path / "base"),
        "adapters": [str(p) for p in dirs],
        "output": {"format": "full", "keep_sparsity": keep},
    }
    out = tmp_path / "out"
    res = runner.invoke(_app(), ["merge", str(_write(tmp_path, cfg)), "-o", str(out)])
    assert res.exit_code == 0, res.output
    merged = load_file(str(out / "model.safetensors"))
    hits = 0
    for name, d in oracle_deltas(dirs, [1.0, 1.0]).items():
        w0 = base.get_submodule(name).weight.detach()
        zero = w0 == 0
        want = (w0.float() + (torch.where(zero, 0.0, d) if keep else d).float()).to(torch.bfloat16)
        got = merged[f"{name}.weight"]
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), name
        hits += int((zero & (got != 0)).sum())
    report = json.loads((out / "merge_report.json").read_text())
    assert report["base_zeros_hit"] == hits and report["params"]["keep_sparsity"] is keep
    assert (hits == 0) is keep
    assert f"{hits} zero weights of the base filled" in " ".join(res.output.split())


@pytest.mark.parametrize(
    "output, message",
    [
        (
            {"format": "lora", "keep_sparsity": True},
            r"output\.keep_sparsity: applies to format: full only .*not 'lora'",
        ),
        ({"keep_sparsity": True}, r"output\.keep_sparsity: applies to format: full only .*not None"),
        ({"format": "full", "keep_sparsity": "sure"}, r"output\.keep_sparsity: Input should be a valid boolean"),
    ],
)
def test_merge_cli_keep_sparsity_bad_input(adapters: list[Path], tmp_path: Path, output: dict, message: str) -> None:
    import re

    out = tmp_path / "out"
    res = runner.invoke(_app(), ["merge", str(_write(tmp_path, _cfg(adapters, output=output))), "-o", str(out)])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert re.search(message, text) and len(_err(res).splitlines()) == 1, text
    assert not out.exists()
