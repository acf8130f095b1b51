"""`--hub` means the same everywhere: before or after a `hub` sub-command, one default
($ADAPTERLAB_HUB, else ./hub) resolved by one helper and said identically in every --help."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterlab.cli._common import HUB_DEFAULT_HELP, resolve_hub
from adapterlab.cli.app import app
from adapterlab.registry import AdapterRegistry
from tests.registry._helpers import lora_dir

runner = CliRunner()


def _run(*args: str, code: int = 0) -> str:
    res = runner.invoke(app, list(args))
    assert res.exit_code == code, res.output
    return res.output


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_dir(tmp_path_factory.mktemp("hubopt") / "task", seed=3)


def _spell(spelling: str, hub: Path, verb: str, *rest: str) -> list[str]:
    """``hub --hub DIR VERB ...`` (before) or ``hub VERB ... --hub DIR`` (after)."""
    if spelling == "before":
        return ["hub", "--hub", str(hub), verb, *rest]
    return ["hub", verb, *rest, "--hub", str(hub)]


@pytest.mark.parametrize("spelling", ["before", "after"])
def test_every_hub_subcommand_takes_hub_before_and_after_the_verb(
    spelling: str, adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "custom-hub"
    decoy = tmp_path / "decoy"  # the default must not be what answers
    monkeypatch.setenv("ADAPTERLAB_HUB", str(decoy))
    monkeypatch.chdir(tmp_path)

    digest = _run(*_spell(spelling, hub, "put", str(adapter), "-n", "a")).split()[-1]
    assert AdapterRegistry(hub).resolve("a") == digest
    assert not decoy.exists() and not (tmp_path / "hub").exists()

    rows = json.loads(_run(*_spell(spelling, hub, "ls", "--json")))
    assert [(r["name"], r["digest"]) for r in rows] == [("a", digest)]
    assert digest[:12] in _run(*_spell(spelling, hub, "ls"))
    assert json.loads(_run(*_spell(spelling, hub, "show", "a")))["digest"] == digest
    assert _run(*_spell(spelling, hub, "resolve", "a")).strip() == digest
    assert _run(*_spell(spelling, hub, "get", "a")).strip() == str(hub / "objects" / digest)
    assert "verified" in _run(*_spell(spelling, hub, "verify"))
    _run(*_spell(spelling, hub, "tag", "a", "b"))
    assert AdapterRegistry(hub).resolve("b") == digest
    assert "removed a" in _run(*_spell(spelling, hub, "rm", "a"))
    _run(*_spell(spelling, hub, "rm", "b"))
    assert "removed 1 object(s)" in _run(*_spell(spelling, hub, "gc"))
    assert AdapterRegistry(hub).ls(all=True) == []
    # the same commands on the default registry see nothing of it
    assert json.loads(_run("hub", "ls", "--json", "--all")) == []


def test_hub_given_twice_must_agree(adapter: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _run("hub", "--hub", str(one), "put", str(adapter), "-n", "a", "--hub", str(one))  # the same folder: fine
    assert AdapterRegistry(one).resolve("a")
    out = _run("hub", "--hub", str(one), "ls", "--hub", str(two), code=2)
    assert "--hub is given twice" in out and str(one) in out and str(two) in out
    assert not two.exists()


def test_default_is_env_then_dot_hub(adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERLAB_HUB", raising=False)
    _run("hub", "put", str(adapter), "-n", "local")
    assert AdapterRegistry(tmp_path / "hub").resolve("local")  # ./hub
    env_hub = tmp_path / "from-env"
    monkeypatch.setenv("ADAPTERLAB_HUB", str(env_hub))
    _run("hub", "put", str(adapter), "-n", "env")
    assert [r["name"] for r in AdapterRegistry(env_hub).ls()] == ["env"]
    assert [r["name"] for r in AdapterRegistry(tmp_path / "hub").ls()] == ["local"]


@pytest.mark.parametrize("env", [None, "", "~/somewhere/hub", "/abs/hub"])
def test_resolve_hub_is_the_registry_default(env: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if env is None:
        monkeypatch.delenv("ADAPTERLAB_HUB", raising=False)
    else:
        monkeypatch.setenv("ADAPTERLAB_HUB", env)
    expected = {None: Path("hub"), "": Path("hub"), "/abs/hub": Path("/abs/hub")}.get(
        env, Path.home() / "somewhere" / "hub"
    )
    assert resolve_hub(None) == expected == AdapterRegistry(None).root
    assert resolve_hub(Path("given")) == Path("given")  # an explicit --hub wins over the environment


def _help(*cmd: str) -> str:
    res = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", res.output).split())


@pytest.mark.parametrize(
    "cmd",
    [("hub",), ("hub", "ls"), ("hub", "put"), ("hub", "get"), ("merge",), ("extract",), ("compress",), ("serve",)],
)
def test_every_hub_option_says_the_same_default(cmd: tuple[str, ...]) -> None:
    text = _help(*cmd)
    assert "--hub" in text and f"({HUB_DEFAULT_HELP})" in text
    assert HUB_DEFAULT_HELP == "default: $ADAPTERLAB_HUB, else ./hub"
    assert "else none" not in text and "[env var" not in text


# ---- serve: the same default, and serving without any registry ---------------------------------


@pytest.fixture(scope="module")
def serve_assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from adapterlab.models import tiny_tokenizer
    from tests.serving._helpers import base_model, make_lora

    root = tmp_path_factory.mktemp("serve_hub")
    model_dir = root / "model"
    base_model().save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    return model_dir, make_lora(root / "lora", seed=1)


def test_serve_without_any_hub_still_serves_folders(
    serve_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, lora = serve_assets
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERLAB_HUB", raising=False)
    out = _run("serve", "--model", str(model_dir), "--adapter", f"x={lora}", "--pin", "x", "--check")
    assert "check passed" in out and "registry hub (does not exist" in " ".join(out.split())
    assert not (tmp_path / "hub").exists()  # reading the default registry creates nothing
    assert "unknown adapter 'reg'" in _run("serve", "--model", str(model_dir), "--pin", "reg", "--check", code=2)


def test_serve_default_hub_is_dot_hub_then_env(
    serve_assets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, lora = serve_assets
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ADAPTERLAB_HUB", raising=False)
    AdapterRegistry(tmp_path / "hub").put(lora, "reg")
    out = _run("serve", "--model", str(model_dir), "--pin", "reg", "--check")  # found in ./hub
    assert "check passed" in out and "reg" in out
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "elsewhere"))  # the environment comes first
    assert "unknown adapter 'reg'" in _run("serve", "--model", str(model_dir), "--pin", "reg", "--check", code=2)
    out = _run("serve", "--model", str(model_dir), "--pin", "reg", "--check", "--hub", "hub")  # then --hub
    assert "check passed" in out
    (tmp_path / "afile").write_text("x")
    assert "is not a folder" in _run("serve", "--model", str(model_dir), "--check", "--hub", "afile", code=2)
