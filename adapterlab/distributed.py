"""Decide once, share: the few collectives adapterlab's methods need under ``torchrun`` / ``accelerate launch``.

A decision that depends on data or randomness (a mask, a sampled rank, a budget, an initial value) must be
the same on every process of a data-parallel run, or the replicas silently diverge (DESIGN.md §5b). The
methods therefore reduce their statistics (:func:`all_reduce_mean_`), or choose on rank 0 and share
(:func:`broadcast_tensor_`, :func:`broadcast_object`), and refuse settings that differ between processes
(:func:`check_equal_on_all_ranks`).

Everything here works in a single process without ``torch.distributed`` being initialised: the
collectives are then no-ops and :func:`rank` / :func:`world_size` answer 0 / 1 (or what the launcher
put in the environment, so that "only rank 0 writes" holds even before the process group exists).
torch is the only requirement; accelerate's state is read when accelerate is already imported and
initialised, never created here.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist

T = TypeVar("T")

__all__ = [
    "all_gather_object",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "broadcast_object",
    "broadcast_tensor_",
    "broadcast_tensors_",
    "check_equal_on_all_ranks",
    "check_same_tensors",
    "fingerprint",
    "full_tensors",
    "is_sharded",
    "is_distributed",
    "is_rank0",
    "rank",
    "share_new_parameters_",
    "world_size",
]


# ---------------------------------------------------------------------------------------------
# where am I


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _accelerate_state() -> tuple[int, int] | None:
    """``(process_index, num_processes)`` of accelerate's already-initialised state, else None (never imports it)."""
    mod = sys.modules.get("accelerate.state")
    if mod is None:
        return None
    shared = getattr(getattr(mod, "PartialState", None), "_shared_state", None)
    if not shared or "process_index" not in shared or "num_processes" not in shared:
        return None
    return int(shared["process_index"]), int(shared["num_processes"])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value is not None else default
    except ValueError:
        return default


def is_distributed() -> bool:
    """True when a ``torch.distributed`` process group with more than one process is initialised.

    Only then do the collectives below communicate; otherwise they are no-ops.
    """
    return _group_ready() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else the launcher's ``RANK``, else accelerate's, else 0."""
    if _group_ready():
        return int(dist.get_rank())
    if "RANK" in os.environ:  # a launcher's word beats a state accelerate may have cached in one process
        return _env_int("RANK", 0)
    acc = _accelerate_state()
    return acc[0] if acc is not None else 0


def world_size() -> int:
    """How many processes: the process group's, else the launcher's ``WORLD_SIZE``, else accelerate's, else 1."""
    if _group_ready():
        return int(dist.get_world_size())
    if "WORLD_SIZE" in os.environ:
        return max(1, _env_int("WORLD_SIZE", 1))
    acc = _accelerate_state()
    return acc[1] if acc is not None else 1


def is_rank0() -> bool:
    """True on the process that writes files (rank 0; every process of a single-process run)."""
    return rank() == 0


# ---------------------------------------------------------------------------------------------
# collectives (no-ops in one process)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """The device a collective on ``tensor`` runs on: CUDA for NCCL, the CPU for gloo (and other backends)."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if "cuda" in backend and tensor.is_cuda:  # "cpu:gloo,cuda:nccl" style backends
        return tensor.device
    return torch.device("cpu")


def _run_in_place(tensor: torch.Tensor, op: Callable[[torch.Tensor], None]) -> None:
    """Run ``op`` on a contiguous copy of ``tensor`` on the backend's device (bool as uint8) and copy back."""
    dev = _comm_device(tensor)
    work = tensor.detach()
    if work.dtype == torch.bool:
        work = work.to(torch.uint8)
    work = work.to(dev).contiguous()
    op(work)
    if work.data_ptr() != tensor.data_ptr() or work.dtype != tensor.dtype:  # it ran on a copy
        with torch.no_grad():
            tensor.copy_(work.to(device=tensor.device, dtype=tensor.dtype))


def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite ``tensor`` on every rank with rank ``src``'s values, in place (same shape and dtype everywhere)."""
    if not is_distributed():
        return
    _run_in_place(tensor, lambda t: dist.broadcast(t, src=src))


def broadcast_tensors_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """:func:`broadcast_tensor_` for many tensors in one message per dtype (e.g. one mask per layer), in place."""
    if not is_distributed():
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.detach().reshape(-1).cpu() for t in group])  # (sum numel,)
        broadcast_tensor_(flat, src=src)
        with torch.no_grad():
            for t, part in zip(group, flat.split([t.numel() for t in group])):
                t.copy_(part.view(t.shape).to(t.device))


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over all ranks, in place."""
    if not is_distributed():
        return
    _run_in_place(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))


def all_reduce_mean_(tensor: torch.Tensor) -> None:
    """Average a floating-point ``tensor`` over all ranks, in place (sum, then divide by the world size)."""
    if not tensor.is_floating_point():
        raise ValueError(f"all_reduce_mean_ needs a floating-point tensor, got {tensor.dtype}; use all_reduce_sum_")
    if not is_distributed():
        return
    n = dist.get_world_size()

    def op(t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)

    _run_in_place(tensor, op)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself in one process). The object must be picklable."""
    if not is_distributed():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def _object_device() -> torch.device | None:
    return torch.device("cuda", torch.cuda.current_device()) if str(dist.get_backend()) == "nccl" else None


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------
# checks


