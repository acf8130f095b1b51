"""Progress reporting for long library work without printing from the library.

Library functions take an optional ``progress`` argument: a callable ``(description, total)`` that
returns a ``step(n=1)`` callable. The CLI passes a rich-backed one; the default is tqdm-free and
silent unless logging is at DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar, cast

T = TypeVar("T")
logger = logging.getLogger("adapterlab")

ProgressFactory = Callable[[str, int | None], Callable[[int], None]]


def _silent(description: str, total: int | None) -> Callable[[int], None]:
    logger.debug("%s (%s steps)", description, total)
    return cast("Callable[[int], None]", lambda n=1: None)  # mypy cannot infer a lambda with a default


_default: ProgressFactory = _silent


def set_default_progress(factory: ProgressFactory | None) -> None:
    """Install a process-wide progress factory (the CLI installs a rich one)."""
    global _default
    _default = factory or _silent


def track(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    progress: ProgressFactory | None = None,
) -> Iterator[T]:
    """Iterate ``items`` while advancing a progress bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    step = (progress or _default)(description, total)
    for item in items:
        yield item
        step(1)


def rich_factory(prog: object) -> ProgressFactory:
    """Adapt a ``rich.progress.Progress`` into a :data:`ProgressFactory`."""

    def factory(description: str, total: int | None) -> Callable[[int], None]:
        task = prog.add_task(description, total=total)  # type: ignore[attr-defined]

        def step(n: int = 1) -> None:
            prog.advance(task, n)  # type: ignore[attr-defined]

        return step

    return factory
