"""``AdapterRegistry``: a content-addressed adapter store over a ``hub/`` folder.

Layout (DESIGN.md §4)::

    <root>/objects/<sha256>/      adapter files + manifest.json (the manifest is written last)
    <root>/compressed/<sha256>/   shared-basis bundles + manifest.json
    <root>/refs/<name>            one line: the digest a name (or tag) points to
    <root>/bases/<digest>.json    the base fingerprints adapters were recorded against
    <root>/tmp/                   staging folders of writes in progress
    <root>/.lock                  fcntl.flock lock file of writers

Writes copy and hash every file into a staging folder inside the root, fsync it, write the
manifest last, and land the folder with one atomic ``rename`` under the writer lock, so readers
never see half an object and a killed writer leaves only a staging folder that ``gc`` removes.
Objects are immutable; names are mutable pointers. Every ``get`` / ``load`` re-hashes the files
against the manifest, and ``load`` refuses an adapter whose recorded base fingerprint does not
match the model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from adapterlab.io import _fsync_dir, fingerprint_digest, sha256_file
from adapterlab.registry.manifest import (
    MANIFEST,
    MAX_NAME_CHARS,
    build_manifest,
    check_finite,
    check_name,
    describe_base,
    manifest_checksum,
    normalize_fingerprint,
    normalize_provenance,
    object_digest,
    scan_source,
)
from adapterlab.registry.validate import check_adapter, check_bundle

__all__ = ["AdapterRegistry", "BaseMismatchError", "RefNotFoundError"]

logger = logging.getLogger(__name__)

#: Test hook: ``sleep:SECONDS`` pauses after each staged file, ``raise`` fails after the first one.
FAULT_ENV = "ADAPTERLAB_HUB_FAULT"
#: Matched with ``fullmatch`` (``$`` would accept a trailing newline).
_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]{8,64}")
_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
#: The longest ref: ``hub:`` + a name of MAX_NAME_CHARS + ``@`` + a 64-hex digest.
MAX_REF_CHARS = len("hub:") + MAX_NAME_CHARS + 1 + 64
_KIND_DIRS = {"adapter": "objects", "bundle": "compressed"}
_FP_FIELDS = {
    "architecture": "architecture",
    "model_type": "model type",
    "shapes_digest": "weight shapes",
    "quantization": "quantization",
    "mask_digest": "sparsity pattern (zero mask)",
    "format": "fingerprint format",
}


class RefNotFoundError(KeyError):
    """A ref that names no adapter (a ``KeyError`` whose ``str`` is the message)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown ref"


class BaseMismatchError(ValueError):
    """An adapter loaded on a model that is not the base it was recorded against."""


def _fault(stage: Path, step: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    if spec.startswith("sleep:"):
        time.sleep(float(spec.split(":", 1)[1]))
    elif spec == "raise" and step == 0:
        raise RuntimeError(f"{FAULT_ENV}=raise: simulated failure while staging {stage.name}")


def _copy_hashed(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to a new file ``dst`` (fsync'd) and return its (sha256, size) in one read."""
    h = hashlib.sha256()
    n = 0
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))  # never blocks on a FIFO
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"put: {src} is not a regular file (replaced while it was stored?)")
    with os.fdopen(fd, "rb") as fi, open(dst, "xb") as fo:
        while block := fi.read(1 << 20):
            h.update(block)
            fo.write(block)
            n += len(block)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest(), n


