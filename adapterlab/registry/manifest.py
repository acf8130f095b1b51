"""Registry manifests: object digests, file checks and the per-adapter ``manifest.json``.

An object's digest is content-addressed over its files (``manifest.json`` excluded)::

    sha256("adapterlab-object-v1\\n" + "".join(f"{name}\\0{sha256(file)}\\0{size}\\n" for name in sorted(files)))

so the same adapter files give the same digest whoever puts them and whatever provenance they
record. The manifest carries a ``checksum`` (sha256 of its own canonical JSON without that field),
so an edited manifest fails verification like an edited weight file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from adapterlab.io import (
    DIGEST_KEYS,
    PICKLE_SUFFIXES,
    check_safetensors,
    file_kind,
    fingerprint_digest,
    open_tensors,
    read_json,
)

__all__ = [
    "build_manifest",
    "describe_base",
    "MANIFEST",
    "MANIFEST_FORMAT",
    "MAX_NAME_CHARS",
    "PROVENANCE_KINDS",
    "check_finite",
    "check_name",
    "manifest_checksum",
    "normalize_fingerprint",
    "normalize_provenance",
    "object_digest",
    "scan_source",
]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
#: How an adapter came to be (``provenance["kind"]``).
PROVENANCE_KINDS = ("trained", "extracted", "merged", "compressed", "imported")
#: Files that mark a folder as an adapter (``adapter``) or a shared-basis bundle (``bundle``).
KIND_FILES = {"adapter": ("adapter_config.json", "adapter_model.safetensors"), "bundle": ("compressed_config.json",)}

#: The longest registry name (a ref or tag file name under ``refs/``).
MAX_NAME_CHARS = 128
#: Matched with ``fullmatch`` (``$`` would accept a trailing newline).
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME_CHARS - 1}}}")
_HEX = re.compile(r"[0-9a-f]+")


def check_name(name: str, what: str = "name") -> str:
    """A ref name: 1-128 of ``[A-Za-z0-9._-]``, starting alphanumeric, not a 64-hex digest.

    Raises:
        ValueError: one line naming the value and what is allowed.
    """
    if isinstance(name, str) and len(name) > MAX_NAME_CHARS:
        raise ValueError(
            f"{what} {name[:40]!r}... is {len(name)} characters long; registry names are at most {MAX_NAME_CHARS}"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} is not a valid registry name: use 1-128 letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit (no '/', '@', ':' or spaces)"
        )
    if len(name) == 64 and _HEX.fullmatch(name):
        raise ValueError(f"{what} {name!r} looks like a sha256 digest; pick a name that is not 64 hex digits")
    return name


def object_digest(files: Mapping[str, Mapping[str, Any]]) -> str:
    """The content address of an object from ``{file name: {"sha256", "bytes"}}`` (manifest excluded)."""
    h = hashlib.sha256(b"adapterlab-object-v1\n")
    for name in sorted(files):
        if name == MANIFEST:
            continue
        h.update(f"{name}\0{files[name]['sha256']}\0{int(files[name]['bytes'])}\n".encode())
    return h.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def manifest_checksum(manifest: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its ``checksum`` field."""
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "checksum"})).hexdigest()


