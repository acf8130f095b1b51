"""Sharded safetensors checkpoints read tensor by tensor or one decoder block at a time, and written shard
by shard, so that work on a model larger than memory holds one block (or one tensor) at a time.

* :class:`Checkpoint` reads a model folder (``model.safetensors.index.json`` and its shards, or one
  ``model.safetensors``) through the project's one validated reader (:func:`adapterlab.io.open_tensors`):
  every shard is checked when the folder is opened, a tensor is read only when asked for, in the
  checkpoint's dtype. :meth:`Checkpoint.block` gives every tensor of decoder block ``i`` (the names under
  ``<prefix>{i}.``, e.g. ``model.layers.3.``).
* :class:`ShardWriter` writes tensors whose names, shapes and dtypes are known up front (a pruned or merged
  base has the shapes of its input): the shard layout is planned first (``max_shard_size``; a tensor larger
  than that sits alone), each shard's header is written at once, and each tensor goes straight to its offset
  when it arrives, in any order, so nothing is buffered. :meth:`ShardWriter.finish` checks that every planned
  tensor came, fsyncs and writes the index (``model.safetensors.index.json``; a single shard is named
  ``model.safetensors`` and has none, as transformers writes it).
* :func:`staged_checkpoint` pairs the writer with :func:`adapterlab.staging.staged_dir`: the output is written
  in a temporary sibling folder (the config, generation config and tokenizer files copied from the source)
  and renamed into place only when everything is written; an error at any point leaves no output folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from adapterlab.io import TensorFile, check_finite, describe_path, open_tensors, read_json

__all__ = [
    "INDEX_NAME",
    "SIDE_FILES",
    "SINGLE_NAME",
    "Checkpoint",
    "ShardWriter",
    "StagedCheckpoint",
    "TensorSpec",
    "copy_side_files",
    "parse_size",
    "rewrite_metadata",
    "staged_checkpoint",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: The files besides the weights that make a model folder loadable (copied from the source when present).
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: safetensors dtype names of the torch dtypes a checkpoint holds.
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
#: The decoder-block prefix of a tensor name: ``model.layers.3.`` -> (``model.layers.``, 3).
_BLOCK_RE = re.compile(r"^((?:[A-Za-z0-9_]+\.)*?(?:layers|h|blocks)\.)(\d+)\.")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB``, ``500MB``, ``1.5GiB`` or an int (powers of 1000 for ``KB``..., 1024 for ``KiB``...).

    Raises:
        ValueError: not a positive size (one line naming the value and the accepted forms).
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(size) if isinstance(size, str) else None
        if match is None:
            raise ValueError(f"max_shard_size {size!r} is not a size; give bytes or e.g. '5GB', '500MB', '2GiB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


class TensorSpec(NamedTuple):
    """What a tensor of a checkpoint is, without its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def block_of(name: str) -> tuple[str, int] | None:
    """``(prefix, index)`` of the decoder block a tensor name belongs to (``model.layers.3.mlp...`` ->
    ``("model.layers.", 3)``), or None for a tensor outside the blocks (embeddings, final norm, head)."""
    match = _BLOCK_RE.match(name)
    return (match.group(1), int(match.group(2))) if match else None


# ------------------------------------------------------------------------------------------------
# reading


