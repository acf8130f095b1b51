"""Safetensors-only tensor I/O, file hashes and base-model fingerprints.

adapterlab never writes pickle and refuses to read it unless the caller passes
``allow_pickle=True`` (and then only with ``torch.load(weights_only=True)``). Writes are atomic:
a temporary file in the target folder, fsync, rename, fsync of the folder, and refuse NaN/Inf
(``allow_nonfinite=True`` to write them on purpose).

Every tensor file adapterlab reads goes through one validated door: :func:`open_tensors` (lazy,
tensor by tensor) or :func:`load_tensors` (whole file). Before safetensors parses a byte the file
must be a regular file (a FIFO, device or folder — also behind a symlink — is refused without being
opened), not empty, not a pickle, and framed like safetensors; then safetensors' own header checks
(JSON, dtypes, shapes, offsets inside the file and not overlapping) run at open. Every failure is one
``ValueError`` line naming the file (and a symlink's target). JSON files go through :func:`read_json`.

A *base fingerprint* identifies what an adapter was trained against: the architecture, every
weight's (logical) shape, the quantization, and the zero pattern of the decoder linears. It does
**not** identify exact weight values: two bases with the same shapes, quantization and zero
masks (e.g. two fine-tunes of one model, or one model before and after a dense update of its
nonzero weights) have the same digest. Model id, revision, dtype and the sparsity ratio are recorded
in the fingerprint for people to read but are not part of :func:`fingerprint_digest`, so that
the same base loaded from another folder or in another float dtype still matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

PathLike = str | os.PathLike[str]

#: Suffixes of pickle-based checkpoint formats.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
#: Fingerprint format version (bump when the fields or their computation change).
FINGERPRINT_FORMAT = 1
#: Fields of a fingerprint that :func:`fingerprint_digest` hashes by default.
DIGEST_KEYS = ("format", "architecture", "model_type", "shapes_digest", "quantization", "mask_digest")


# ---------------------------------------------------------------------------------------------
# files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; copies for tensors that share storage (safetensors refuses those)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise ValueError(f"tensor names must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"value of {key!r} is a {type(value).__name__}, not a torch.Tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = t
    return out


def save_tensors(
    path: PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    allow_nonfinite: bool = False,
) -> Path:
    """Write ``tensors`` to a ``.safetensors`` file atomically (tmp + fsync + rename).

    Args:
        path: the target file; its folder is created if needed.
        tensors: name -> tensor (moved to CPU and made contiguous; shared storage is copied).
        metadata: string -> string header metadata.
        allow_nonfinite: write floating tensors holding NaN or Inf (refused by default: every output
            adapterlab writes is checked finite here, before anything reaches the disk).

    Returns:
        The written path. On any failure the target is left as it was and no temporary file remains.

    Raises:
        ValueError: a non-``.safetensors`` name, bad metadata or values, or (unless ``allow_nonfinite``)
            a tensor holding NaN or Inf — one line naming the file and the tensor; nothing is written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name!r}: adapterlab writes safetensors only; use a '.safetensors' file name")
    meta = None
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise ValueError(f"safetensors metadata must map str to str; bad entries: {bad}")
        meta = dict(metadata)
    data = _prepare(tensors)
    if not allow_nonfinite:
        for key, t in data.items():
            check_finite(
                t,
                f"refusing to write {path.name!r}: tensor {key!r}",
                " (an fp32 overflow, or NaN/Inf in the inputs); nothing was written",
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(data, str(tmp), metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


# ---------------------------------------------------------------------------------------------
# the one validated reader: every tensor file adapterlab reads is checked here first

#: The largest safetensors header the reader accepts (the safetensors library's own limit).
MAX_HEADER_BYTES = 100_000_000
_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def describe_path(path: PathLike) -> str:
    """``'path'`` for messages, with ``(a symlink to 'target')`` when it is one."""
    p = Path(path)
    text = repr(str(p))
    if p.is_symlink():
        text += f" (a symlink to {os.path.realpath(p)!r})"
    return text


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages (``st_mode`` of ``os.lstat``)."""
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device file"
    return "special file"


def _is_pickle(head: bytes) -> bool:
    """torch.save's zip archive (``PK\\x03\\x04``) or a raw pickle stream (protocol 2-5)."""
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _sniff(path: Path) -> tuple[str, str]:
    """``(kind, reason)`` of a regular file: ``safetensors`` (header framing is plausible), ``pickle``,
    or ``bad`` with the reason. Raises a one-line error for a missing, unreadable or special file."""
    desc = describe_path(path)
    try:
        st = os.stat(path)  # follows symlinks: what is read is the target
    except FileNotFoundError:
        raise FileNotFoundError(f"no such tensor file: {desc}") from None
    except OSError as exc:
        raise ValueError(f"{desc} cannot be read ({exc.strerror or exc}); check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(
            f"{desc} is a {file_kind(st.st_mode)}, not a regular file; a tensor file must be a plain .safetensors file"
        )
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError as exc:
        raise ValueError(f"{desc} cannot be read ({exc.strerror or exc}); check its permissions") from None
    size = st.st_size
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) == 9 and 0 < n <= size - 8 and head[8:9] == b"{":
        if n > MAX_HEADER_BYTES:
            return "bad", f"its header of {n} bytes exceeds the {MAX_HEADER_BYTES}-byte limit"
        return "safetensors", ""
    if size == 0:
        return "bad", "the file is empty"
    if _is_pickle(head):
        return "pickle", ""
    if len(head) < 9:
        return "bad", f"{size} bytes is too short for a safetensors header"
    if n == 0 or n > size - 8:
        return "bad", (
            f"its first 8 bytes give a header of {n} bytes but the file has {size}: truncated, or not safetensors"
        )
    return "bad", "its header is not a JSON object"


def _bad_file(path: Path, reason: str) -> ValueError:
    return ValueError(f"{describe_path(path)} is not a valid safetensors file ({reason}); re-save or remove it")


def _pickle_file(path: Path, hint: str = "") -> ValueError:
    return ValueError(
        f"{describe_path(path)} is not a valid safetensors file (it is a pickle / torch.save file, which adapterlab "
        f"does not read: pickle can run code); re-save it as safetensors{hint}"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class TensorFile:
    """A validated safetensors file read lazily: names, shapes and dtypes from the header, tensors one
    at a time (``safe_open`` underneath). Use :func:`open_tensors` to make one.

    Every problem is a one-line ``ValueError`` naming the file (and the tensor): not a regular file,
    empty, a pickle, truncated, a header that is not valid JSON, offsets outside the file or
    overlapping, an unreadable tensor. A missing file is a ``FileNotFoundError``.
    """

    def __init__(self, path: PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        kind, reason = _sniff(self.path)
        if kind == "pickle":
            raise _pickle_file(self.path)
        if kind != "safetensors":
            raise _bad_file(self.path, reason)
        try:
            self._fh: Any = safe_open(str(self.path), framework="pt")  # parses and checks the whole header
            self._keys = list(self._fh.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise _bad_file(self.path, _reason(exc)) from None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.__exit__(None, None, None)

    def _handle(self) -> Any:
        if self._fh is None:
            raise ValueError(f"{describe_path(self.path)} was closed")
        return self._fh

    def keys(self) -> list[str]:
        """The tensor names, in the file's order."""
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def _slice(self, key: str) -> Any:
        if key not in self._keys:
            raise ValueError(f"{describe_path(self.path)} has no tensor {key!r}")
        return self._handle().get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | None:
        """The tensor's torch dtype (None for a safetensors dtype torch has no name for)."""
        return _ST_DTYPES.get(str(self._slice(key).get_dtype()))

    def get(self, key: str) -> torch.Tensor:
        """One tensor (CPU)."""
        from safetensors import SafetensorError

        if key not in self._keys:
            raise ValueError(f"{describe_path(self.path)} has no tensor {key!r}")
        try:
            return cast(torch.Tensor, self._handle().get_tensor(key))
        except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{describe_path(self.path)}: tensor {key!r} cannot be read ({_reason(exc)}); re-save or remove the file"
            ) from None

    def metadata(self) -> dict[str, str]:
        return dict(self._handle().metadata() or {})


def open_tensors(path: PathLike) -> TensorFile:
    """Open a safetensors file for reading tensor by tensor, after validating it (see :class:`TensorFile`).

    This is the one door for lazy reads (merging's adapter sources, PHLoRA's model folders, the
    registry's checks, serving); :func:`load_tensors` reads a whole file through the same checks.
    """
    return TensorFile(path)


def check_safetensors(path: PathLike) -> None:
    """Validate a safetensors file's framing and header without reading its tensors (one-line errors)."""
    with open_tensors(path):
        pass


def load_tensors(
    path: PathLike, *, allow_pickle: bool = False, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a tensor file: safetensors always; pickle checkpoints only with ``allow_pickle=True``.

    The format is decided by the file's content, not its name. Pickle files (``.bin``, ``.pt``,
    ``.pth``, ...) are read with ``torch.load(weights_only=True)`` when allowed.

    Raises:
        ValueError: the file is pickle (or unknown) and ``allow_pickle`` is False, or a corrupt
            safetensors file (empty, truncated, bad header, offsets outside the file or
            overlapping), or not a regular file: one line naming the file.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    kind, reason = _sniff(path)
    if kind == "safetensors":
        with open_tensors(path) as fh:
            out = {k: fh.get(k) for k in fh.keys()}
        if str(device) != "cpu":
            out = {k: v.to(device) for k, v in out.items()}
        return out
    if not allow_pickle:
        if kind == "pickle":
            raise _pickle_file(path, ", or pass allow_pickle=True only if you trust it")
        if path.suffix == ".safetensors" or path.suffix not in PICKLE_SUFFIXES:
            raise _bad_file(path, reason)
        raise ValueError(
            f"refusing to read {path.name!r}: it is not safetensors (pickle can run code); "
            f"pass allow_pickle=True only if you trust it"
        )
    with open(path, "rb") as fh:  # a file object: torch.load dispatches on '.safetensors' names
        obj = torch.load(fh, map_location=device, weights_only=True)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path.name!r} does not hold a flat name -> tensor mapping")
    return dict(obj)


def load_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (empty dict if none); the file is validated first."""
    with open_tensors(path) as fh:
        return fh.metadata()


def read_json(path: PathLike) -> Any:
    """Parse a JSON file; one-line errors naming the file (not UTF-8, not JSON, nested too deeply,
    not a regular file). A missing file is a ``FileNotFoundError``."""
    p = Path(path)
    desc = describe_path(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {desc}") from None
    except OSError as exc:
        raise ValueError(f"{desc} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{desc} is a {file_kind(st.st_mode)}, not a regular file; a JSON file must be a plain file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{p}: not valid JSON (not UTF-8 text)") from None
    except OSError as exc:
        raise ValueError(f"{desc} cannot be read ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}: not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise ValueError(f"{p}: not valid JSON (nested too deeply)") from None


# ---------------------------------------------------------------------------------------------
# finite values


def nonfinite_count(t: torch.Tensor) -> int:
    """How many entries of a floating tensor are NaN or ±Inf (0 for other dtypes)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    finite = torch.isfinite(t)
    return 0 if bool(finite.all()) else int((~finite).sum())


def check_finite(t: torch.Tensor, what: str, then: str = "") -> torch.Tensor:
    """``t`` itself, or a one-line ``ValueError``: ``{what} holds NaN or Inf{then}``."""
    if nonfinite_count(t):
        raise ValueError(f"{what} holds NaN or Inf{then}")
    return t


def sha256_file(path: PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# base fingerprint


def _logical_shape(module: nn.Module) -> tuple[int, ...] | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    qs = getattr(weight, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return tuple(int(s) for s in qs.shape)
    return tuple(int(s) for s in weight.shape)


def _float_dtype(model: nn.Module) -> str | None:
    for p in model.parameters():
        if p.is_floating_point():
            return str(p.dtype).removeprefix("torch.")
    return None


def _decoder_linear_names(model: nn.Module) -> set[str]:
    from adapterlab.models import decoder_layers
    from adapterlab.quant import base_named_modules

    try:
        layers = decoder_layers(model)
    except ValueError:
        return set()
    ids = {id(m) for block in layers for m in block.modules()}
    return {n for n, m in base_named_modules(model) if id(m) in ids and isinstance(m, nn.Linear)}


def _zero_mask(w: torch.Tensor) -> Any:
    """Flat numpy bool array of ``w == 0`` (numpy: an order of magnitude faster than torch's bool ops on CPU)."""
    w = w.detach().reshape(-1)
    if w.device.type != "cpu":
        return (w == 0).cpu().numpy()
    if w.dtype == torch.bfloat16:  # numpy has no bf16: +0 and -0 are the bit patterns with no bits but the sign
        return (w.view(torch.int16).numpy() & 0x7FFF) == 0
    if w.dtype in (torch.float16, torch.float32, torch.float64):
        return w.numpy() == 0
    return (w == 0).numpy()


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model for adapters: shapes, quantization and sparsity pattern.

    Works on plain, bitsandbytes-quantized and peft-wrapped models (adapter modules are ignored,
    ``base_model.model.`` / ``.base_layer`` are stripped from names). Deterministic; does not depend
    on nonzero weight values (see the module docstring).

    Returns:
        ``format``, ``model_id`` (``config._name_or_path`` or None), ``revision`` (``config._commit_hash``
        or None), ``architecture``, ``model_type``, ``dtype`` (first floating parameter),
        ``quantization`` (``"none"``, ``"bnb-4bit-nf4"``, ``"bnb-4bit-fp4"``, ``"bnb-8bit"``, or a
        ``"+"``-joined set if mixed), ``double_quant``, ``n_params`` (logical weight elements),
        ``shapes_digest`` (sha256 over every module's weight name and logical shape),
        ``n_decoder_linears``, ``sparsity`` (zero fraction over decoder linear weights, as stored;
        4-bit weights dequantized) and ``mask_digest`` (sha256 over their names, shapes and packed
        zero masks).
    """
    import numpy as np

    from adapterlab.quant import base_named_modules, dequantize_weight, module_quantization

    inner = cast(Any, model).get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel
    config = getattr(inner, "config", None)
    architectures = getattr(config, "architectures", None) or [type(inner).__name__]

    shapes = hashlib.sha256()
    n_params = 0
    quants: set[str] = set()
    double_quant = False
    for name, module in base_named_modules(model):
        shape = _logical_shape(module)
        if shape is None:
            continue
        shapes.update(f"{name}:{list(shape)}\n".encode())
        n_params += int(np.prod(shape)) if shape else 1
        q = module_quantization(module)
        if q is not None:
            quants.add(q)
            qs = getattr(module.weight, "quant_state", None)
            double_quant = double_quant or bool(getattr(qs, "nested", False) or getattr(qs, "original_nested", False))

    mask = hashlib.sha256()
    zeros = total = 0
    decoder = _decoder_linear_names(model)
    for name, module in base_named_modules(model):
        if name not in decoder:
            continue
        weight = getattr(module, "weight", None)
        if module_quantization(module) is None and isinstance(weight, torch.Tensor):
            w = weight.detach()  # a plain weight: compare in place, no fp32 copy
        else:
            w = dequantize_weight(module)  # [out, in] fp32
        z = _zero_mask(w)  # numpy bool, flat
        zeros += int(np.count_nonzero(z))
        total += z.size
        mask.update(f"{name}:{list(w.shape)}\n".encode())
        mask.update(np.packbits(z).tobytes())

    return {
        "format": FINGERPRINT_FORMAT,
        "model_id": (getattr(config, "_name_or_path", None) or None),
        "revision": getattr(config, "_commit_hash", None),
        "architecture": architectures[0],
        "model_type": getattr(config, "model_type", None),
        "dtype": _float_dtype(model),
        "quantization": "+".join(sorted(quants)) if quants else "none",
        "double_quant": double_quant,
        "n_params": n_params,
        "shapes_digest": shapes.hexdigest(),
        "n_decoder_linears": len(decoder),
        "sparsity": (zeros / total) if total else 0.0,
        "mask_digest": mask.hexdigest(),
    }


def fingerprint_digest(fp: Mapping[str, Any], *, keys: tuple[str, ...] = DIGEST_KEYS) -> str:
    """Hex sha256 of the identifying fields of a fingerprint (canonical JSON of ``keys``).

    Raises:
        ValueError: a key is missing from ``fp``.
    """
    missing = [k for k in keys if k not in fp]
    if missing:
        raise ValueError(f"fingerprint lacks {missing}; expected the keys {list(keys)}")
    payload = json.dumps({k: fp[k] for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
