"""Issue 15, class 4: a corrupt safetensors file is one line naming the file, through every command
that reads one — ``merge``, ``compress``, ``extract``, ``hub put`` — and the library calls behind them.

Every read goes through :func:`adapterlab.io.open_tensors` / :func:`adapterlab.io.load_tensors` (the
one validated loader), so the message is the same everywhere, after the caller's key path:
truncated, empty, a flipped header byte, huge or overlapping offsets, a pickle renamed
``.safetensors``, a symlink to a system file, a symlink to a device. Each case checks the exact line,
exit code 2 (CLI) or ``ValueError`` (library), no traceback, and that nothing was written (no output
folder, no stage left next to it, the hub's bytes unchanged).
"""

from __future__ import annotations

import hashlib
import io as _io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterlab.cli.app import app
from adapterlab.io import check_safetensors, load_metadata, load_tensors, open_tensors
from tests.merging._helpers import make_lora_dirs

runner = CliRunner()
ST = "adapter_model.safetensors"
PASSWD = Path("/etc/passwd")


# ---- the corruptions ---------------------------------------------------------------------------


def _header(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def _with_header(data: bytes, edit: Callable[[dict], None]) -> bytes:
    n, h = _header(data)
    edit(h)
    b = json.dumps(h).encode()
    return len(b).to_bytes(8, "little") + b + data[8 + n :]


def _names(h: dict) -> list[str]:
    return sorted(k for k in h if k != "__metadata__")


def _huge(h: dict) -> None:
    h[_names(h)[0]]["data_offsets"] = [0, 10**15]


def _overlap(h: dict) -> None:
    first, second = _names(h)[:2]
    h[second]["data_offsets"] = list(h[first]["data_offsets"])


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[9] ^= 0xFF  # the first byte inside the JSON header
    return bytes(b)


def _pickle(_: bytes) -> bytes:
    buf = _io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def _passwd_reason() -> str:
    data = PASSWD.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return f"its first 8 bytes give a header of {n} bytes but the file has {len(data)}: truncated, or not safetensors"


HEADER = r"Error while deserializing header: "
#: (id, how to corrupt the file's bytes or a symlink target, regex of the reason, whole-message form)
CASES: list[tuple[str, Callable[[bytes], bytes] | str, str]] = [
    ("truncated", lambda d: d[:-10], re.escape(HEADER + "incomplete metadata, file not fully covered")),
    ("empty", lambda d: b"", re.escape("the file is empty")),
    ("flipped_header", _flip, re.escape(HEADER + "invalid UTF-8 in header") + r": [^()]+"),
    ("huge_offsets", lambda d: _with_header(d, _huge), re.escape(HEADER) + r"invalid (shape, data type, or )?offset.*"),
    (
        "overlapping_offsets",
        lambda d: _with_header(d, _overlap),
        re.escape(HEADER) + r"invalid (shape, data type, or )?offset.*",
    ),
    ("pickle_renamed", _pickle, "pickle"),
    ("symlink_to_system_file", str(PASSWD), "passwd"),
    ("symlink_to_device", "/dev/null", "device"),
]
IDS = [c[0] for c in CASES]


def corrupt(folder: Path, fname: str, how: Callable[[bytes], bytes] | str) -> Path:
    f = folder / fname
    if isinstance(how, str):
        if not Path(how).exists():
            pytest.skip(f"{how} does not exist on this machine")
        f.unlink()
        f.symlink_to(how)
    else:
        f.write_bytes(how(f.read_bytes()))
    return f


def message(f: Path, reason: str) -> str:
    """The regex of the loader's whole message for file ``f`` (without any caller prefix)."""
    q = re.escape(repr(str(f)))
    if reason == "pickle":
        return (
            rf"{q} is not a valid safetensors file \(it is a pickle / torch\.save file, which adapterlab does not "
            r"read: pickle can run code\); re-save it as safetensors"
        )
    if reason == "passwd":
        return (
            rf"{q} \(a symlink to '/etc/passwd'\) is not a valid safetensors file \({re.escape(_passwd_reason())}\); "
            r"re-save or remove it"
        )
    if reason == "device":
        return (
            rf"{q} \(a symlink to '/dev/null'\) is a device file, not a regular file; a tensor file must be a plain "
            r"\.safetensors file"
        )
    return rf"{q} is not a valid safetensors file \({reason}\); re-save or remove it"


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden stages included) with its sha256 ('dir' for folders)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): "link"
        if p.is_symlink()
        else (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


def cli(*args: str) -> tuple[int, str]:
    """Exit code and the one output line; a Python exception escaping the command, or more than one
    line, fails."""
    res = runner.invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    return res.exit_code, lines[0]


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("corrupt-in"), 2, r=2, hidden_size=32)


