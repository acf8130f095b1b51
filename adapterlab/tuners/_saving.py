"""``save_adapter``: write a peft adapter from any process layout (one process, DDP, FSDP2), whole and verified.

Under sharding (FSDP2 ``fully_shard``) a parameter is a ``DTensor`` holding one shard per rank, and
``save_pretrained`` on rank 0 fails or writes a partial adapter — the ZeRO-3 / FSDP "empty adapter". This
gathers the adapter's tensors on every rank first, lets only rank 0 write (into a staging folder whose
files land by rename only after the check) and reads the file back to check it holds exactly the adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from adapterlab import distributed


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "peft_config"):
        model = model.module  # DistributedDataParallel
    return model


def _land(stage: Path, out: Path) -> None:
    """Move every file of ``stage`` into ``out`` by rename (each file whole; tensors before configs).

    Other files in ``out`` (a Trainer's checkpoints, a README) are left alone.
    """
    files = sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
    for src in files:
        dst = out / src.relative_to(stage)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def save_adapter(
    model: nn.Module, save_directory: str | os.PathLike[str], *, adapter_name: str | None = None, **kwargs: Any
) -> Path | None:
    """Save a peft adapter as a PEFT adapter directory from every process of a run; only rank 0 writes.

    Every rank must call it (the shards are gathered with a collective). The adapter's tensors are
    gathered whole to the CPU (:func:`adapterlab.distributed.full_tensors`), rank 0 writes them with
    ``save_pretrained(..., state_dict=...)`` into a staging folder next to ``save_directory``, reads
    ``adapter_model.safetensors`` back and checks it holds exactly those tensors
    (:func:`adapterlab.distributed.check_same_tensors`), and only then moves the files in by rename
    (tensors first, configs last; other files in the folder stay). In one process it is
    ``save_pretrained`` plus that check.

    Args:
        model: a ``PeftModel`` (plain, inside ``DistributedDataParallel``, or sharded by ``fully_shard``).
        save_directory: the adapter directory to write.
        adapter_name: the adapter (default: the active one).
        **kwargs: passed to ``save_pretrained`` (not ``state_dict`` / ``selected_adapters``).

    Returns:
        The directory on rank 0, None on the other ranks.

    Raises:
        ValueError: no peft model, no adapter tensors, or a saved file that is not the whole adapter.
    """
    from peft import get_peft_model_state_dict

    from adapterlab.io import load_tensors

    model = _unwrap(model)
    if not hasattr(model, "peft_config") or not hasattr(model, "save_pretrained"):
        raise ValueError(f"save_adapter needs a peft model (get_peft_model), got {type(model).__name__}")
    for bad in ("state_dict", "selected_adapters"):
        if bad in kwargs:
            raise ValueError(f"save_adapter chooses {bad} itself; pass adapter_name instead")
    name = adapter_name or model.active_adapter
    if name not in model.peft_config:
        raise ValueError(f"unknown adapter {name!r}; choose one of: {', '.join(model.peft_config)}")
    full_names = model.state_dict()  # DTensors stay shards here
    wanted = get_peft_model_state_dict(model, state_dict=full_names, adapter_name=name)
    kept = {id(v) for v in wanted.values()}
    subset = distributed.full_tensors({k: v for k, v in full_names.items() if id(v) in kept})  # collective
    expected = get_peft_model_state_dict(model, state_dict=subset, adapter_name=name)
    if set(expected) != set(wanted):  # peft built some entry anew: it would be missing from the gathered subset
        raise ValueError(
            f"save_adapter could not map {sorted(set(wanted) - set(expected))[:3]} back to the model's tensors; "
            f"use save_pretrained in one process"
        )
    out = Path(save_directory)
    error: str | None = None
    if distributed.is_rank0():
        try:
            if not expected:
                distributed.check_same_tensors({}, expected, str(out))  # refuses an empty adapter
            out.mkdir(parents=True, exist_ok=True)
            stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.stage-", dir=out.parent))
            try:
                model.save_pretrained(str(stage), state_dict=subset, selected_adapters=[name], **kwargs)
                folder = stage if name == "default" else stage / name
                distributed.check_same_tensors(load_tensors(folder / "adapter_model.safetensors"), expected, str(out))
                _land(stage, out)
            finally:
                shutil.rmtree(stage, ignore_errors=True)
        except (ValueError, OSError) as err:
            error = f"{type(err).__name__}: {err}"
            if not distributed.is_distributed():
                raise
    error = distributed.broadcast_object(error)  # every rank waits for the write and learns how it went
    if error is not None:
        raise ValueError(f"save_adapter failed on rank 0: {error}")
    return out if distributed.is_rank0() else None