def scan_source(src: Path, kind: str = "adapter") -> list[Path]:
    """The files of an adapter (or bundle) folder to store, after refusing what must not be stored.

    Top-level regular files only; hidden files and an existing ``manifest.json`` are skipped.
    Every entry is ``lstat``-ed before anything is opened, so a FIFO, socket or device file is
    refused instead of blocking the put (a FIFO's ``open`` waits for a writer forever).

    Raises:
        FileNotFoundError: no such folder, or a required file is missing.
        ValueError: a pickle file, a ``.safetensors`` file that is not safetensors, a sub-folder,
            a symlink, a special file (FIFO, socket, device), or an unparsable JSON config.
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"put: {str(src)!r} is not a folder")
    files: list[Path] = []
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or entry.name == MANIFEST:
            continue
        mode = entry.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise ValueError(f"put: {entry} is a symlink; the registry stores plain files only")
        if stat.S_ISDIR(mode):
            raise ValueError(
                f"put: {str(src)!r} has a sub-folder {entry.name!r}; put one adapter folder at a time "
                f"(a peft save with several adapters has one sub-folder per adapter)"
            )
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"put: {entry} is a {file_kind(mode)}, not a regular file; the registry stores plain files only "
                f"(remove it from the folder)"
            )
        if entry.suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(
                f"put: refusing {entry.name!r} in {str(src)!r}: pickle files can run code and the registry "
                f"stores safetensors only; re-save with safe_serialization=True and remove the file"
            )
        try:  # the project's readers: one line naming the file
            if entry.suffix == ".safetensors":
                check_safetensors(entry)
            if entry.suffix == ".json":
                read_json(entry)
        except ValueError as exc:
            raise ValueError(f"put: {exc}") from None
        files.append(entry)
    names = {f.name for f in files}
    missing = [n for n in KIND_FILES[kind] if n not in names]
    if missing:
        if kind == "adapter" and "adapter_model.bin" in names:  # pragma: no cover - refused above
            raise ValueError(f"put: {str(src)!r} holds adapter_model.bin (pickle); adapterlab stores safetensors only")
        what = "a PEFT adapter folder" if kind == "adapter" else "a shared-basis bundle folder"
        raise FileNotFoundError(f"put: {str(src)!r} is not {what}: missing {', '.join(missing)}")
    return files


def check_finite(path: Path, where: str) -> dict[str, Any]:
    """Refuse NaN/Inf in a safetensors file; return ``{"dtypes", "n_params", "keys"}`` for the manifest."""
    dtypes: set[str] = set()
    n_params = 0
    keys: list[str] = []
    try:
        fh = open_tensors(path)
    except ValueError as exc:
        raise ValueError(f"put: {exc}") from None
    with fh:
        for key in fh.keys():  # a loop over tensors, not over their entries
            t = fh.get(key)
            keys.append(key)
            dtypes.add(str(t.dtype).removeprefix("torch."))
            n_params += t.numel()
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(
                    f"put: {where}: tensor {key!r} in {path.name!r} has {bad} NaN/Inf value(s); "
                    f"the registry refuses non-finite weights"
                )
    return {"dtypes": sorted(dtypes), "n_params": n_params, "keys": keys}


def normalize_provenance(provenance: Mapping[str, Any] | None, files: Iterable[str]) -> dict[str, Any]:
    """``{"kind", "parents", "recipe", ...}``; kind inferred from report files when not given.

    Raises:
        ValueError: unknown kind, or parents not a list of strings.
    """
    prov = dict(provenance or {})
    names = set(files)
    if "kind" not in prov:
        if "merge_report.json" in names:
            prov["kind"] = "merged"
        elif "phlora_report.json" in names:
            prov["kind"] = "extracted"
        elif "train_report.json" in names:
            prov["kind"] = "trained"
        elif "compressed_config.json" in names:
            prov["kind"] = "compressed"
        else:
            prov["kind"] = "imported"
    if prov["kind"] not in PROVENANCE_KINDS:
        raise ValueError(f"provenance.kind {prov['kind']!r} is not one of {', '.join(PROVENANCE_KINDS)}")
    parents = prov.get("parents", [])
    if isinstance(parents, (str, os.PathLike)):
        parents = [parents]
    if not isinstance(parents, (list, tuple)):
        raise ValueError(f"provenance.parents must be a list of strings, got {type(parents).__name__}")
    prov["parents"] = [os.fspath(p) if isinstance(p, os.PathLike) else p for p in parents]
    prov.setdefault("recipe", None)
    try:
        json.dumps(prov, default=None)
    except TypeError as exc:
        raise ValueError(f"provenance must be JSON-serialisable: {exc}") from None
    return prov


def normalize_fingerprint(base: Any) -> dict[str, Any] | None:
    """A base fingerprint dict from ``None``, a model (``adapterlab.io.base_fingerprint``) or a dict.

    Raises:
        ValueError: a dict without the identifying keys.
    """
    if base is None:
        return None
    if isinstance(base, Mapping):
        missing = [k for k in DIGEST_KEYS if k not in base]
        if missing:
            raise ValueError(
                f"base: the fingerprint dict lacks {missing}; pass a model or adapterlab.io.base_fingerprint(model)"
            )
        return dict(base)
    if isinstance(base, torch.nn.Module):
        from adapterlab.io import base_fingerprint

        return base_fingerprint(base)
    raise ValueError(f"base: expected a model, a fingerprint dict or None, got {type(base).__name__}")


def _scaling(alpha: Any, r: Any, rslora: bool) -> float | None:
    try:
        a, k = float(alpha), int(r)
    except (TypeError, ValueError):
        return None
    if k <= 0:
        return None
    return a / math.sqrt(k) if rslora else a / k


def _adapter_fields(config: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """Method, peft type/version, rank, scaling and target modules from an adapter_config.json."""
    peft_type = str(config.get("peft_type") or "UNKNOWN")
    rank = config.get("r", config.get("rank"))
    alpha = config.get("lora_alpha", config.get("alpha"))
    rslora = bool(config.get("use_rslora", False))
    modules = sorted({_module_of(k) for k in keys} - {None})  # type: ignore[arg-type]
    targets = config.get("target_modules")
    if isinstance(targets, (set, tuple, list)):  # peft saves a set as a list in arbitrary order
        targets = sorted(str(t) for t in targets)
    try:
        from importlib.metadata import version

        peft_now = version("peft")
    except Exception:  # noqa: BLE001 - recorded as None without peft
        peft_now = None
    return {
        "method": peft_type.lower(),
        "peft_type": peft_type,
        "peft_version": config.get("peft_version") or peft_now,
        "rank": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "scaling": _scaling(alpha, rank, rslora),
        "rank_pattern": config.get("rank_pattern") or {},
        "alpha_pattern": config.get("alpha_pattern") or {},
        "target_modules": targets,
        "modules": modules,
        "task_type": config.get("task_type"),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
    }


_STRIP = re.compile(r"^base_model\.model\.")
_TAIL = re.compile(r"\.(lora_[A-Za-z_]+|[a-z]+_(?:A|B|E|values|indices|mask|weight|bias))(\.[^.]+)?(\.weight)?$")


def _module_of(key: str) -> str | None:
    """The base-model module path of a stored adapter tensor (best effort, for display)."""
    k = _STRIP.sub("", key)
    m = _TAIL.search(k)
    if m is not None:
        return k[: m.start()]
    return k.rsplit(".", 1)[0] if "." in k else None


def build_manifest(
    digest: str,
    kind: str,
    name: str | None,
    files: Mapping[str, Mapping[str, Any]],
    stage: Path,
    tensor_info: Mapping[str, Mapping[str, Any]],
    provenance: Mapping[str, Any],
    fingerprint: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of a staged object (everything recorded about it), with its checksum."""
    from adapterlab._version import __version__

    dtypes = sorted({d for info in tensor_info.values() for d in info["dtypes"]})
    keys = [k for info in tensor_info.values() for k in info["keys"]]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "digest": digest,
        "name": name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "adapterlab_version": __version__,
    }
    if kind == "adapter":
        config = json.loads((stage / "adapter_config.json").read_text(encoding="utf-8"))
        manifest.update(_adapter_fields(config, keys))
    else:
        config = json.loads((stage / "compressed_config.json").read_text(encoding="utf-8"))
        manifest.update(
            {
                "method": str(config.get("type", "shared_basis")),
                "mode": config.get("mode"),
                "rank": config.get("rank_c", config.get("rank")),
                "adapters": list(config.get("names", [])),
                "modules": list(config.get("module_names", [])),
                "base_model_name_or_path": config.get("base_model_name_or_path"),
            }
        )
    manifest.update(
        {
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "n_params": sum(int(info["n_params"]) for info in tensor_info.values()),
            "bytes": sum(int(f["bytes"]) for f in files.values()),
            "files": {n: dict(files[n]) for n in sorted(files)},
            "base": dict(fingerprint) if fingerprint is not None else None,
            "base_digest": fingerprint_digest(fingerprint) if fingerprint is not None else None,
            "provenance": dict(provenance),
        }
    )
    manifest["checksum"] = manifest_checksum(manifest)
    return manifest


def describe_base(fp: Mapping[str, Any] | None) -> str:
    """One line naming a base fingerprint for error messages."""
    if not fp:
        return "an unrecorded base"
    parts = [f"{fp.get('model_id') or fp.get('architecture')!r}"]
    parts.append(f"{fp.get('architecture')}, {fp.get('n_params', 0):,} weights")
    parts.append(f"quantization {fp.get('quantization')}")
    parts.append(f"sparsity {float(fp.get('sparsity') or 0.0):.2%}")
    if fp.get("revision"):
        parts.append(f"revision {fp['revision']}")
    return f"{parts[0]} ({'; '.join(parts[1:])})"