@pytest.fixture
def bad(adapters: list[Path], tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path, str]:
    """A copy of adapter 1 with its safetensors corrupted: (folder, file, message regex)."""
    _, how, reason = request.param
    folder = tmp_path / "bad"
    shutil.copytree(adapters[1], folder)
    f = corrupt(folder, ST, how)
    return folder, f, message(f, reason)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from adapterlab.models import tiny_llama

    root = tmp_path_factory.mktemp("corrupt-models")
    tiny_llama(hidden_size=32).save_pretrained(root / "base")
    tuned = tiny_llama(hidden_size=32)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    tuned.save_pretrained(root / "tuned")
    return root / "base", root / "tuned"


parametrize_bad = pytest.mark.parametrize("bad", CASES, ids=IDS, indirect=True)


# ---- the loader itself ----------------------------------------------------------------------------


@parametrize_bad
def test_the_loader_names_the_file(bad: tuple[Path, Path, str]) -> None:
    _, f, pattern = bad
    for read in (load_tensors, open_tensors, check_safetensors, load_metadata):
        with pytest.raises(ValueError) as err:
            read(f)
        msg = str(err.value)
        want = pattern
        if read is load_tensors and "pickle" in pattern:  # the whole-file reader has an explicit unsafe flag
            want += re.escape(", or pass allow_pickle=True only if you trust it")
        assert re.fullmatch(want, msg), (read.__name__, msg)


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"^no such tensor file: {re.escape(repr(str(tmp_path / 'x')))}$"):
        open_tensors(tmp_path / "x")


# ---- merge -------------------------------------------------------------------------------------


@parametrize_bad
def test_merge_library(adapters: list[Path], bad: tuple[Path, Path, str], tmp_path: Path) -> None:
    from adapterlab.merging import merge_adapters

    folder, _, pattern = bad
    with pytest.raises(ValueError) as err:
        merge_adapters([adapters[0], folder], "linear")
    assert re.fullmatch(rf"adapters\[1\]: {pattern}", str(err.value)), str(err.value)


@parametrize_bad
def test_merge_job_and_cli(adapters: list[Path], bad: tuple[Path, Path, str], tmp_path: Path) -> None:
    from adapterlab.jobs.merge import merge_folder

    folder, _, pattern = bad
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: ties\nparams: {{density: 0.5}}\nadapters: [{adapters[0]}, {folder}]\n")
    out = tmp_path / "out" / "merged"
    before = snapshot(tmp_path / "out")
    with pytest.raises(ValueError) as err:
        merge_folder(cfg, out)
    assert re.fullmatch(rf"{re.escape(str(cfg))}: adapters\.1: {pattern}", str(err.value)), str(err.value)
    code, line = cli("merge", str(cfg), "-o", str(out))
    assert code == 2 and re.fullmatch(rf"error: {re.escape(str(cfg))}: adapters\.1: {pattern}", line), line
    code, line = cli("merge", str(cfg), "-o", str(out), "--dry-run")
    assert code == 2 and re.fullmatch(rf"error: {re.escape(str(cfg))}: adapters\.1: {pattern}", line), line
    assert snapshot(tmp_path / "out") == before and not out.exists()


# ---- compress ----------------------------------------------------------------------------------


@parametrize_bad
def test_compress_library_and_cli(adapters: list[Path], bad: tuple[Path, Path, str], tmp_path: Path) -> None:
    from adapterlab.compression import compress_adapters

    folder, _, pattern = bad
    with pytest.raises(ValueError) as err:
        compress_adapters([adapters[0], folder], rank=2)
    assert re.fullmatch(rf"adapters\[1\]: {pattern}", str(err.value)), str(err.value)
    out = tmp_path / "out" / "bundle"
    (tmp_path / "out").mkdir()
    code, line = cli("compress", str(adapters[0]), str(folder), "--rank", "2", "-o", str(out))
    assert code == 2 and re.fullmatch(rf"error: adapters\[1\]: {pattern}", line), line
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(("case", "how", "reason"), CASES, ids=IDS)
def test_loading_a_bundle_with_a_corrupt_file(
    adapters: list[Path], tmp_path: Path, case: str, how: Callable[[bytes], bytes] | str, reason: str
) -> None:
    from adapterlab.compression import SharedBasisBundle, compress_adapters

    root = tmp_path / "bundle"
    compress_adapters(adapters, rank=2).save(root)
    f = corrupt(root, "bases.safetensors", how)
    expected = message(f, reason)
    if reason == "pickle":
        expected += re.escape(", or pass allow_pickle=True only if you trust it")
    with pytest.raises(ValueError) as err:
        SharedBasisBundle.load(root)
    assert re.fullmatch(expected, str(err.value)), str(err.value)