def _write_text_durable(path: Path, text: str) -> None:
    """Write a small text file atomically: tmp in the same folder, fsync, rename, fsync folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's live process
        return True
    return True


def _check_ref_text(text: str, what: str = "ref") -> None:
    """Refuse refs no name or digest can have before they reach the file system (no OSError)."""
    if len(text) > MAX_REF_CHARS:
        raise ValueError(
            f"{what} {text[:40]!r}... is {len(text)} characters long; registry refs are at most {MAX_REF_CHARS} "
            f"(hub:NAME@DIGEST with a name of at most {MAX_NAME_CHARS})"
        )
    bad = next((c for c in text if not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"{what} {text!r} contains the control character {bad!r}; registry refs are printable")


class AdapterRegistry:
    """A content-addressed store of PEFT adapter folders and shared-basis bundles.

    Args:
        root: the registry folder; default ``$ADAPTERLAB_HUB``, else ``./hub``. Folders are created
            on the first write; reading an empty or missing root lists nothing.

    Refs accepted everywhere: ``NAME`` (or ``hub:NAME``), ``NAME@DIGEST_PREFIX`` (checks the
    digest), a full sha256 digest, or a unique digest prefix of at least 8 hex digits.

    Example:
        >>> reg = AdapterRegistry("hub")
        >>> digest = reg.put("out/sentiment", "sentiment", base=model, provenance={"kind": "trained"})
        >>> peft_model = reg.load("sentiment", model)
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            root = os.environ.get("ADAPTERLAB_HUB") or "hub"
        self.root = Path(root).expanduser()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"

    # ---- layout ------------------------------------------------------------------------------

    @property
    def objects(self) -> Path:
        return self.root / "objects"

    @property
    def refs(self) -> Path:
        return self.root / "refs"

    @property
    def bases(self) -> Path:
        return self.root / "bases"

    @property
    def compressed(self) -> Path:
        return self.root / "compressed"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def _ensure(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise FileExistsError(f"registry root {str(self.root)!r} exists and is not a folder")
        for d in (self.objects, self.refs, self.bases, self.compressed, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive writer lock (``fcntl.flock`` on ``<root>/.lock``); re-entrant per thread."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        self._ensure()
        fd = os.open(str(self.root / ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _dir_of(self, digest: str) -> tuple[str, Path] | None:
        for kind, sub in _KIND_DIRS.items():
            path = self.root / sub / digest
            if path.is_dir():
                return kind, path
        return None

    def _ref_names(self) -> list[str]:
        if not self.refs.is_dir():
            return []
        return sorted(p.name for p in self.refs.iterdir() if p.is_file() and not p.name.startswith("."))

    def _read_ref(self, name: str) -> str:
        text = (self.refs / name).read_text(encoding="utf-8").strip()
        if not _DIGEST.fullmatch(text):
            raise ValueError(
                f"registry {str(self.root)!r}: ref {name!r} is corrupted (holds {text[:80]!r}, not a sha256 digest)"
            )
        return text

    def _write_ref(self, name: str, digest: str) -> None:
        _write_text_durable(self.refs / name, digest + "\n")

    def _all_digests(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for kind, sub in _KIND_DIRS.items():
            d = self.root / sub
            if d.is_dir():
                out.update({p.name: kind for p in d.iterdir() if p.is_dir() and _DIGEST.fullmatch(p.name)})
        return out

    # ---- refs --------------------------------------------------------------------------------

    def resolve(self, ref: str | os.PathLike[str]) -> str:
        """The full sha256 digest a ref points to.

        Surrounding whitespace is stripped. A ref is at most ``MAX_REF_CHARS`` (197) characters
        (``hub:`` + a name of at most 128 + ``@`` + a 64-hex digest) and holds no control characters;
        only names that can be valid ref names are looked up on disk, so no ref reaches the file
        system as an ``OSError`` (e.g. ``File name too long``).

        Raises:
            RefNotFoundError: no such name or digest (the message lists known names).
            ValueError: an ambiguous digest prefix, a ``NAME@PREFIX`` whose digest differs, a ref
                that points to a missing object, a ref longer than ``MAX_REF_CHARS`` or with a
                control character.
        """
        text = os.fspath(ref)
        if not isinstance(text, str):
            raise ValueError(f"registry ref must be a string, got {type(text).__name__}")
        text = text.strip()  # surrounding whitespace (a newline from `$(cat file)`) is not part of a ref
        _check_ref_text(text)
        if text.startswith("hub:"):
            text = text[4:]
        if not text:
            raise ValueError("empty registry ref; give a NAME, a digest or a digest prefix (>= 8 hex digits)")
        if "@" in text:
            name, _, prefix = text.partition("@")
            digest = self.resolve(name)
            if not digest.startswith(prefix.lower()):
                raise ValueError(f"ref {text!r}: {name!r} points to {digest[:12]}, not {prefix!r}")
            return digest
        if _REF_NAME.fullmatch(text) and len(text) <= MAX_NAME_CHARS and (self.refs / text).is_file():
            digest = self._read_ref(text)
            if self._dir_of(digest) is None:
                raise ValueError(
                    f"ref {text!r} points to {digest[:12]}, which is not in {str(self.root)!r} "
                    f"(removed by hand?); re-put the adapter or `adapterlab hub rm {text}`"
                )
            return digest
        low = text.lower()
        if _HEX.fullmatch(low):
            matches = sorted(d for d in self._all_digests() if d.startswith(low))
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise ValueError(
                    f"digest prefix {text!r} is ambiguous: {', '.join(m[:16] for m in matches[:5])}; give more digits"
                )
        names = self._ref_names()
        known = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "") if names else "none"
        raise RefNotFoundError(
            f"registry {str(self.root)!r} has no adapter {text!r}; known names: {known} "
            f"(or give a digest prefix of >= 8 hex digits)"
        )

    def names_of(self, digest: str) -> list[str]:
        """The names (refs and tags) that point to ``digest``."""
        out = []
        for name in self._ref_names():
            with contextlib.suppress(OSError, ValueError):
                if self._read_ref(name) == digest:
                    out.append(name)
        return out

    def tag(self, ref: str, name: str, *, force: bool = False) -> str:
        """Point ``name`` at the object ``ref`` resolves to; returns the digest.

        Raises:
            FileExistsError: ``name`` already points elsewhere and ``force`` is False.
        """
        check_name(name, "tag")
        self.resolve(ref)  # a bad ref fails here, before the lock creates the registry folders
        with self._locked():
            digest = self.resolve(ref)
            path = self.refs / name
            if path.is_file() and not force:
                current = path.read_text(encoding="utf-8").strip()
                if current != digest:
                    raise FileExistsError(
                        f"tag {name!r} already points to {current[:12]}; pass force=True (--force) to move it to {digest[:12]}"
                    )
            self._write_ref(name, digest)
        logger.info("tagged %s -> %s", name, digest[:12])
        return digest

    def rm(self, name: str) -> str:
        """Remove the name (or tag) ``name``; the object stays until :meth:`gc`. Returns its digest."""
        if not isinstance(name, str):
            raise ValueError(f"rm: the name must be a string, got {type(name).__name__}")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(
                f"name {name[:40]!r}... is {len(name)} characters long; registry names are at most {MAX_NAME_CHARS}"
            )

        def missing() -> RefNotFoundError:
            names = self._ref_names()
            return RefNotFoundError(
                f"registry {str(self.root)!r} has no name {name!r} to remove; names: {', '.join(names[:10]) or 'none'}"
            )

        # only names listed under refs/ touch the file system (a name stored before names were
        # checked with fullmatch, e.g. one ending in a newline, can still be removed)
        if name not in self._ref_names():
            raise missing()  # before the lock, which would create the registry folders
        with self._locked():
            path = self.refs / name
            if name not in self._ref_names():
                raise missing()
            digest = path.read_text(encoding="utf-8").strip()
            path.unlink()
            _fsync_dir(self.refs)
        logger.info("removed name %s (was %s)", name, digest[:12])
        return digest

    # ---- writing -----------------------------------------------------------------------------

    def put(
        self,
        src: Any,
        name: str | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
        base: nn.Module | Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        adapter_name: str | None = None,
    ) -> str:
        """Store a PEFT adapter folder (or a peft model's adapter) and point ``name`` and ``tags`` at it.

        Args:
            src: a PEFT adapter folder, or a ``PeftModel`` (its ``adapter_name`` or active adapter is saved).
            name: the ref to create or move; default the folder name (the adapter name for a model);
                ``""`` stores the object without a name (``gc`` will collect it).
            provenance: ``{"kind": trained|extracted|merged|compressed|imported, "parents": [...],
                "recipe": ..., ...}``; the kind is inferred from report files when not given.
            base: the base model or its ``adapterlab.io.base_fingerprint`` dict, recorded so that
                loads can refuse other bases; for a ``PeftModel`` src it defaults to the model's base.
            tags: more names for the same object.

        Returns:
            The object's sha256 digest. Putting identical files again gives the same digest and
            keeps the first manifest.

        Raises:
            ValueError: bad names (see :func:`~adapterlab.registry.manifest.check_name`), pickle files,
                symlinks or special files (FIFO, socket, device), an adapter peft could not load
                (see :mod:`adapterlab.registry.validate`: config fields, missing tensors, ranks, NaN/Inf,
                shapes of another base than ``base`` when ``base`` is a model), a corrupt safetensors
                file, unknown provenance kind. Nothing is written under the root in any of these cases.
            FileNotFoundError: not an adapter folder.
        """
        if hasattr(src, "peft_config") and hasattr(src, "save_pretrained"):
            adapter = adapter_name or getattr(src, "active_adapter", None) or "default"
            if isinstance(adapter, (list, tuple)):
                adapter = adapter[0]
            if adapter not in src.peft_config:
                raise ValueError(f"put: the peft model has no adapter {adapter!r}; it has {sorted(src.peft_config)}")
            if base is None:
                base = src
            self._ensure()
            save_dir = Path(tempfile.mkdtemp(prefix=f"save-{os.getpid()}-", dir=self.tmp))
            try:
                src.save_pretrained(str(save_dir), selected_adapters=[adapter], safe_serialization=True)
                folder = save_dir / adapter if (save_dir / adapter / "adapter_config.json").is_file() else save_dir
                return self._put_folder(folder, adapter if name is None else name, provenance, base, tags, "adapter")
            finally:
                shutil.rmtree(save_dir, ignore_errors=True)
        if not isinstance(src, (str, os.PathLike)):
            raise ValueError(f"put: src must be a PEFT adapter folder or a peft model, got {type(src).__name__}")
        folder = Path(src).expanduser()
        return self._put_folder(
            folder, folder.resolve().name if name is None else name, provenance, base, tags, "adapter"
        )

    def put_bundle(
        self,
        bundle_dir: str | os.PathLike[str],
        name: str | None = None,
        *,
        provenance: Mapping[str, Any] | None = None,
        base: nn.Module | Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
    ) -> str:
        """Store a shared-basis bundle folder (``SharedBasisBundle.save``) under ``compressed/``; returns its digest."""
        folder = Path(bundle_dir).expanduser()
        prov = dict(provenance or {})
        prov.setdefault("kind", "compressed")
        return self._put_folder(folder, folder.resolve().name if name is None else name, prov, base, tags, "bundle")

    def _put_folder(
        self,
        src: Path,
        name: str | None,
        provenance: Mapping[str, Any] | None,
        base: Any,
        tags: Iterable[str],
        kind: str,
    ) -> str:
        names = ([check_name(name)] if name else []) + [check_name(t, "tag") for t in tags]
        files = scan_source(src, kind)
        if kind == "adapter":  # before anything is written: refuse what peft could not load
            check_adapter(src, base if isinstance(base, nn.Module) else None)
        else:
            check_bundle(src)
        fingerprint = normalize_fingerprint(base)
        prov = normalize_provenance(provenance, [f.name for f in files])
        self._ensure()
        stage = Path(tempfile.mkdtemp(prefix=f"put-{os.getpid()}-", dir=self.tmp))
        try:
            records: dict[str, dict[str, Any]] = {}
            for step, f in enumerate(files):
                sha, size = _copy_hashed(f, stage / f.name)
                records[f.name] = {"sha256": sha, "bytes": size}
                _fault(stage, step)
            tensor_info = {f.name: check_finite(stage / f.name, str(src)) for f in files if f.suffix == ".safetensors"}
            digest = object_digest(records)
            manifest = build_manifest(digest, kind, name or None, records, stage, tensor_info, prov, fingerprint)
            _write_text_durable(stage / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")  # last
            for f in stage.iterdir():
                f.chmod(0o444)  # objects are immutable: read-only files
            _fsync_dir(stage)
            with self._locked():
                self._commit(stage, digest, kind)
                if fingerprint is not None:
                    self._record_base(fingerprint)
                for n in names:
                    self._write_ref(n, digest)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        logger.info("put %s %s -> %s", kind, src, digest[:12] + (f" as {', '.join(names)}" if names else ""))
        return digest

    def _commit(self, stage: Path, digest: str, kind: str) -> None:
        """Land a staged object by rename (caller holds the lock); keep an existing healthy copy."""
        target = self.root / _KIND_DIRS[kind] / digest
        if target.is_dir():
            problems = self._check_object(target, digest, kind)
            if not problems:
                logger.info("%s %s is already stored; keeping its manifest", kind, digest[:12])
                return
            logger.warning("replacing damaged %s %s: %s", kind, digest[:12], problems[0])
            trash = Path(tempfile.mkdtemp(prefix=f"trash-{os.getpid()}-", dir=self.tmp))
            os.replace(target, trash / digest)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(stage, target)
        except OSError as exc:  # another writer without our lock (e.g. a different root path spelling)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.is_dir():
                return
            raise
        _fsync_dir(target.parent)

    def _record_base(self, fingerprint: Mapping[str, Any]) -> None:
        path = self.bases / f"{fingerprint_digest(fingerprint)}.json"
        if not path.is_file():
            _write_text_durable(path, json.dumps(dict(fingerprint), indent=1, sort_keys=True) + "\n")

    # ---- reading -----------------------------------------------------------------------------

    def _check_object(self, path: Path, digest: str, kind: str) -> list[str]:
        """Problems of one stored object: manifest, checksum, file set, sizes and sha256s, digest."""
        where = f"{_KIND_DIRS[kind]}/{digest[:12]}"
        mpath = path / MANIFEST
        if not mpath.is_file():
            return [f"{where}: no {MANIFEST} (incomplete object)"]
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return [f"{where}: {MANIFEST} is not valid JSON ({exc})"]
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return [f"{where}: {MANIFEST} has no files table"]
        problems: list[str] = []
        if manifest.get("checksum") != manifest_checksum(manifest):
            problems.append(f"{where}: {MANIFEST} was modified (checksum mismatch)")
        if manifest.get("digest") != digest:
            problems.append(f"{where}: {MANIFEST} records digest {str(manifest.get('digest'))[:12]}")
        if manifest.get("kind") != kind:
            problems.append(f"{where}: {MANIFEST} says kind {manifest.get('kind')!r}, stored as {kind!r}")
        files = manifest["files"]
        try:
            if object_digest(files) != digest:
                problems.append(f"{where}: the files table does not hash to the object's digest")
        except (KeyError, TypeError, ValueError):
            problems.append(f"{where}: malformed files table")
            return problems
        on_disk = {p.name for p in path.iterdir() if p.name != MANIFEST}
        for extra in sorted(on_disk - set(files)):
            problems.append(f"{where}: unexpected file {extra!r}")
        for fname, rec in sorted(files.items()):
            fpath = path / fname
            if not fpath.is_file():
                problems.append(f"{where}: missing file {fname!r}")
                continue
            size = fpath.stat().st_size
            if size != int(rec["bytes"]):
                problems.append(f"{where}: {fname!r} has {size} bytes, manifest says {rec['bytes']} (truncated?)")
                continue
            sha = sha256_file(fpath)
            if sha != rec["sha256"]:
                problems.append(f"{where}: {fname!r} sha256 mismatch (stored {rec['sha256'][:12]}, now {sha[:12]})")
        return problems

    def _verified(self, ref: str, kind: str) -> tuple[str, Path]:
        digest = self.resolve(ref)
        found = self._dir_of(digest)
        assert found is not None  # resolve checks existence
        have, path = found
        if have != kind:
            other = "get_bundle / `hub get --bundle`" if have == "bundle" else "get"
            raise ValueError(
                f"ref {ref!r} is a {'shared-basis bundle' if have == 'bundle' else 'adapter'}; use {other}"
            )
        problems = self._check_object(path, digest, kind)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(
                f"ref {ref!r} ({digest[:12]}) failed verification: {problems[0]}{more}; re-put the adapter to repair it"
            )
        return digest, path

    def get(self, ref: str | os.PathLike[str]) -> Path:
        """The verified object folder of an adapter (every file re-hashed against the manifest).

        The folder is a PEFT adapter directory (plus ``manifest.json``); treat it as read-only.
        """
        return self._verified(os.fspath(ref), "adapter")[1]

    def get_bundle(self, ref: str | os.PathLike[str]) -> Path:
        """The verified folder of a shared-basis bundle (``SharedBasisBundle.load`` reads it)."""
        return self._verified(os.fspath(ref), "bundle")[1]

    def _manifest(self, digest: str) -> dict[str, Any]:
        found = self._dir_of(digest)
        if found is None:
            raise RefNotFoundError(f"registry {str(self.root)!r} has no object {digest[:12]}")
        path = found[1] / MANIFEST
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(
                f"{_KIND_DIRS[found[0]]}/{digest[:12]}: unreadable {MANIFEST} ({exc}); run verify"
            ) from None

    def show(self, ref: str | os.PathLike[str]) -> dict[str, Any]:
        """The manifest of ``ref`` plus ``names`` (refs pointing to it) and ``path``."""
        digest = self.resolve(ref)
        manifest = self._manifest(digest)
        found = self._dir_of(digest)
        manifest["names"] = self.names_of(digest)
        manifest["path"] = str(found[1]) if found else None
        return manifest

    def ls(self, *, all: bool = False) -> list[dict[str, Any]]:  # noqa: A002 - the CLI flag's name
        """One row per name: name, digest, kind, method, rank, bytes, base, provenance, created.

        With ``all=True`` objects without a name are listed too (``name`` None).
        """
        rows: list[dict[str, Any]] = []
        named: set[str] = set()
        entries: list[tuple[str | None, str]] = []
        for name in self._ref_names():
            try:
                digest = self._read_ref(name)
            except (OSError, ValueError) as exc:
                rows.append({"name": name, "digest": None, "problem": str(exc)})
                continue
            entries.append((name, digest))
            named.add(digest)
        if all:
            entries += [(None, d) for d in sorted(self._all_digests()) if d not in named]
        for name, digest in entries:
            row: dict[str, Any] = {"name": name, "digest": digest}
            try:
                m = self._manifest(digest)
            except (KeyError, ValueError) as exc:
                row["problem"] = str(exc)
                rows.append(row)
                continue
            base = m.get("base") or {}
            row.update(
                {
                    "kind": m.get("kind"),
                    "method": m.get("method"),
                    "rank": m.get("rank"),
                    "bytes": m.get("bytes"),
                    "dtype": m.get("dtype"),
                    "base": base.get("model_id") or base.get("architecture") or m.get("base_model_name_or_path"),
                    "provenance": (m.get("provenance") or {}).get("kind"),
                    "created": m.get("created"),
                }
            )
            rows.append(row)
        return rows

    def verify(self, ref: str | os.PathLike[str] | None = None) -> list[str]:
        """Re-hash objects against their manifests; returns one line per problem (empty = healthy).

        Without ``ref``: every object and bundle, and every name (dangling or corrupted refs).
        """
        if ref is not None:
            digest = self.resolve(ref)
            kind, path = self._dir_of(digest)  # type: ignore[misc]
            return self._check_object(path, digest, kind)
        problems: list[str] = []
        for sub in _KIND_DIRS.values():
            d = self.root / sub
            if d.is_dir():
                problems += [
                    f"{sub}/{p.name}: not a sha256-named object folder"
                    for p in sorted(d.iterdir())
                    if not _DIGEST.fullmatch(p.name)
                ]
        for digest, kind in sorted(self._all_digests().items()):
            problems += self._check_object(self.root / _KIND_DIRS[kind] / digest, digest, kind)
        for name in self._ref_names():
            try:
                digest = self._read_ref(name)
            except (OSError, ValueError) as exc:
                problems.append(f"refs/{name}: {exc}")
                continue
            if self._dir_of(digest) is None:
                problems.append(f"refs/{name}: points to {digest[:12]}, which is not stored")
        return problems

    def gc(self, *, dry_run: bool = False) -> list[str]:
        """Remove objects and bundles no name points to, stale staging folders and unused base records.

        Returns:
            The removed (or, with ``dry_run``, removable) digests, sorted.
        """
        if not self.root.is_dir():
            return []
        with self._locked():
            live: set[str] = set()
            for name in self._ref_names():
                with contextlib.suppress(OSError, ValueError):
                    live.add(self._read_ref(name))
            dead = sorted(d for d in self._all_digests() if d not in live)
            if dry_run:
                return dead
            for digest in dead:
                kind_path = self._dir_of(digest)
                if kind_path is None:
                    continue
                trash = Path(tempfile.mkdtemp(prefix=f"trash-{os.getpid()}-", dir=self.tmp))
                os.replace(kind_path[1], trash / digest)  # disappears atomically, then is deleted
                shutil.rmtree(trash, ignore_errors=True)
            for stage in self.tmp.iterdir():
                parts = stage.name.split("-")
                pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
                if pid == os.getpid() or (pid is not None and _pid_alive(pid)):
                    continue  # a write in progress
                if stage.is_dir():
                    shutil.rmtree(stage, ignore_errors=True)
                else:
                    stage.unlink(missing_ok=True)
            used = set()
            for digest in self._all_digests():
                with contextlib.suppress(KeyError, ValueError):
                    if bd := self._manifest(digest).get("base_digest"):
                        used.add(bd)
            for rec in self.bases.glob("*.json"):
                if rec.stem not in used:
                    rec.unlink(missing_ok=True)
        if dead:
            logger.info("gc removed %d object(s)", len(dead))
        return dead

    # ---- loading onto a model ------------------------------------------------------------------

    def check_base(
        self,
        ref: str | os.PathLike[str],
        model: nn.Module | None = None,
        *,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise :class:`BaseMismatchError` if ``ref``'s recorded base is not ``model`` (or ``fingerprint``).

        Adapters put without a base are accepted (there is nothing to compare).
        """
        digest = self.resolve(ref)
        want = self._manifest(digest).get("base")
        if not want:
            logger.info("%s has no recorded base; skipping the base check", ref)
            return
        if fingerprint is None:
            if model is None:
                raise ValueError("check_base: give a model or its fingerprint")
            from adapterlab.io import base_fingerprint

            fingerprint = base_fingerprint(model)
        if fingerprint_digest(want) == fingerprint_digest(fingerprint):
            return
        diff = [label for key, label in _FP_FIELDS.items() if want.get(key) != fingerprint.get(key)]
        raise BaseMismatchError(
            f"adapter {os.fspath(ref)!r} ({digest[:12]}) was made for base {describe_base(want)}, but the model is "
            f"{describe_base(fingerprint)}; they differ in {', '.join(diff) or 'fingerprint'}. "
            f"Load it on the base it wants"
        )

    def load(
        self,
        ref: str | os.PathLike[str],
        model: nn.Module,
        adapter_name: str | None = None,
        *,
        is_trainable: bool = False,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> Any:
        """Verify ``ref`` (hashes and base) and attach it to ``model``.

        Args:
            ref: a registry ref.
            model: a base model (returns a new ``PeftModel``) or a ``PeftModel`` (the adapter is added
                to it under ``adapter_name`` and the same model is returned).
            adapter_name: default ``"default"`` for a base model, the ref's name for a ``PeftModel``.
            fingerprint: the model's precomputed ``adapterlab.io.base_fingerprint`` (saves recomputing
                it when many adapters are loaded on one base); must describe ``model``.

        Raises:
            BaseMismatchError: the adapter was recorded against another base (names the wanted base).
            ValueError: a file fails its hash, or the adapter name is taken.
        """
        text = os.fspath(ref)
        _, folder = self._verified(text, "adapter")
        self.check_base(text, model, fingerprint=fingerprint)
        if hasattr(model, "peft_config") and hasattr(model, "load_adapter"):
            name = adapter_name or re.sub(r"[^A-Za-z0-9_]", "_", text.removeprefix("hub:").split("@")[0])
            if name in model.peft_config:
                raise ValueError(f"load: the model already has an adapter {name!r}; pass another adapter_name")
            model.load_adapter(str(folder), adapter_name=name, is_trainable=is_trainable)
            return model
        from peft import PeftModel

        return PeftModel.from_pretrained(
            model, str(folder), adapter_name=adapter_name or "default", is_trainable=is_trainable
        )
