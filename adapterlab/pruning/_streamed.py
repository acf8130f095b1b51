"""Streamed sequential pruning of a safetensors model folder, one decoder block in memory at a time.

:func:`prune_checkpoint` gives exactly what :func:`adapterlab.pruning.prune_` gives on the whole model
loaded in the same dtype (the same masks, weights and report rows; tested), with the model never in memory:

1. the model is built from its ``config.json`` with every parameter on the meta device (no memory; the
   rotary embedding's buffers are real, as in a loaded model);
2. calibration methods (Wanda, SparseGPT): the tensors outside the decoder blocks except the LM head
   (embeddings, final norm) are loaded, block 0's inputs are captured as :func:`prune_` captures them
   (hidden states, rotary position embeddings, attention mask, position ids), and those tensors are freed;
3. per block ``i``: its tensors are read from the shards in the checkpoint's dtype (or ``dtype``), the
   carried activations run through it with the statistics hooks, its linears are pruned (statistics and
   scores in fp32, per layer), the **pruned** block is run again to give block ``i + 1`` its inputs,
   its tensors go to the output shards and its masks to ``masks.safetensors``, and it is freed;
4. embeddings, norms and the head are copied through unchanged, one tensor at a time.

The per-block step is :func:`adapterlab.pruning.pruner.prune_block_`, the one :func:`prune_` runs. Memory:
one block (in its dtype) plus, for calibration methods, the block's per-layer statistics and the calibration
activations (``n_samples x seqlen x hidden`` in the model dtype, twice while a block runs). The output is
written through :class:`adapterlab.streaming.ShardWriter` into a staging folder renamed into place at the end
(an error or an interrupt leaves no output folder).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterlab.io import open_tensors, read_json
from adapterlab.models import block_linears, decoder_layers
from adapterlab.progress import ProgressFactory, track
from adapterlab.pruning.pruner import (
    PruneReport,
    _capture_block0_inputs,
    _check_calibration,
    _check_linears,
    _make_pruner,
    layer_rows,
    make_report,
    mask_hash,
    prune_block_,
)
from adapterlab.streaming import Checkpoint, ShardWriter, TensorSpec, copy_side_files, rewrite_metadata

logger = logging.getLogger(__name__)

__all__ = ["MASKS_NAME", "StreamedPrune", "prune_checkpoint", "prune_into"]

#: The masks file written beside the pruned weights.
MASKS_NAME = "masks.safetensors"


@dataclass
class StreamedPrune:
    """What :func:`prune_checkpoint` wrote.

    Attributes:
        output: the model folder.
        report: the :class:`PruneReport` (the same rows as :func:`prune_` gives).
        mask_sha256: :func:`adapterlab.pruning.mask_hash` of the masks written (None when none were).
        dtype: the dtype the blocks were pruned and written in.
        shards: the weight files written.
    """

    output: Path
    report: PruneReport
    mask_sha256: str | None
    dtype: torch.dtype
    shards: list[Path]


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``folder``'s config with its parameters on the meta device (buffers real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with init_empty_weights(include_buffers=False):
            model: nn.Module = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{str(folder / 'config.json')!r} is not a config transformers can build a causal LM from ({reason})"
        ) from None
    model.eval()
    return model


def _output_head_keys(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    name = next(n for n, m in model.named_modules() if m is head)
    return {f"{name}.{k}" for k in head.state_dict()}


def _check_matches(model: nn.Module, ckpt: Checkpoint, n_blocks: int) -> None:
    """Every tensor the model holds is in the checkpoint with the same shape (the tied head may be absent)."""
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    optional = _output_head_keys(model) if tied else set()
    for key, t in model.state_dict().items():
        if key not in ckpt:
            if key in optional:
                continue
            raise ValueError(f"model folder {str(ckpt.folder)!r} has no tensor {key!r}, which its config.json needs")
        shape = ckpt.spec(key).shape
        if shape != tuple(t.shape):
            raise ValueError(
                f"model folder {str(ckpt.folder)!r}: tensor {key!r} has shape {shape}, its config.json needs "
                f"{tuple(t.shape)}"
            )
    if ckpt.num_blocks != n_blocks:
        raise ValueError(
            f"model folder {str(ckpt.folder)!r} holds {ckpt.num_blocks} decoder blocks, its config.json has {n_blocks}"
        )


def _load_(model: nn.Module, keys: list[str], ckpt: Checkpoint, dtype: torch.dtype, prefix: str = "") -> None:
    """Give the meta tensors ``keys`` of ``model`` (names without ``prefix``) their values from the checkpoint."""
    state = {key: ckpt.get(prefix + key, dtype) for key in keys}
    model.load_state_dict(state, strict=False, assign=True)


def _free_(model: nn.Module, keys: list[str]) -> None:
    """Put the modules owning ``keys`` back on the meta device (their memory is released)."""
    for owner in sorted({k.rsplit(".", 1)[0] for k in keys if "." in k}):
        model.get_submodule(owner).to("meta")


class _LazyMasks(Mapping[str, Tensor]):
    """The masks of a safetensors file as a mapping read one tensor at a time (for :func:`mask_hash`)."""

    def __init__(self, handle: Any) -> None:
        self._h = handle

    def __getitem__(self, key: str) -> Tensor:
        t: Tensor = self._h.get(key)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._h.keys())

    def __len__(self) -> int:
        return len(self._h.keys())


def _set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    path = folder / "config.json"
    if not path.is_file():
        return
    config = read_json(path)
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prune_into(
    source: str | os.PathLike[str],
    folder: str | os.PathLike[str],
    method: str,
    sparsity: float | None,
    *,
    pattern: str | None = None,
    calibration: Tensor | None = None,
    scope: str | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    masks: bool = True,
    progress: ProgressFactory | None = None,
    **method_kwargs: Any,
) -> StreamedPrune:
    """Prune the model folder ``source`` block by block into the existing, empty folder ``folder`` (no staging:
    :func:`prune_checkpoint` stages; a caller that adds files of its own stages itself). Arguments as there."""
    start = time.perf_counter()
    cls, pruner, nm, target = _make_pruner(method, sparsity, pattern, scope, batch_size, method_kwargs)
    out = Path(folder)
    with Checkpoint(source) as ckpt:
        stored = ckpt.float_dtype()
        work = dtype or stored
        model = _skeleton(ckpt.folder, work)
        blocks = decoder_layers(model)
        names = {id(m): n for n, m in model.named_modules()}
        per_block = [{names[id(lin)]: lin for lin in block_linears(block).values()} for block in blocks]
        _check_linears(model, per_block, nm, pattern)
        _check_matches(model, ckpt, len(blocks))
        calib: Tensor | None = None
        if cls.needs_calibration:
            calib = _check_calibration(model, calibration, method)
        elif calibration is not None:
            logger.debug("pruning method %r uses no calibration data; ignoring it", method)

        specs = []
        for name in ckpt.names():
            spec = ckpt.spec(name)
            specs.append(spec._replace(dtype=work) if spec.dtype.is_floating_point else spec)
        copy_side_files(ckpt.folder, out)
        if work != stored:
            _set_config_dtype(out, work)
        writer = ShardWriter(out, specs, max_shard_size=max_shard_size)
        mask_writer: ShardWriter | None = None
        if masks:
            mask_specs = [TensorSpec(n, tuple(lin.weight.shape), torch.bool) for b in per_block for n, lin in b.items()]
            meta = {
                "format": "adapterlab-masks",
                "mask_sha256": "0" * 64,  # replaced by the digest once every mask is on disk
                "method": cls.name,
                "pattern": f"{nm[0]}:{nm[1]}" if nm else "unstructured",
            }
            mask_writer = ShardWriter(out, mask_specs, max_shard_size=2**62, metadata=meta, single_name=MASKS_NAME)
        logger.info("pruning %d blocks of %s with %r, streamed (%s)", len(blocks), ckpt.folder, pruner, work)
        layers = []
        nm_valid: bool | None = True if nm is not None else None
        try:
            with torch.no_grad():
                calls = None
                if calib is not None:
                    block_keys = {f"{names[id(b)]}." for b in blocks}
                    head = _output_head_keys(model)
                    outer = [
                        k
                        for k in model.state_dict()
                        if not any(k.startswith(p) for p in block_keys) and k not in head and k in ckpt
                    ]
                    _load_(model, outer, ckpt, work)  # embeddings (and norms): what runs before block 0
                    calls = _capture_block0_inputs(model, blocks[0], calib, batch_size)
                    _free_(model, outer)
                last = len(blocks) - 1
                for i in track(range(len(blocks)), f"{method}: blocks", progress=progress):
                    block, prefix = blocks[i], f"{names[id(blocks[i])]}."
                    _load_(block, list(block.state_dict()), ckpt, work, prefix)
                    facts, calls = prune_block_(pruner, block, per_block[i], calls, next_inputs=i < last)
                    rows, valid = layer_rows(per_block[i], facts, nm)
                    layers += rows
                    if valid is False:
                        nm_valid = False
                    state = block.state_dict()
                    for name in ckpt.block_names(i):
                        key = name[len(prefix) :]
                        writer.write(name, state[key] if key in state else ckpt.get(name, work))
                    if mask_writer is not None:
                        for name, lin in per_block[i].items():
                            mask_writer.write(name, lin.weight.detach() != 0)
                    del state
                    block.to("meta")
                for name in ckpt.other_names():
                    writer.write(name, ckpt.get(name, work))
            shards = writer.finish()
            digest = None
            if mask_writer is not None:
                (path,) = mask_writer.finish()
                with open_tensors(path) as fh:
                    digest = mask_hash(_LazyMasks(fh))
                rewrite_metadata(path, {**mask_writer.metadata, "mask_sha256": digest})
        except BaseException:
            writer.abort()
            if mask_writer is not None:
                mask_writer.abort()
            raise
    report = make_report(cls, pruner, nm, target, layers, nm_valid, start, calib)
    return StreamedPrune(output=out, report=report, mask_sha256=digest, dtype=work, shards=shards)


def prune_checkpoint(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    method: str,
    sparsity: float | None,
    *,
    pattern: str | None = None,
    calibration: Tensor | None = None,
    scope: str | None = None,
    batch_size: int = 8,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = "5GB",
    masks: bool = True,
    overwrite: bool = False,
    progress: ProgressFactory | None = None,
    **method_kwargs: Any,
) -> StreamedPrune:
    """Prune every linear inside the decoder blocks of the model folder ``source`` into the folder ``output``,
    holding one decoder block in memory at a time.

    Args:
        source: a transformers model folder (``config.json`` and ``model.safetensors`` or an index and its shards).
        output: the folder to write: the pruned weights (shards of at most ``max_shard_size``, with
            ``model.safetensors.index.json`` when there are several), the config / generation config / tokenizer
            files of ``source``, and ``masks.safetensors`` (``masks=True``; the format of
            :func:`adapterlab.pruning.save_masks`). Written staged: nothing appears at ``output`` on an error.
        method, sparsity, pattern, calibration, scope, batch_size, **method_kwargs: as in
            :func:`adapterlab.pruning.prune_`.
        dtype: the dtype to prune and write in; default the checkpoint's (a bf16 checkpoint stays bf16, and
            the result equals ``prune_`` on the model loaded in bf16).
        max_shard_size: bytes or ``"5GB"``-style.
        overwrite: replace a non-empty ``output``.
        progress: advances once per block.

    Raises:
        ValueError / FileNotFoundError: bad options (as ``prune_``), a corrupt or missing shard or index (one
            line naming the file), a checkpoint that does not match its config; before any output appears.
        FileExistsError: ``output`` is a file or a non-empty folder without ``overwrite``.
    """
    from adapterlab.staging import staged_dir

    with staged_dir(output, overwrite) as stage:
        result = prune_into(
            source,
            stage,
            method,
            sparsity,
            pattern=pattern,
            calibration=calibration,
            scope=scope,
            batch_size=batch_size,
            dtype=dtype,
            max_shard_size=max_shard_size,
            masks=masks,
            progress=progress,
            **method_kwargs,
        )
    result.output = Path(output)
    result.shards = [result.output / p.name for p in result.shards]
    return result
