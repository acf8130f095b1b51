"""Issue 15, registry: bad input is one line and exit 2, never a traceback, a hang or a partial hub.

Every refusal is checked three ways: the exact message (a regex), the exit code (2 through the CLI,
``ValueError`` / ``KeyError`` from the library), and that the hub folder's file list and bytes are
what they were before (nothing staged, no ref, no object, no new folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from adapterlab.cli import hub as hub_cli
from adapterlab.io import save_tensors
from adapterlab.registry import AdapterRegistry
from adapterlab.registry.manifest import MAX_NAME_CHARS
from adapterlab.registry.store import MAX_REF_CHARS
from tests.registry._helpers import lora_dir

runner = CliRunner()
CFG = "adapter_config.json"
ST = "adapter_model.safetensors"
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(hub_cli.app, name="hub")
    return app


def _cli(*args: str) -> tuple[int, list[str]]:
    res = runner.invoke(_app(), list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res.exit_code, [line for line in res.output.splitlines() if line.strip()]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of files ('dir' for folders); {} when absent."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_dir(tmp_path_factory.mktemp("faults") / "good", seed=3)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    from adapterlab.models import tiny_llama

    root = tmp_path_factory.mktemp("bases")
    out = {}
    for h in (32, 64):
        tiny_llama(hidden_size=h).save_pretrained(root / f"h{h}")
        out[h] = root / f"h{h}"
    return out


@pytest.fixture
def hub(tmp_path: Path, good: Path) -> Path:
    """A hub holding one healthy adapter named ``a``."""
    root = tmp_path / "hub"
    AdapterRegistry(root).put(good, "a")
    return root


def _variant(
    good: Path,
    dst: Path,
    *,
    config: Callable[[dict], object] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor] | None] | None = None,
    raw_config: str | None = None,
    raw_weights: Callable[[bytes], bytes] | None = None,
) -> Path:
    shutil.copytree(good, dst)
    if config is not None:
        cfg = json.loads((dst / CFG).read_text())
        new = config(cfg)
        (dst / CFG).write_text(json.dumps(new if isinstance(new, dict) else cfg))
    if raw_config is not None:
        (dst / CFG).write_text(raw_config)
    if tensors is not None:
        from safetensors.torch import load_file

        t = load_file(str(dst / ST))
        new_t = tensors(t)
        save_tensors(dst / ST, t if new_t is None else new_t, allow_nonfinite=True)  # bad inputs on purpose
    if raw_weights is not None:
        (dst / ST).write_bytes(raw_weights((dst / ST).read_bytes()))
    return dst


def _header(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def _with_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    n, h = _header(data)
    edit(h)
    b = json.dumps(h).encode()
    return len(b).to_bytes(8, "little") + b + data[8 + n :]


def _huge_offsets(h: dict) -> None:
    h[Q_A]["data_offsets"] = [0, 10**15]


def _overlap(h: dict) -> None:
    h[Q_B]["data_offsets"] = list(h[Q_A]["data_offsets"])


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[9] ^= 0xFF  # the first byte inside the JSON header
    return bytes(b)


def _pickle(_: bytes) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def _drop_b(t: dict) -> dict:
    return {k: v for k, v in t.items() if ".lora_B." not in k}


def _nan(t: dict) -> None:
    t[Q_A][0, 0] = float("nan")


def _b_rank(t: dict) -> None:
    t[Q_B] = torch.zeros(32, 3)


P = r"put: \S+"  # a path in a message
#: (id, variant kwargs, message regex (the whole line, without "error: ")).
BAD_ADAPTERS = [
    (
        "peft_type_missing",
        {"config": lambda c: c.pop("peft_type")},
        rf"{P}/adapter_config\.json: key 'peft_type' is missing; a PEFT adapter config names its method \(e\.g\. \"LORA\"\)",
    ),
    (
        "peft_type_unknown",
        {"config": lambda c: c.update(peft_type="NOPE")},
        rf"{P}/adapter_config\.json: peft_type 'NOPE' is not a known peft type \(adapterlab's: .*ADAPTERLAB_SHIRA.*; or any peft type\)",
    ),
    (
        "peft_type_lower_case",
        {"config": lambda c: c.update(peft_type="lora")},
        rf"{P}/adapter_config\.json: peft_type 'lora' is not a known peft type .*",
    ),
    (
        "peft_type_not_a_string",
        {"config": lambda c: c.update(peft_type=3)},
        rf"{P}/adapter_config\.json: peft_type 3 is not a known peft type .*",
    ),
    (
        "config_not_an_object",
        {"raw_config": "[1, 2]"},
        rf"{P}/adapter_config\.json: the config must be a JSON object, got a JSON list",
    ),
    (
        "config_not_json",
        {"raw_config": "{oops"},
        r"put: \S+/adapter_config\.json: not valid JSON \(Expecting property name enclosed in double quotes: "
        r"line 1 column 2\)",
    ),
    (
        "config_deeply_nested",
        {"raw_config": "[" * 100000},
        r"put: \S+/adapter_config\.json: not valid JSON \(nested too deeply\)",
    ),
    (
        "r_zero",
        {"config": lambda c: c.update(r=0)},
        rf"{P}/adapter_config\.json: key 'r' is 0; it must be a positive integer \(the rank\)",
    ),
    (
        "r_not_int",
        {"config": lambda c: c.update(r="two")},
        rf"{P}/adapter_config\.json: key 'r' is 'two'; it must be a positive integer \(the rank\)",
    ),
    (
        "lora_alpha_nan",
        {"config": lambda c: c.update(lora_alpha=float("nan"))},
        rf"{P}/adapter_config\.json: key 'lora_alpha' is nan; it must be a finite number",
    ),
    (
        "target_modules_bad",
        {"config": lambda c: c.update(target_modules=5)},
        rf"{P}/adapter_config\.json: key 'target_modules' is 5; it must be a string, a list of strings or null",
    ),
    (
        "rank_pattern_bad",
        {"config": lambda c: c.update(rank_pattern={"q_proj": "x"})},
        rf"{P}/adapter_config\.json: key rank_pattern\.q_proj is 'x'; it must be a positive integer",
    ),
    (
        "r_inconsistent_with_tensors",
        {"config": lambda c: c.update(r=4)},
        rf"{P}/adapter_model\.safetensors: tensor '{re.escape(Q_A)}' has shape \[2, 32\]; lora_A must be \(r, d_in\) with r=4 "
        r"\(key 'r' / 'rank_pattern' of adapter_config\.json\)",
    ),
    (
        "rank_pattern_inconsistent",
        {"config": lambda c: c.update(rank_pattern={"v_proj": 8})},
        rf"{P}/adapter_model\.safetensors: tensor '\S+v_proj\.lora_A\.weight' has shape \[2, 32\]; lora_A must be \(r, d_in\) with r=8 .*",
    ),
    (
        "b_rank_inconsistent",
        {"tensors": _b_rank},
        rf"{P}/adapter_model\.safetensors: tensor '{re.escape(Q_B)}' has shape \[32, 3\]; lora_B must be \(d_out, r\) with r=2 .*",
    ),
    (
        "missing_lora_B",
        {"tensors": _drop_b},
        rf"{P}/adapter_model\.safetensors: module 'model\.layers\.0\.self_attn\.q_proj' has lora_A but no lora_B",
    ),
    (
        "no_tensors",
        {"tensors": lambda t: {}},
        rf"{P}/adapter_model\.safetensors: the file holds no tensors; an adapter stores at least one weight",
    ),
    (
        "no_lora_tensors",
        {"tensors": lambda t: {"model.embed.weight": torch.zeros(2)}},
        rf"{P}/adapter_model\.safetensors: no LORA tensors \(lora_A \+ lora_B per module\); got \['model\.embed\.weight'\]",
    ),
    (
        "nan_value",
        {"tensors": _nan},
        rf"{P}/adapter_model\.safetensors: tensor '{re.escape(Q_A)}' has 1 NaN/Inf value\(s\); the registry refuses non-finite weights",
    ),
    (
        "truncated",
        {"raw_weights": lambda d: d[:-10]},
        r"put: '\S+/adapter_model\.safetensors' is not a valid safetensors file \(Error while deserializing header: "
        r"incomplete metadata, file not fully covered\); re-save or remove it",
    ),
    (
        "empty_file",
        {"raw_weights": lambda d: b""},
        r"put: '\S+/adapter_model\.safetensors' is not a valid safetensors file \(the file is empty\); re-save or remove it",
    ),
    (
        "flipped_header",
        {"raw_weights": _flip},
        r"put: '\S+/adapter_model\.safetensors' is not a valid safetensors file \(Error while deserializing header: "
        r"invalid UTF-8 in header.*\); re-save or remove it",
    ),
    (
        "huge_offsets",
        {"raw_weights": lambda d: _with_header(d, _huge_offsets)},
        r"put: '\S+/adapter_model\.safetensors' is not a valid safetensors file \(Error while deserializing header: "
        r"invalid .*offset.*\); re-save or remove it",
    ),
    (
        "overlapping_offsets",
        {"raw_weights": lambda d: _with_header(d, _overlap)},
        r"put: '\S+/adapter_model\.safetensors' is not a valid safetensors file \(Error while deserializing header: "
        r"invalid offset .*\); re-save or remove it",
    ),
    (
        "pickle_renamed",
        {"raw_weights": _pickle},
        r"put: '\S+/adapter_model\.safetensors' is not a valid safetensors file \(it is a pickle / torch\.save file, "
        r"which adapterlab does not read: pickle can run code\); re-save it as safetensors",
    ),
]


@pytest.mark.parametrize(("case", "kwargs", "pattern"), BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_put_refuses_unloadable_adapters_library(
    good: Path, hub: Path, tmp_path: Path, case: str, kwargs: dict, pattern: str
) -> None:
    src = _variant(good, tmp_path / case, **kwargs)
    before = snapshot(hub)
    with pytest.raises(ValueError) as err:
        AdapterRegistry(hub).put(src, "bad")
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
    assert snapshot(hub) == before


@pytest.mark.parametrize(("case", "kwargs", "pattern"), BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_put_refuses_unloadable_adapters_cli(
    good: Path, hub: Path, tmp_path: Path, case: str, kwargs: dict, pattern: str
) -> None:
    src = _variant(good, tmp_path / case, **kwargs)
    before = snapshot(hub)
    code, lines = _cli("hub", "--hub", str(hub), "put", str(src), "--name", "bad")
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"error: {pattern}", lines[0]), lines[0]
    assert snapshot(hub) == before


def test_put_into_a_new_hub_creates_nothing(good: Path, tmp_path: Path) -> None:
    src = _variant(good, tmp_path / "nan", tensors=_nan)
    root = tmp_path / "fresh"
    code, lines = _cli("hub", "--hub", str(root), "put", str(src))
    assert code == 2 and len(lines) == 1 and "NaN/Inf" in lines[0]
    assert not root.exists()


def test_put_refuses_an_adapter_of_another_base(good: Path, hub: Path, bases: dict[int, Path]) -> None:
    from adapterlab.models import load_model

    before = snapshot(hub)
    msg = (
        rf"put: \S+/adapter_model\.safetensors: tensor '{re.escape(Q_A)}' has shape \[2, 32\], but base module "
        r"'model\.layers\.0\.self_attn\.q_proj' takes 64 inputs \(an adapter of another base\?\)"
    )
    with pytest.raises(ValueError) as err:
        AdapterRegistry(hub).put(good, "other", base=load_model(str(bases[64])))
    assert re.fullmatch(msg, str(err.value)), str(err.value)
    code, lines = _cli("hub", "--hub", str(hub), "put", str(good), "--name", "other", "--base", str(bases[64]))
    assert code == 2 and re.fullmatch(rf"error: {msg}", lines[-1]), lines
    assert not [line for line in lines if "Traceback" in line]
    assert snapshot(hub) == before
    # the base it was made for is accepted (a fresh hub: a stored object keeps its first manifest)
    fresh = hub.parent / "fresh"
    code, lines = _cli("hub", "--hub", str(fresh), "put", str(good), "--name", "right", "--base", str(bases[32]))
    assert code == 0, lines
    assert AdapterRegistry(fresh).show("right")["base_digest"] is not None


def test_every_adapterlab_method_is_accepted_and_checked_against_its_base(tmp_path: Path) -> None:
    from peft import get_peft_model

    from adapterlab import DyLoraConfig, LoriConfig, LorsConfig, ShiraConfig, SnellConfig, SppConfig
    from adapterlab.models import tiny_llama

    configs = {
        "shira": ShiraConfig(r=2, target_modules=["q_proj"]),
        "lori": LoriConfig(r=2, target_modules=["q_proj"]),
        "dylora": DyLoraConfig(r=2, target_modules=["q_proj"]),
        "snell": SnellConfig(target_modules=["q_proj"]),
        "spp": SppConfig(r=2, target_modules=["q_proj"]),
        "lors": LorsConfig(r=2, target_modules=["q_proj"]),
    }
    reg = AdapterRegistry(tmp_path / "hub")
    other = tiny_llama(hidden_size=64)
    for name, cfg in configs.items():
        get_peft_model(tiny_llama(hidden_size=32), cfg).save_pretrained(str(tmp_path / name))
        reg.put(tmp_path / name, name, base=tiny_llama(hidden_size=32))
        before = snapshot(reg.root)
        with pytest.raises(
            ValueError, match=r"^put: \S+: tensor '\S+' (has shape|is) .*\(an adapter of another base\?\)$"
        ):
            reg.put(tmp_path / name, name + "-other", base=other)
        assert snapshot(reg.root) == before


# ---- special files -----------------------------------------------------------------------------


def _guarded(fn: Callable[[], object], fifo: Path, seconds: float = 60.0) -> object:
    """Run ``fn`` in a thread; if it blocks on ``fifo`` past ``seconds``, release it and fail."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a writer unblocks the reader
        os.close(fd)
        t.join(10)
        pytest.fail(f"put blocked on the FIFO {fifo} for {seconds:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


@pytest.mark.parametrize("fname", ["notes.txt", "adapter_model.safetensors", "adapter_config.json"])
def test_put_refuses_a_fifo_without_blocking(good: Path, hub: Path, tmp_path: Path, fname: str) -> None:
    src = tmp_path / "with_fifo"
    shutil.copytree(good, src)
    (src / fname).unlink(missing_ok=True)
    os.mkfifo(src / fname)
    before = snapshot(hub)
    pattern = (
        rf"put: {re.escape(str(src / fname))} is a FIFO \(named pipe\), not a regular file; the registry stores "
        r"plain files only \(remove it from the folder\)"
    )
    with pytest.raises(ValueError) as err:
        _guarded(lambda: AdapterRegistry(hub).put(src, "fifo"), src / fname)
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
    code, lines = _guarded(lambda: _cli("hub", "--hub", str(hub), "put", str(src)), src / fname)  # type: ignore[misc]
    assert code == 2 and len(lines) == 1 and re.fullmatch(rf"error: {pattern}", lines[0]), lines
    assert snapshot(hub) == before


def test_put_refuses_a_socket(good: Path, hub: Path, tmp_path: Path) -> None:
    src = tmp_path / "s"  # short: AF_UNIX paths are limited to ~108 bytes
    shutil.copytree(good, src)
    cwd = os.getcwd()
    os.chdir(src)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind("sock")
    finally:
        os.chdir(cwd)
    try:
        before = snapshot(hub)
        code, lines = _cli("hub", "--hub", str(hub), "put", str(src))
        assert code == 2 and len(lines) == 1, lines
        assert re.fullmatch(
            rf"error: put: {re.escape(str(src / 'sock'))} is a socket, not a regular file; .*", lines[0]
        )
        assert snapshot(hub) == before
    finally:
        sock.close()


def test_cli_put_on_a_fifo_exits_2_in_a_subprocess(good: Path, hub: Path, tmp_path: Path) -> None:
    """The real entry point, under a timeout: a hang would be a test failure, not a stuck suite."""
    src = tmp_path / "with_fifo"
    shutil.copytree(good, src)
    os.mkfifo(src / "stream")
    before = snapshot(hub)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    try:
        res = subprocess.run(
            [sys.executable, "-m", "adapterlab.cli.app", "hub", "--hub", str(hub), "put", str(src)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
    except subprocess.TimeoutExpired:
        os.close(os.open(src / "stream", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("`adapterlab hub put` hung on a FIFO")
    # bitsandbytes prints one line about its optional 'kernels' package at import on machines without it
    lines = [line for line in res.stderr.splitlines() if line.strip() and "kernels-community" not in line]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert re.fullmatch(r"error: put: \S+/stream is a FIFO \(named pipe\), not a regular file; .*", lines[0]), lines
    assert res.stdout == "" and snapshot(hub) == before


# ---- names and refs ----------------------------------------------------------------------------

NAME_RULE = (
    r"use 1-128 letters, digits, '\.', '_' or '-', starting with a letter or digit "
    r"\(no '/', '@', ':' or spaces\)"
)
BAD_NAMES = [
    ("trailing_newline", "evil\n", rf"name 'evil\\n' is not a valid registry name: {NAME_RULE}"),
    ("leading_newline", "\nevil", rf"name '\\nevil' is not a valid registry name: {NAME_RULE}"),
    (
        "too_long",
        "n" * 200,
        rf"name '{'n' * 40}'\.\.\. is 200 characters long; registry names are at most {MAX_NAME_CHARS}",
    ),
    ("slash", "a/b", rf"name 'a/b' is not a valid registry name: {NAME_RULE}"),
    ("digest_like", "a" * 64, rf"name '{'a' * 64}' looks like a sha256 digest; pick a name that is not 64 hex digits"),
]


@pytest.mark.parametrize(("case", "name", "pattern"), BAD_NAMES, ids=[c[0] for c in BAD_NAMES])
def test_put_and_tag_refuse_bad_names(good: Path, hub: Path, case: str, name: str, pattern: str) -> None:
    before = snapshot(hub)
    reg = AdapterRegistry(hub)
    with pytest.raises(ValueError) as err:
        reg.put(good, name)
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
    with pytest.raises(ValueError) as err:
        reg.put(good, "ok", tags=(name,))
    assert re.fullmatch(pattern.replace("name", "tag", 1), str(err.value)), str(err.value)
    with pytest.raises(ValueError) as err:
        reg.tag("a", name)
    assert re.fullmatch(pattern.replace("name", "tag", 1), str(err.value)), str(err.value)
    for args, pat in (
        (["put", str(good), "--name", name], pattern),
        (["put", str(good), "--tag", name], pattern.replace("name", "tag", 1)),
        (["tag", "a", name], pattern.replace("name", "tag", 1)),
    ):
        code, lines = _cli("hub", "--hub", str(hub), *args)
        assert code == 2 and len(lines) == 1 and re.fullmatch(rf"error: {pat}", lines[0]), (args, lines)
    assert snapshot(hub) == before
    assert not any("\n" in p.name for p in (hub / "refs").iterdir())


LONG = "x" * 5000
REF_RULE = (
    rf"ref '{'x' * 40}'\.\.\. is 5000 characters long; registry refs are at most {MAX_REF_CHARS} "
    rf"\(hub:NAME@DIGEST with a name of at most {MAX_NAME_CHARS}\)"
)
#: (id, CLI args after `hub --hub H`, library call, message regex).
BAD_REFS = [
    ("resolve_long", ["resolve", LONG], lambda r: r.resolve(LONG), REF_RULE),
    ("get_long", ["get", LONG], lambda r: r.get(LONG), REF_RULE),
    ("get_bundle_long", ["get", "--bundle", LONG], lambda r: r.get_bundle(LONG), REF_RULE),
    ("show_long", ["show", LONG], lambda r: r.show(LONG), REF_RULE),
    ("verify_long", ["verify", LONG], lambda r: r.verify(LONG), REF_RULE),
    ("tag_long_ref", ["tag", LONG, "t"], lambda r: r.tag(LONG, "t"), REF_RULE),
    (
        "hub_prefix_long",
        ["resolve", "hub:" + LONG],
        lambda r: r.resolve("hub:" + LONG),
        REF_RULE.replace(f"'{'x' * 40}'", f"'hub:{'x' * 36}'").replace("5000", "5004"),
    ),
    (
        "name_at_long_digest",
        ["show", "a@" + "0" * 4998],
        lambda r: r.show("a@" + "0" * 4998),
        rf"ref 'a@{'0' * 38}'\.\.\. is 5000 characters long; registry refs are at most {MAX_REF_CHARS} .*",
    ),
    (
        "rm_long",
        ["rm", LONG],
        lambda r: r.rm(LONG),
        rf"name '{'x' * 40}'\.\.\. is 5000 characters long; registry names are at most {MAX_NAME_CHARS}",
    ),
    (
        "tag_long_name",
        ["tag", "a", LONG],
        lambda r: r.tag("a", LONG),
        rf"tag '{'x' * 40}'\.\.\. is 5000 characters long; registry names are at most {MAX_NAME_CHARS}",
    ),
    (
        "nul_byte",
        ["resolve", "a\x00b"],
        lambda r: r.resolve("a\x00b"),
        r"ref 'a\\x00b' contains the control character '\\x00'; registry refs are printable",
    ),
    (
        "inner_newline",
        ["get", "a\nb"],
        lambda r: r.get("a\nb"),
        r"ref 'a\\nb' contains the control character '\\n'; registry refs are printable",
    ),
    (
        "long_name_not_found",
        ["get", "y" * 150],
        lambda r: r.get("y" * 150),
        rf"registry '\S+' has no adapter '{'y' * 150}'; known names: a \(or give a digest prefix of >= 8 hex digits\)",
    ),
    (
        "rm_newline_not_found",
        ["rm", "a\n"],
        lambda r: r.rm("a\n"),
        r"registry '\S+' has no name 'a\\n' to remove; names: a",
    ),
]


@pytest.mark.parametrize(("case", "args", "call", "pattern"), BAD_REFS, ids=[c[0] for c in BAD_REFS])
def test_bad_refs_are_one_line(hub: Path, case: str, args: list[str], call: Callable, pattern: str) -> None:
    before = snapshot(hub)
    with pytest.raises((ValueError, KeyError)) as err:
        call(AdapterRegistry(hub))
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
    code, lines = _cli("hub", "--hub", str(hub), *args)
    assert code == 2 and len(lines) == 1 and re.fullmatch(rf"error: {pattern}", lines[0]), lines
    assert snapshot(hub) == before


@pytest.mark.parametrize("args", [["rm", "x"], ["tag", "missing", "t"], ["get", LONG], ["resolve", "a\nb"]])
def test_refusals_on_a_missing_hub_create_nothing(tmp_path: Path, args: list[str]) -> None:
    root = tmp_path / "nothing"
    code, lines = _cli("hub", "--hub", str(root), *args)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not root.exists()


def test_a_ref_with_a_trailing_newline_written_before_the_fix_can_be_removed(hub: Path) -> None:
    reg = AdapterRegistry(hub)
    (hub / "refs" / "evil\n").write_text(reg.resolve("a") + "\n")  # what `--name $'evil\n'` used to create
    assert reg.rm("evil\n") == reg.resolve("a")
    assert sorted(p.name for p in (hub / "refs").iterdir()) == ["a"]
    assert reg.resolve("a\n") == reg.resolve("a")  # surrounding whitespace is still stripped