# ---- extract -----------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["base", "tuned"])
@pytest.mark.parametrize(("case", "how", "reason"), CASES, ids=IDS)
def test_extract_library_and_cli(
    models: tuple[Path, Path], tmp_path: Path, which: str, case: str, how: Callable[[bytes], bytes] | str, reason: str
) -> None:
    from adapterlab.extraction import extract_lora

    base, tuned = models
    folder = tmp_path / which
    shutil.copytree(base if which == "base" else tuned, folder)
    f = corrupt(folder, "model.safetensors", how)
    pattern = rf"{which}: {message(f, reason)}"
    args = {"base": folder if which == "base" else base, "tuned": folder if which == "tuned" else tuned}
    with pytest.raises(ValueError) as err:
        extract_lora(args["base"], args["tuned"], rank=2)
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
    out = tmp_path / "out" / "lora"
    (tmp_path / "out").mkdir()
    code, line = cli(
        "extract", "--base", str(args["base"]), "--tuned", str(args["tuned"]), "--rank", "2", "-o", str(out)
    )
    assert code == 2 and re.fullmatch(rf"error: {pattern}", line), line
    assert list((tmp_path / "out").iterdir()) == []


def test_extract_a_sharded_folder_with_a_missing_or_garbage_index(models: tuple[Path, Path], tmp_path: Path) -> None:
    from adapterlab.extraction import extract_lora

    base, tuned = models
    folder = tmp_path / "tuned"
    shutil.copytree(tuned, folder)
    index = folder / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}')
    missing = folder / "model-00002-of-00002.safetensors"
    with pytest.raises(FileNotFoundError) as err:
        extract_lora(base, folder, rank=2)
    assert str(err.value) == f"tuned: no such tensor file: {str(missing)!r}"
    index.write_text("{oops")
    with pytest.raises(ValueError) as err:
        extract_lora(base, folder, rank=2)
    assert str(err.value) == (
        f"tuned: {index}: not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2)"
    )
    index.write_text('{"weight_map": 5}')
    with pytest.raises(ValueError) as err:
        extract_lora(base, folder, rank=2)
    assert str(err.value) == f"tuned: {index}: key 'weight_map' must be an object of tensor name -> shard file"


# ---- hub put -----------------------------------------------------------------------------------


@parametrize_bad
def test_hub_put_library_and_cli(adapters: list[Path], bad: tuple[Path, Path, str], tmp_path: Path) -> None:
    from adapterlab.registry import AdapterRegistry

    folder, f, pattern = bad
    hub = tmp_path / "hub"
    AdapterRegistry(hub).put(adapters[0], "good")
    before = snapshot(hub)
    if f.is_symlink():  # the registry stores plain files only: a symlink is refused before it is read
        pattern = rf"{re.escape(str(f))} is a symlink; the registry stores plain files only"
    with pytest.raises(ValueError) as err:
        AdapterRegistry(hub).put(folder, "bad")
    assert re.fullmatch(rf"put: {pattern}", str(err.value)), str(err.value)
    code, line = cli("hub", "--hub", str(hub), "put", str(folder), "--name", "bad")
    assert code == 2 and re.fullmatch(rf"error: put: {pattern}", line), line
    assert snapshot(hub) == before


def test_hub_put_bundle_with_a_corrupt_file(adapters: list[Path], tmp_path: Path) -> None:
    from adapterlab.compression import compress_adapters
    from adapterlab.registry import AdapterRegistry

    root = tmp_path / "bundle"
    compress_adapters(adapters, rank=2).save(root)
    f = corrupt(root, "sigmas.safetensors", lambda d: d[:-10])
    pattern = rf"put: {message(f, CASES[0][2])}"
    hub = tmp_path / "hub"
    with pytest.raises(ValueError) as err:
        AdapterRegistry(hub).put_bundle(root, "b")
    assert re.fullmatch(pattern, str(err.value)), str(err.value)
    code, line = cli("hub", "--hub", str(hub), "put", "--bundle", str(root), "--name", "b")
    assert code == 2 and re.fullmatch(rf"error: {pattern}", line), line
    assert not hub.exists()


# ---- the real entry point ----------------------------------------------------------------------


def test_merge_of_a_truncated_adapter_exits_2_in_a_subprocess(adapters: list[Path], tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    shutil.copytree(adapters[1], folder)
    f = corrupt(folder, ST, CASES[0][1])
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: linear\nadapters: [{adapters[0]}, {folder}]\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run(
        [sys.executable, "-m", "adapterlab.cli.app", "merge", str(cfg), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    # bitsandbytes prints one line about its optional 'kernels' package at import on machines without it
    lines = [line for line in res.stderr.splitlines() if line.strip() and "kernels-community" not in line]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert re.fullmatch(rf"error: {re.escape(str(cfg))}: adapters\.1: {message(f, CASES[0][2])}", lines[0]), lines
    assert not (tmp_path / "out").exists()
