"""Tables at 80 columns: module names shortened to what tells them apart, the embedded base shown
as `default`, paths shortened, and cells that fold instead of being cut with "…"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from adapterlab.cli import _common
from adapterlab.cli import hub as hub_cli
from adapterlab.cli import merge as merge_cli
from adapterlab.cli._common import model_label, short_module_names, short_path

runner = CliRunner()
WIDTH = 80


@pytest.fixture
def narrow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's rich consoles render at 80 columns, as with COLUMNS=80 in a terminal."""
    monkeypatch.setattr(_common.console, "_width", WIDTH)
    monkeypatch.setattr(_common.err_console, "_width", WIDTH)


def _fits(output: str) -> None:
    assert "…" not in output, output
    too_wide = [line for line in output.splitlines() if len(line) > WIDTH]
    assert not too_wide, too_wide


# ---- the shared helpers -------------------------------------------------------------------------


def test_short_module_names_of_a_llama_stack() -> None:
    names = [
        "model.embed_tokens",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.11.self_attn.q_proj",
        "model.norm",
        "lm_head",
    ]
    short, dropped = short_module_names(names)
    assert short == ["embed_tokens", "0.q_proj", "0.up_proj", "11.q_proj", "norm", "lm_head"]
    assert dropped == ["model", "layers", "self_attn", "mlp"]


def test_short_module_names_keep_what_tells_them_apart() -> None:
    names = [
        "model.layers.0.self_attn.q_proj",
        "model.vision.layers.0.self_attn.q_proj",  # 'vision' is the only difference: kept
        "model.layers.0.mlp.q_proj",  # 'mlp' vs 'self_attn' are the difference: one of them is kept
    ]
    short, dropped = short_module_names(names)
    assert len(set(short)) == 3
    assert short == ["0.q_proj", "vision.0.q_proj", "0.mlp.q_proj"]
    assert dropped == ["model", "layers", "self_attn"]
    # a peft prefix goes with the rest of what every name shares; the last part stays even if shared
    assert short_module_names(["base_model.model.model.layers.3.self_attn.v_proj"]) == (
        ["3.v_proj"],
        ["base_model", "model", "layers", "self_attn"],
    )
    assert short_module_names(["a.b", "a.b"]) == (["a.b", "a.b"], [])  # duplicates: left as they are
    assert short_module_names([]) == ([], [])


def test_short_path_and_model_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterlab._paths import cache_dir
    from adapterlab.models import DEFAULT_MODEL_ID

    monkeypatch.chdir(tmp_path)
    assert short_path(tmp_path / "hub") == "hub"
    assert short_path(tmp_path) == "."
    assert short_path(Path.home() / "x" / "y") == os.path.join("~", "x", "y")
    assert short_path("relative/dir") == "relative/dir"
    assert short_path("/definitely/elsewhere") == "/definitely/elsewhere"
    assert model_label(str(cache_dir() / "models" / DEFAULT_MODEL_ID)) == "default"
    assert model_label(DEFAULT_MODEL_ID) == "default"
    assert model_label("default") == "default"
    assert model_label(None) == "-"
    assert model_label(str(tmp_path / "bases" / "pruned")) == "bases/pruned"
    assert model_label("org/some-model") == "org/some-model"  # a model id, not a local path
    assert model_label("LlamaForCausalLM") == "LlamaForCausalLM"


# ---- the tables ---------------------------------------------------------------------------------


def test_merge_table_at_80_columns(narrow: None, tmp_path: Path) -> None:
    from tests.merging._helpers import make_lora_dirs

    adapters = make_lora_dirs(tmp_path / "adapters", 2)
    cfg = {
        "method": "ties",
        "adapters": [{"path": str(p), "weight": 1.0} for p in adapters],
        "params": {"density": 0.3},
        "output": {"rank": 4},
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    app = typer.Typer()
    app.command("merge")(merge_cli.command)
    app.command("other")(lambda: None)
    res = runner.invoke(app, ["merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    _fits(res.output)
    cells = [line.split("│")[1].strip() for line in res.output.splitlines() if line.startswith("│")]
    assert cells and len(set(cells)) == len(cells)  # one distinct, whole name per module row
    assert all(c.split(".")[0].isdigit() and c.endswith("_proj") for c in cells), cells
    assert "model.layers" not in res.output
    assert "module names without model, layers" in " ".join(res.output.split())


def test_hub_ls_table_at_80_columns(narrow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapterlab._paths import cache_dir
    from adapterlab.models import DEFAULT_MODEL_ID, tiny_llama
    from adapterlab.registry import AdapterRegistry
    from tests.registry._helpers import lora_dir

    monkeypatch.chdir(tmp_path)
    embedded = str(cache_dir() / "models" / DEFAULT_MODEL_ID)
    reg = AdapterRegistry(tmp_path / "hub")
    base = tiny_llama(hidden_size=32)
    base.config._name_or_path = embedded  # what a base loaded from the embedded model's cache records
    long_name = "sentiment-on-the-pruned-smollm2-base-with-a-long-descriptive-name-v2"
    digest = reg.put(lora_dir(tmp_path / "a"), long_name, base=base, provenance={"kind": "trained"})
    app = typer.Typer()
    app.add_typer(hub_cli.app, name="hub")
    res = runner.invoke(app, ["hub", "ls", "--hub", str(tmp_path / "hub")])
    assert res.exit_code == 0, res.output
    _fits(res.output)
    rows = [line.split("│") for line in res.output.splitlines() if line.startswith("│")]
    assert "".join(r[1].strip() for r in rows) == long_name  # folded over lines, nothing cut
    assert rows[0][2].strip() == digest[:12] and rows[0][6].strip() == "default"
    assert embedded not in res.output and "adapterlab hub: hub" in res.output  # root shown relative