class Checkpoint:
    """A safetensors model folder read lazily, tensor by tensor or block by block.

    Opening validates the index (an object with a ``weight_map`` of tensor name -> shard file in the folder)
    and every shard's framing and header (:func:`adapterlab.io.open_tensors`), and checks that each tensor
    the index names is in its shard; no tensor data is read. Every problem is one ``ValueError`` line naming
    the file (a missing folder or shard is a ``FileNotFoundError``).

    Attributes:
        folder: the model folder.
        files: the shard files, in name order.
        block_prefix: the prefix of the decoder blocks' tensor names (``model.layers.``), or None.
        num_blocks: how many decoder blocks the tensors name (0 without blocks).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            what = "does not exist" if not self.folder.exists() else "is not a folder"
            raise FileNotFoundError(f"model folder {str(self.folder)!r} {what}")
        self._handles: dict[Path, TensorFile] = {}
        self._owner: dict[str, TensorFile] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        prefixes: dict[str, set[int]] = {}
        for name in self._owner:
            where = block_of(name)
            if where is not None:
                prefixes.setdefault(where[0], set()).add(where[1])
        if len(prefixes) > 1:
            raise ValueError(
                f"{str(self.folder)!r}: tensor names have more than one block prefix ({', '.join(sorted(prefixes))})"
            )
        self.block_prefix: str | None = next(iter(prefixes), None)
        indices = next(iter(prefixes.values()), set())
        self.num_blocks = max(indices) + 1 if indices else 0
        if indices and len(indices) != self.num_blocks:
            missing = sorted(set(range(self.num_blocks)) - indices)
            raise ValueError(f"{str(self.folder)!r}: no tensor of decoder block {self.block_prefix}{missing[0]}")

    def _open(self) -> None:
        index = self.folder / INDEX_NAME
        if index.exists():
            raw = read_json(index)
            weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{describe_path(index)}: key 'weight_map' must be a non-empty object")
            for key, file in weight_map.items():
                if not isinstance(file, str) or not file or Path(file).name != file:
                    raise ValueError(
                        f"{describe_path(index)}: weight_map[{key!r}] must be a shard file name in the folder, "
                        f"got {file!r}"
                    )
            self.files = sorted({self.folder / f for f in weight_map.values()})
            for f in self.files:
                if not f.exists():
                    raise FileNotFoundError(f"{describe_path(index)} names the shard {f.name!r}, which does not exist")
                self._handles[f] = open_tensors(f)
            for key, file in weight_map.items():
                handle = self._handles[self.folder / file]
                if key not in handle:
                    raise ValueError(
                        f"{describe_path(handle.path)} has no tensor {key!r}, which {INDEX_NAME} puts there"
                    )
                self._owner[key] = handle
            return
        single = self.folder / SINGLE_NAME
        if not single.exists():
            raise FileNotFoundError(f"model folder {str(self.folder)!r} has no {SINGLE_NAME} or {INDEX_NAME}")
        self.files = [single]
        handle = self._handles[single] = open_tensors(single)
        for key in handle.keys():
            self._owner[key] = handle
        if not self._owner:
            raise ValueError(f"{describe_path(single)} holds no tensors")

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __contains__(self, name: object) -> bool:
        return name in self._owner

    def __len__(self) -> int:
        return len(self._owner)

    def names(self) -> list[str]:
        """Every tensor name: the blocks' in block order first (each block's in the shards' order), then the rest."""
        order = {name: i for i, name in enumerate(self._owner)}
        return sorted(self._owner, key=lambda n: (self._block_key(n), order[n]))

    def _block_key(self, name: str) -> int:
        where = block_of(name)
        return where[1] if where is not None else self.num_blocks

    def block_names(self, i: int) -> list[str]:
        """The tensor names of decoder block ``i`` (under ``{block_prefix}{i}.``)."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"{str(self.folder)!r} has {self.num_blocks} decoder blocks, not block {i}")
        prefix = f"{self.block_prefix}{i}."
        return [n for n in self._owner if n.startswith(prefix)]

    def other_names(self) -> list[str]:
        """The tensor names outside the decoder blocks (embeddings, final norm, LM head, ...)."""
        return [n for n in self._owner if block_of(n) is None]

    def spec(self, name: str) -> TensorSpec:
        """Name, shape and dtype of one tensor from its shard's header (no data is read)."""
        handle = self._handle(name)
        dtype = handle.dtype(name)
        if dtype is None:
            raise ValueError(f"{describe_path(handle.path)}: tensor {name!r} has a dtype torch cannot hold")
        return TensorSpec(name, handle.shape(name), dtype)

    def specs(self) -> list[TensorSpec]:
        return [self.spec(n) for n in self.names()]

    def _handle(self, name: str) -> TensorFile:
        handle = self._owner.get(name)
        if handle is None:
            raise ValueError(f"model folder {str(self.folder)!r} has no tensor {name!r}")
        return handle

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor (CPU) in the checkpoint's dtype, or cast to ``dtype`` when it is floating and one is given."""
        t = self._handle(name).get(name)
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def block(self, i: int, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor of decoder block ``i``, by full name (one block in memory)."""
        return {n: self.get(n, dtype) for n in self.block_names(i)}

    def float_dtype(self) -> torch.dtype:
        """The checkpoint's dtype: that of most floating tensors by size (float32 when there are none)."""
        sizes: dict[torch.dtype, int] = {}
        for name in self._owner:
            spec = self.spec(name)
            if spec.dtype.is_floating_point:
                sizes[spec.dtype] = sizes.get(spec.dtype, 0) + math.prod(spec.shape)
        return max(sizes, key=lambda d: sizes[d]) if sizes else torch.float32

    def total_bytes(self) -> int:
        return sum(self.spec(n).nbytes for n in self._owner)


# ------------------------------------------------------------------------------------------------
# writing


@dataclass
class _Slot:
    file: int
    offset: int  # absolute, in the file
    spec: TensorSpec


def _header(entries: list[tuple[TensorSpec, int]], metadata: Mapping[str, str], reserve: int) -> bytes:
    """The safetensors header bytes (length prefix included) for ``(spec, data offset)`` entries, padded with
    spaces so that the data starts 8-byte aligned and ``reserve`` bytes are free for a later metadata rewrite."""
    head: dict[str, Any] = {"__metadata__": dict(metadata)}
    for spec, start in entries:
        head[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [start, start + spec.nbytes],
        }
    text = json.dumps(head, separators=(",", ":")).encode()
    n = len(text) + reserve
    n += (-(8 + n)) % 8
    return n.to_bytes(8, "little") + text.ljust(n, b" ")


def rewrite_metadata(path: str | os.PathLike[str], metadata: Mapping[str, str]) -> None:
    """Replace the ``__metadata__`` of a safetensors file this module wrote, in place, within the spare room its
    header was written with (see ``ShardWriter(reserve=...)``); the file is validated again afterwards.

    Raises:
        ValueError: the new header does not fit (one line naming the file).
    """
    p = Path(path)
    with open(p, "r+b") as fh:
        n = int.from_bytes(fh.read(8), "little")
        head = json.loads(fh.read(n).decode())
        head["__metadata__"] = dict(metadata)
        text = json.dumps(head, separators=(",", ":")).encode()
        if len(text) > n:
            raise ValueError(
                f"{describe_path(p)}: the new metadata needs {len(text) - n} more header bytes than reserved"
            )
        fh.seek(8)
        fh.write(text.ljust(n, b" "))
        fh.flush()
        os.fsync(fh.fileno())
    open_tensors(p).close()


class ShardWriter:
    """Write planned tensors into safetensors shards in ``folder``, each straight to its place on disk.

    Args:
        folder: an existing folder (normally a staging folder: see :func:`staged_checkpoint`).
        specs: every tensor that will be written (name, shape, dtype), in the order the shards hold them.
        max_shard_size: a shard is closed before a tensor would take it over this size; a larger tensor
            sits alone in its shard (as transformers shards).
        metadata: the safetensors ``__metadata__`` of every shard (``{"format": "pt"}`` by default).
        single_name: the file name when everything fits one shard (``model.safetensors``).
        stem: shards are ``{stem}-00001-of-0000N.safetensors`` and the index ``{stem}.safetensors.index.json``.
        reserve: spare header bytes per shard for :func:`rewrite_metadata`.

    Raises:
        ValueError: duplicate names, a dtype safetensors cannot store.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        specs: Iterable[TensorSpec],
        *,
        max_shard_size: int | str = "5GB",
        metadata: Mapping[str, str] | None = None,
        single_name: str = SINGLE_NAME,
        stem: str = "model",
        reserve: int = 0,
    ) -> None:
        self.folder = Path(folder)
        limit = parse_size(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        plan: list[list[TensorSpec]] = [[]]
        size = 0
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise ValueError(f"tensor {spec.name!r} is planned twice")
            if spec.dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor {spec.name!r}: safetensors cannot store dtype {spec.dtype}")
            seen.add(spec.name)
            if plan[-1] and size + spec.nbytes > limit:
                plan.append([])
                size = 0
            plan[-1].append(spec)
            size += spec.nbytes
        n = len(plan)
        self.index_name = f"{stem}.safetensors.index.json" if n > 1 else None
        self.file_names = [single_name] if n == 1 else [f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.slots: dict[str, _Slot] = {}
        self._files: list[IO[bytes]] = []
        self._written: set[str] = set()
        self.total_size = 0
        try:
            for k, shard in enumerate(plan):
                entries, start = [], 0
                for spec in shard:
                    entries.append((spec, start))
                    start += spec.nbytes
                header = _header(entries, self.metadata, reserve)
                fh = open(self.folder / self.file_names[k], "wb+")
                self._files.append(fh)
                fh.write(header)
                fh.truncate(len(header) + start)
                for spec, offset in entries:
                    self.slots[spec.name] = _Slot(k, len(header) + offset, spec)
                self.total_size += start
        except BaseException:
            self.abort()
            raise

    @property
    def paths(self) -> list[Path]:
        return [self.folder / n for n in self.file_names]

    def missing(self) -> list[str]:
        """The planned tensors not yet written."""
        return [n for n in self.slots if n not in self._written]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (moved to CPU and made contiguous; floating values must be finite).

        Raises:
            ValueError: a name that was not planned or was written already, another shape or dtype than
                planned, NaN or Inf (one line naming the tensor; nothing of it is written).
        """
        slot = self.slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} is not one of the {len(self.slots)} planned for {str(self.folder)!r}")
        if name in self._written:
            raise ValueError(f"tensor {name!r} was written already")
        spec = slot.spec
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned as {spec.shape} {spec.dtype}"
            )
        check_finite(tensor, f"refusing to write tensor {name!r}", "; nothing was written")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        fh = self._files[slot.file]
        fh.seek(slot.offset)
        if data.numel():
            fh.write(data.view(torch.uint8).numpy().data)
        self._written.add(name)

    def finish(self) -> list[Path]:
        """Check every planned tensor was written, fsync and close the shards, write the index; returns the shards.

        Raises:
            ValueError: some planned tensor was never written (naming the first).
        """
        missing = self.missing()
        if missing:
            self.abort()
            raise ValueError(f"{len(missing)} planned tensor(s) were never written, e.g. {missing[0]!r}")
        for fh in self._files:
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        self._files = []
        if self.index_name is not None:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {name: self.file_names[slot.file] for name, slot in self.slots.items()},
            }
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for path in self.paths:  # read back through the validated reader: headers, offsets, sizes
            open_tensors(path).close()
        return self.paths

    def abort(self) -> None:
        """Close the open shards without finishing (the caller removes the folder)."""
        for fh in self._files:
            fh.close()
        self._files = []


