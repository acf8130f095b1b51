"""Who does what when ``adapterlab train`` runs on many processes (``torchrun`` / ``accelerate launch``).

Every rank checks the recipe, loads the base and trains its replica (DDP through the Trainer). Work
whose result must be one answer — evaluation, writing the output folder, the registry put, saving a
pruned base — runs on rank 0 only (:func:`on_rank0`): the other ranks wait for it and receive its
result, or learn that it failed (:class:`RankZeroFailed`) instead of waiting forever. Before rank 0
writes, every rank reports how its part of the run ended (:func:`agree`), so a rank that failed
after the last synchronised step stops the write on every rank. In one process both are plain calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from adapterlab import distributed

T = TypeVar("T")

__all__ = ["RankZeroFailed", "agree", "on_rank0"]


class RankZeroFailed(RuntimeError):
    """Raised on ranks > 0 when rank 0 failed a step they waited for (rank 0 raises and reports the cause)."""

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what} failed on rank 0: {reason}")
        self.what = what
        self.reason = reason


def _reason(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def on_rank0(fn: Callable[[], T], what: str) -> T:
    """``fn()`` on rank 0 only; every rank returns rank 0's result (it must be picklable).

    In one process (or without an initialised process group) this is ``fn()``. Under a launcher the
    other ranks block in a broadcast until rank 0 is done; they never run ``fn``.

    Raises:
        Exception: on rank 0, whatever ``fn`` raised (after the other ranks were told).
        RankZeroFailed: on the other ranks, when ``fn`` raised on rank 0.
    """
    if not distributed.is_distributed():
        return fn()
    value: T | None = None
    error: BaseException | None = None
    if distributed.is_rank0():
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            error = exc
    got_value, reason = distributed.broadcast_object((value, None if error is None else _reason(error)))
    if error is not None:
        raise error
    if reason is not None:
        raise RankZeroFailed(what, reason)
    return cast(T, got_value)


def agree(error: BaseException | None, what: str) -> None:
    """Every rank says how ``what`` ended; raise on every rank unless all succeeded (no-op in one process).

    A rank that failed re-raises its own error; the others raise ``RuntimeError`` naming the failed
    ranks and their reasons, so that no rank goes on to write.
    """
    if not distributed.is_distributed():
        if error is not None:
            raise error
        return
    reasons = distributed.all_gather_object(None if error is None else _reason(error))
    if error is not None:
        raise error
    failed = [(i, r) for i, r in enumerate(reasons) if r is not None]
    if failed:
        shown = "; ".join(f"rank {i}: {r}" for i, r in failed)
        raise RuntimeError(f"{what} failed on {len(failed)} of {len(reasons)} processes ({shown}); nothing was written")
