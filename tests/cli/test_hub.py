"""`adapterlab hub ...` and the `--put` options of merge / extract, through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from adapterlab.cli import extract as extract_cli
from adapterlab.cli import hub as hub_cli
from adapterlab.cli import merge as merge_cli
from adapterlab.models import tiny_llama
from adapterlab.registry import AdapterRegistry
from tests.registry._helpers import lora_dir

runner = CliRunner()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(hub_cli.app, name="hub")
    app.command("merge")(merge_cli.command)
    app.command("extract")(extract_cli.command)
    return app


def _run(*args: str, code: int = 0) -> str:
    res = runner.invoke(_app(), list(args))
    assert res.exit_code == code, res.output
    return " ".join(res.output.split())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("hubcli")
    return [lora_dir(root / f"task{i}", seed=20 + i) for i in range(2)]


def test_hub_commands_end_to_end(adapters: list[Path], tmp_path: Path) -> None:
    hub = str(tmp_path / "hub")
    digest = _run(
        "hub",
        "--hub",
        hub,
        "put",
        str(adapters[0]),
        "--name",
        "sent",
        "--tag",
        "v1",
        "--kind",
        "trained",
        "--parent",
        "hub:x",
    ).split()[-1]
    reg = AdapterRegistry(hub)
    assert reg.resolve("sent") == digest and reg.show("v1")["provenance"]["kind"] == "trained"
    assert _run("hub", "--hub", hub, "resolve", digest[:10]) == digest
    out = _run("hub", "--hub", hub, "ls")
    assert "sent" in out and "v1" in out and digest[:12] in out and "2 entries" in out
    rows = json.loads(runner.invoke(_app(), ["hub", "--hub", hub, "ls", "--json"]).output)
    assert [r["name"] for r in rows] == ["sent", "v1"]
    shown = json.loads(runner.invoke(_app(), ["hub", "--hub", hub, "show", "sent"]).output)
    assert shown["digest"] == digest and shown["rank"] == 2
    assert _run("hub", "--hub", hub, "get", "sent").endswith(digest)
    _run("hub", "--hub", hub, "get", "sent", "-o", str(tmp_path / "copy"))
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in adapters[0].iterdir())
    assert "ok" in _run("hub", "--hub", hub, "verify")
    _run("hub", "--hub", hub, "tag", "sent", "prod")
    d1 = _run("hub", "--hub", hub, "put", str(adapters[1]), "-n", "other").split()[-1]
    assert "already points to" in _run("hub", "--hub", hub, "tag", "other", "prod", code=2)
    _run("hub", "--hub", hub, "tag", "other", "prod", "--force")
    for name in ("sent", "v1"):
        _run("hub", "--hub", hub, "rm", name)
    assert digest in _run("hub", "--hub", hub, "gc", "--dry-run")
    assert "removed 1 object(s)" in _run("hub", "--hub", hub, "gc")
    assert reg.resolve("prod") == d1 and reg.ls(all=True)[0]["digest"] == d1


def test_hub_bad_input_is_one_line_exit_2(
    adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub"
    monkeypatch.setenv("ADAPTERLAB_HUB", str(hub))  # --hub defaults to the environment variable
    _run("hub", "put", str(adapters[0]), "-n", "a")
    assert (hub / "refs" / "a").is_file()
    assert "no adapter 'missing'" in _run("hub", "get", "missing", code=2)
    assert "--kind 'guess'" in _run("hub", "put", str(adapters[0]), "--kind", "guess", code=2)
    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{}")
    torch.save({"w": torch.zeros(1)}, bad / "adapter_model.bin")
    assert "refusing 'adapter_model.bin'" in _run("hub", "put", str(bad), code=2)
    assert [r["name"] for r in AdapterRegistry(hub).ls(all=True)] == ["a"]
    st = AdapterRegistry(hub).get("a") / "adapter_model.safetensors"
    st.chmod(0o644)
    st.write_bytes(st.read_bytes()[:-1] + b"\x00")
    res = runner.invoke(_app(), ["hub", "verify"])
    assert res.exit_code == 1 and "adapter_model.safetensors" in res.output
    assert "failed verification" in _run("hub", "get", "a", code=2)


def test_merge_and_extract_put_into_the_hub(adapters: list[Path], tmp_path: Path) -> None:
    from adapterlab.io import base_fingerprint

    hub = tmp_path / "hub"
    reg = AdapterRegistry(hub)
    reg.put(adapters[1], "second")
    cfg = {"method": "linear", "adapters": [str(adapters[0]), "hub:second"], "output": {"rank": 4}}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg))
    _run("merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "merged"), "--put", "merged", "--hub", str(hub))
    m = reg.show("merged")
    assert m["provenance"]["kind"] == "merged" and m["provenance"]["parents"] == [str(adapters[0]), "hub:second"]
    assert m["rank"] == 4 and reg.get("merged").is_dir()
    assert "--put 'bad name'" in _run(
        "merge", str(tmp_path / "m.yaml"), "-o", str(tmp_path / "m2"), "--put", "bad name", "--hub", str(hub), code=2
    )
    assert not (tmp_path / "m2").exists()

    base, tuned = tiny_llama(), tiny_llama()
    with torch.no_grad():
        tuned.model.layers[0].self_attn.q_proj.weight.add_(torch.randn(64, 2) @ torch.randn(2, 64) * 0.05)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    _run(
        "extract",
        "--base",
        str(tmp_path / "base"),
        "--tuned",
        str(tmp_path / "tuned"),
        "--rank",
        "2",
        "-o",
        str(tmp_path / "ex"),
        "--put",
        "extracted",
        "--hub",
        str(hub),
    )
    e = reg.show("extracted")
    assert e["provenance"]["kind"] == "extracted" and e["provenance"]["parents"] == [str(tmp_path / "tuned")]
    assert e["base_digest"] is not None
    from adapterlab.io import fingerprint_digest

    assert e["base_digest"] == fingerprint_digest(base_fingerprint(tiny_llama()))
    reg.load("extracted", tiny_llama())