def fingerprint(value: Any) -> Any:
    """``value`` with every tensor replaced by a short, exact digest (shape, dtype, sha256 of the bytes).

    Mappings, lists and tuples are walked; other values are returned as they are.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        flat = t.reshape(-1)
        raw = flat.to(torch.uint8) if t.dtype == torch.bool else flat.view(torch.uint8)
        digest = hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:16]
        return f"tensor{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}:{digest}"
    if isinstance(value, Mapping):
        return {k: fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(fingerprint(v) for v in value)
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_equal_on_all_ranks(value: Any, what: str) -> None:
    """Raise ``ValueError`` on every rank unless ``value`` is equal on all of them (no-op in one process).

    Tensors (also inside mappings / lists) are compared by an exact digest (:func:`fingerprint`), so a
    mask or an index set can be checked without sending it. The message names ``what`` and the value
    of every rank that differs from rank 0.
    """
    if not is_distributed():
        return
    values = all_gather_object(fingerprint(value))
    if all(v == values[0] for v in values[1:]):
        return
    where = ""
    if all(isinstance(v, dict) for v in values):  # name the entries that differ, not just the whole mapping
        keys = sorted({k for v in values for k in v}, key=str)
        bad = [k for k in keys if any(v.get(k) != values[0].get(k) for v in values[1:])]
        where = f" at {', '.join(repr(k) for k in bad[:3])}{', ...' if len(bad) > 3 else ''}"
        values = [{k: v.get(k) for k in bad[:3]} for v in values]
    per_rank = "; ".join(f"rank {i}: {_short(v)}" for i, v in enumerate(values))
    raise ValueError(
        f"{what} differs between the {len(values)} processes{where} ({per_rank}); it must be the same on every "
        f"rank of a distributed run (set it explicitly, the same on every process)"
    )


# ---------------------------------------------------------------------------------------------
# parameters created after the model was wrapped


def _sync_step() -> bool:
    """False while accelerate accumulates gradients without syncing (``no_sync`` micro-batches), else True."""
    mod = sys.modules.get("accelerate.state")
    shared = getattr(getattr(mod, "GradientState", None), "_shared_state", None) if mod is not None else None
    return bool(shared.get("sync_gradients", True)) if shared else True


def share_new_parameters_(params: Iterable[torch.nn.Parameter]) -> list[Any]:
    """Make parameters created after ``DistributedDataParallel`` wrapped the model data-parallel, in place.

    DDP's reducer only knows the parameters that existed when it was built; a parameter added later
    (LoRI's sparse B after the D -> S switch) would be updated with each rank's local gradient and the
    replicas would drift apart. This broadcasts the parameters from rank 0 and registers a
    post-accumulate-grad hook on each that averages its gradient over the ranks — on the micro-batch that
    syncs (accelerate's ``sync_gradients``; every backward outside accelerate), before any gradient
    clipping, like DDP itself. Every rank must call it with the same parameters in the same order.

    Returns:
        The hook handles (empty in one process); ``handle.remove()`` undoes the averaging.
    """
    handles: list[Any] = []
    if not is_distributed():
        return handles

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None and _sync_step():
            all_reduce_mean_(p.grad)

    params = list(params)
    broadcast_tensors_([p.data for p in params])
    for p in params:
        if p.requires_grad:
            handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


# ---------------------------------------------------------------------------------------------
# sharded tensors (FSDP2 ``fully_shard`` keeps parameters as DTensors)


def _dtensor_cls() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without the public DTensor
        return None
    return DTensor


def is_sharded(tensor: Any) -> bool:
    """True for a tensor that holds only this rank's shard (an FSDP2 ``DTensor``, a ``ShardedTensor``)."""
    dtensor = _dtensor_cls()
    return (dtensor is not None and isinstance(tensor, dtensor)) or type(tensor).__name__ == "ShardedTensor"


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor whole, detached, on the CPU: a sharded ``DTensor`` (FSDP2) is all-gathered to its global value.

    A collective when any tensor is sharded: every rank must call it with the same keys in the same
    order (a model's own state dict is). Other sharded types (FSDP1's ``SHARDED_STATE_DICT``
    ``ShardedTensor``) are refused: gather with a full state dict first.

    Raises:
        ValueError: a tensor of a sharded type this cannot gather.
    """
    dtensor = _dtensor_cls()
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if dtensor is not None and isinstance(t, dtensor):
            full = cast(Any, t).full_tensor()  # all-gather over the mesh
        elif type(t).__name__ == "ShardedTensor" or not isinstance(t, torch.Tensor):
            raise ValueError(
                f"{key!r} is a {type(t).__name__}; only plain tensors and DTensors (FSDP2) can be gathered here "
                f"(with FSDP1 use StateDictType.FULL_STATE_DICT)"
            )
        else:
            full = t
        out[key] = full.detach().to("cpu", copy=True)
    return out


def check_same_tensors(saved: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise ``ValueError`` unless ``saved`` holds exactly ``expected`` (keys, shapes, dtypes, bytes) and is not empty.

    The check after writing an adapter: an empty file, a missing tensor or one shard instead of the
    whole tensor (the ZeRO-3 / FSDP "empty adapter") fails here with the first bad key.
    """
    if not expected:
        raise ValueError(f"{where}: nothing to save (no adapter tensors); refusing to write an empty adapter")
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{where}: saved tensors differ from the adapter: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, want in expected.items():
        got = saved[key]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(
                f"{where}: {key!r} was saved as {tuple(got.shape)} {got.dtype}, the adapter has "
                f"{tuple(want.shape)} {want.dtype} (a shard instead of the whole tensor?)"
            )
        if fingerprint(got) != fingerprint(want):
            raise ValueError(f"{where}: {key!r} was saved with other values than the adapter has")