def copy_side_files(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> list[str]:
    """Copy the config, generation config and tokenizer files (:data:`SIDE_FILES`) that ``source`` has (regular
    files; a symlink's content) into ``dest``; returns the names copied."""
    src, dst = Path(source), Path(dest)
    copied = []
    for name in SIDE_FILES:
        path = src / name
        if path.is_file():
            shutil.copyfile(path, dst / name)
            copied.append(name)
    return copied


@dataclass
class StagedCheckpoint:
    """The staging folder of :func:`staged_checkpoint` and the writer of its weights."""

    folder: Path
    writer: ShardWriter


@contextlib.contextmanager
def staged_checkpoint(
    output: str | os.PathLike[str],
    specs: Iterable[TensorSpec],
    *,
    source: str | os.PathLike[str] | None = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> Iterator[StagedCheckpoint]:
    """Write a model folder all or nothing: a staging folder next to ``output`` with the side files of ``source``
    and a :class:`ShardWriter` for ``specs``; on leaving the block the writer is finished and the folder renamed
    to ``output``. Any exception (a missing tensor included) removes the staging folder and leaves ``output``
    as it was."""
    from adapterlab.staging import staged_dir

    with staged_dir(output, overwrite) as stage:
        if source is not None:
            copy_side_files(source, stage)
        writer = ShardWriter(stage, specs, max_shard_size=max_shard_size)
        try:
            yield StagedCheckpoint(stage, writer)
        except BaseException:
            writer.abort()
            raise
        writer.finish()
