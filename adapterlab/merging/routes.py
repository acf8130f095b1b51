"""Routes: how T adapters become one output, chosen from the inputs.

A route is a small registered class (``@register_route("name", order=N)``): :meth:`Route.accepts`
says whether it can merge these inputs into the requested output, :meth:`Route.check` validates the
options that apply to it, and :meth:`Route.run` produces the :class:`~adapterlab.merging.result.MergeResult`.
:func:`choose_route` takes the merger's own route when it names one (RMM: ``"basis"``), else the
first route by ``order`` that accepts. The routes are

* ``sparse`` (:mod:`adapterlab.merging.sparse`): all-SHiRA inputs merged on the union support;
* ``concat`` (:mod:`adapterlab.merging.concat`): all-LoRI inputs, linear methods, exact concatenation;
* ``basis`` (:mod:`adapterlab.merging.rmm`): a shared basis that keeps every task;
* ``dense`` (:mod:`adapterlab.merging.dense`): per-module dense deltas, for everything else.

Adding a route touches its own file: subclass :class:`Route`, register it, import it in
``adapterlab/merging/__init__.py``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from adapterlab._named import Registry
from adapterlab.adapters import LoraSource
from adapterlab.merging.merger import Merger, check_fraction
from adapterlab.merging.result import MergeResult
from adapterlab.progress import ProgressFactory

logger = logging.getLogger(__name__)

__all__ = ["ROUTES", "SPARSE_OUTPUTS", "MergePlan", "Route", "choose_route", "register_route"]

#: Outputs the sparse form can give (a SHiRA adapter, adapterlab's sparse delta, or a merged base).
SPARSE_OUTPUTS = ("shira", "sparse", "full")


@dataclass
class MergePlan:
    """Everything a route is chosen from and runs on (built by :func:`~adapterlab.merging.combine.merge_adapters`).

    Attributes:
        shapes: module name -> weight shape (union over the adapters, sorted).
        weights: ``[T]`` fp32 task weights.
        output: the output form (resolved from the inputs by :func:`choose_route` when None).
        model: ``output="full"``: the copy of the base the merge is written into, else None (set after
            :meth:`Route.check`, so a bad option never loads the base).
        common: the :class:`MergeResult` fields every route fills the same way (sources, shapes, dtype, ...).
        notes: warnings already raised for this merge (kept in the result).
    """

    sources: list[LoraSource]
    shapes: dict[str, tuple[int, int]]
    merger: Merger
    weights: Tensor
    output: str | None
    rank: int | None = None
    energy: float | None = None
    factorwise: bool = False
    drop_zeros: bool = False
    keep_sparsity: bool = False
    model: nn.Module | None = None
    progress: ProgressFactory | None = None
    common: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def kinds(self) -> list[str]:
        return [s.kind for s in self.sources]


class Route(ABC):
    """One way of merging. Subclasses register with :func:`register_route`."""

    name: ClassVar[str] = ""
    #: tried in increasing order when the merger names no route of its own
    order: ClassVar[int] = 100

    @classmethod
    def accepts(cls, plan: MergePlan) -> bool:
        """Whether this route merges these inputs into ``plan.output``."""
        return False

    @classmethod
    def check(cls, plan: MergePlan) -> None:
        """Validate the options for this route (default: those of a low-rank / sparse / full output)."""
        rank, energy, output = plan.rank, plan.energy, plan.output
        if rank is not None and energy is not None:
            raise ValueError("rank/energy: give at most one of rank and energy")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if energy is not None:
            check_fraction("energy", energy)
        if output != "lora" and (rank is not None or energy is not None):
            raise ValueError(f"rank/energy apply to output='lora' only, not {output!r}")

    @classmethod
    @abstractmethod
    def run(cls, plan: MergePlan) -> MergeResult:
        """Merge and return the result (``seconds`` is set by the caller)."""


#: Registry of merge routes (sparse, concat, basis, dense).
ROUTES: Registry[type[Route]] = Registry("merge route")


def register_route(name: str, *, order: int) -> Callable[[type[Route]], type[Route]]:
    """Class decorator: ``@register_route("sparse", order=10) class SparseFormRoute(Route): ...``."""

    def deco(cls: type[Route]) -> type[Route]:
        cls.name, cls.order = name, order
        return ROUTES.register(name)(cls)

    return deco


def _label(sources: Sequence[LoraSource], i: int) -> str:
    return f"adapters[{i}] ({sources[i].name!r}, {sources[i].peft_type or sources[i].kind})"


def choose_route(plan: MergePlan) -> tuple[type[Route], str | None]:
    """Pick the route: the merger's own (``Merger.route``), else the first registered route, by
    :attr:`Route.order`, that accepts the inputs (sparse form, concatenation, then dense deltas).

    ``plan.output`` None is resolved here to the default of the inputs (``shira`` for all-SHiRA inputs of
    a sparse-form method, ``lori`` for all-LoRI linear merges, else ``lora``).

    Returns:
        ``(route class, why)``: ``why`` is a one-line reason when SHiRA inputs fall back to dense
        deltas because other adapter types are mixed in (the caller warns with it), else None.

    Raises:
        ValueError: an output or method the inputs cannot give (naming an offending adapter).
    """
    sources, merger, output = plan.sources, plan.merger, plan.output
    kinds = plan.kinds
    all_shira, all_lori = set(kinds) == {"shira"}, set(kinds) == {"lori"}
    linear = merger.linear_coefficients(plan.weights) is not None
    if output is None:
        output = "shira" if all_shira and merger.sparse_form else "lori" if all_lori and linear else "lora"
    if "shira" in kinds:
        i = kinds.index("shira")
        if not merger.sparse_form or plan.factorwise:
            what = f"merge method {merger.name!r}" if not merger.sparse_form else "factorwise=True"
            raise ValueError(
                f"{_label(sources, i)}: {what} needs low-rank factors, which a SHiRA adapter has not; use linear, "
                f"task_arithmetic, ties, dare_linear or dare_ties"
            )
    if output == "shira" and not all_shira:
        i = next(j for j, k in enumerate(kinds) if k != "shira")
        raise ValueError(f"output='shira' needs every adapter to be a SHiRA adapter; {_label(sources, i)} is not")
    if output == "lori" and not (all_lori and linear):
        if not all_lori:
            i = next(j for j, k in enumerate(kinds) if k != "lori")
            raise ValueError(f"output='lori' needs every adapter to be a LoRI adapter; {_label(sources, i)} is not")
        raise ValueError(
            f"output='lori' is the exact concatenation of linear / task_arithmetic merges, not {merger.name!r}; "
            f"use output='lora', 'sparse' or 'full'"
        )
    why = None
    if "shira" in kinds and not all_shira:
        i, j = kinds.index("shira"), next(j for j, k in enumerate(kinds) if k != "shira")
        why = (
            f"merge_adapters: {_label(sources, i)} is SHiRA but {_label(sources, j)} is not; sparse-form merging "
            f"needs every adapter to be SHiRA, so dense deltas are merged per module instead"
        )
    plan.output = output
    if merger.route is not None:
        return ROUTES.get(merger.route), why
    if all_shira and output not in SPARSE_OUTPUTS:
        logger.info("output=%r for SHiRA adapters: dense deltas, then a truncated SVD (lossy below full rank)", output)
    for route in sorted((ROUTES.get(n) for n in ROUTES.names()), key=lambda r: r.order):
        if route.accepts(plan):
            return route, why
    raise RuntimeError("no merge route accepts these inputs (the dense route should accept every input)")
