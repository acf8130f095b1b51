"""The merge-method interface: :class:`Merger`, its registry and the contexts a method merges from.

A method is a dataclass of names and numbers that subclasses :class:`Merger` and is registered with
``@register_merger("name")``; it sees one module at a time through a :class:`MergeContext` (dense
deltas or factors, ``[T, ...]``) or a :class:`SparseMergeContext` (SHiRA values on the union support,
``[T, U]``). How the merged parts become an output is the route's business
(:mod:`adapterlab.merging.routes`), not the method's.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from adapterlab._named import Registry
from adapterlab.adapters import LoraSource
from adapterlab.merging.functional import union_support
from adapterlab.progress import ProgressFactory, track

__all__ = [
    "ALIASES",
    "MERGERS",
    "OUTPUTS",
    "MergeContext",
    "Merger",
    "PartSink",
    "SparseMergeContext",
    "check_choice",
    "check_fraction",
    "check_number",
    "register_merger",
]

#: Registry of merge methods (linear, task_arithmetic, ties, dare_linear, dare_ties, rmm).
MERGERS: Registry[type[Merger]] = Registry("merge method")
#: Output forms: those of a dense merge, then ``shira`` (all-SHiRA inputs) and ``lori`` (all-LoRI, linear).
OUTPUTS = ("lora", "sparse", "full", "shira", "lori")
#: Parameter aliases accepted from YAML / kwargs (``lambda`` is a Python keyword).
ALIASES = {"lambda": "lambda_", "K": "n_basis"}


def register_merger(name: str) -> Callable[[type[Merger]], type[Merger]]:
    """Class decorator: ``@register_merger("ties") class TiesMerger(Merger): ...``."""

    def deco(cls: type[Merger]) -> type[Merger]:
        cls.name = name
        return MERGERS.register(name)(cls)

    return deco


def check_fraction(where: str, value: Any, *, low_open: bool = True) -> float:
    """A number in (0, 1]; the error names the key path."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number in (0, 1], got {value!r}")
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{where} must be in (0, 1], got {value}")
    return float(value)


def check_choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{where} is {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def check_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------
# contexts: the per-module stream of task tensors


@dataclass
class MergeContext:
    """What a merger sees: the sources, the union of modules, weights and the tensor stream.

    Attributes:
        sources: the T adapters.
        shapes: module name -> weight shape (union over adapters, sorted).
        weights: ``[T]`` fp32 task weights (the method's default if the caller gave none).
        factorwise: stream ``{"B": [T, d_out, r], "A": [T, r, d_in]}`` instead of ``{"delta": [T, d_out, d_in]}``.
    """

    sources: list[LoraSource]
    shapes: dict[str, tuple[int, int]]
    weights: Tensor
    factorwise: bool = False
    progress: ProgressFactory | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.sources)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("B", "A") if self.factorwise else ("delta",)

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The T task tensors of one module, fp32 (zeros for adapters that do not target it)."""
        shape = self.shapes[name]
        if not self.factorwise:
            return {
                "delta": torch.stack(
                    [s.delta(name) if name in s.modules else torch.zeros(shape) for s in self.sources]
                )  # [T, d_out, d_in]
            }
        bs, as_ = [], []
        for s in self.sources:
            m = s.modules[name]
            b, a = s.factors(name)
            root = math.sqrt(abs(m.scale))  # peft's factor-wise split: sqrt(scale) on both factors
            bs.append(b / root)
            as_.append(a * root)
        return {"B": torch.stack(bs), "A": torch.stack(as_)}  # [T, d_out, r], [T, r, d_in]

    def part_weights(self, part: str) -> Tensor:
        """Weights per part: the task weights; factor-wise ``sign(w)√|w|`` on B and ``√|w|`` on A."""
        if part == "delta":
            return self.weights
        root = self.weights.abs().sqrt()
        return root * torch.sign(self.weights) if part == "B" else root

    def stream(self, description: str) -> Iterator[tuple[str, dict[str, Tensor]]]:
        for name in track(list(self.shapes), description, progress=self.progress):
            yield name, self.tensors(name)


@dataclass
class SparseMergeContext:
    """What a merger sees in sparse form: per module the ``[T, U]`` values on the union support.

    Attributes:
        sources: the T SHiRA adapters.
        shapes: module name -> weight shape (union over adapters, sorted).
        weights: ``[T]`` fp32 task weights.
        supports: module name -> union support ``[U]`` (int64 flat indices), filled while streaming.
    """

    sources: list[Any]
    shapes: dict[str, tuple[int, int]]
    weights: Tensor
    progress: ProgressFactory | None = None
    supports: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return len(self.sources)

    def tensors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``union [U]``, values ``[T, U]`` fp32 and ``stored [T, U]`` bool of one module."""
        idx, val = [], []
        for s in self.sources:
            if name in s.modules:
                i, v = s.entries(name)
            else:
                i, v = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
            idx.append(i)
            val.append(v)
        union, x, stored = union_support(idx, val)  # [U], [T, U], [T, U]
        self.supports[name] = union
        return union, x, stored

    def stream(self, description: str) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(module, x [T, U], stored [T, U])`` per module, one module in memory at a time."""
        for name in track(list(self.shapes), description, progress=self.progress):
            _, x, stored = self.tensors(name)
            yield name, x, stored


class PartSink(Protocol):
    """Where :meth:`Merger.run` puts each merged module part (the dense route's sink)."""

    def put(self, name: str, part: str, value: Tensor) -> None: ...


# ------------------------------------------------------------------------------------------------
# the Merger interface


class Merger(ABC):
    """One merge method. Subclasses are dataclasses of names and numbers (validated in
    ``__post_init__``) and call the tensor math in :mod:`adapterlab.merging.functional`.

    The default :meth:`run` streams modules: :meth:`prepare` (optional extra passes), then
    :meth:`merge` per module part, then :meth:`finish` for anything deferred.
    """

    name: ClassVar[str] = ""
    #: ``"ones"`` (task arithmetic, TIES, DARE) or ``"mean"`` (linear: 1/T each) when weights=None.
    default_weights: ClassVar[str] = "ones"
    #: False for methods that keep per-task information instead of one merged delta (RMM).
    takes_weights: ClassVar[bool] = True
    #: True when :meth:`merge_sparse` is valid: SHiRA adapters then merge on the union of their supports.
    sparse_form: ClassVar[bool] = False
    #: The route a method always takes (``"basis"`` for RMM, which keeps every task), or None to let
    #: :func:`adapterlab.merging.routes.choose_route` pick one from the inputs.
    route: ClassVar[str | None] = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str = "params") -> Merger:
        """Build from a dict; unknown keys raise an error naming ``where.key`` and the allowed keys."""
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            real = ALIASES.get(key, key) if ALIASES.get(key, key) in allowed else key
            if real not in allowed:
                shown = sorted("lambda" if a == "lambda_" else a for a in allowed)
                raise ValueError(
                    f"{where}.{key}: unknown parameter for merge method {cls.name!r}; "
                    f"allowed: {', '.join(shown) or '(none)'}"
                )
            kwargs[real] = value
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        if "lambda_" in out:
            out["lambda"] = out.pop("lambda_")
        return out

    def prepare(self, ctx: MergeContext) -> None:
        """Optional passes over ``ctx.stream`` before merging (whole-model statistics)."""

    @abstractmethod
    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor | None:
        """Merge one module part: ``x [T, *shape]`` -> ``[*shape]``, or None to defer to :meth:`finish`."""

    def finish(self) -> dict[tuple[str, str], Tensor]:
        """The deferred parts, once whole-model information is complete."""
        return {}

    # -- sparse form (SHiRA inputs) and exact concatenation (LoRI inputs) ----------------------
    def linear_coefficients(self, weights: Tensor) -> Tensor | None:
        """``c [T]`` with ``merged = Σ_t c_t ΔW_t`` for a fixed linear combination (linear, task
        arithmetic), else None. Such methods merge LoRI adapters exactly by concatenating factors."""
        return None

    def prepare_sparse(self, ctx: SparseMergeContext) -> None:
        """Optional passes over ``ctx.stream`` (sparse form) before merging."""

    def merge_sparse(self, key: tuple[str, str], x: Tensor, stored: Tensor, weights: Tensor) -> Tensor | None:
        """Merge one module in sparse form (only called when :attr:`sparse_form` is True).

        Args:
            key: ``(module, "values")``.
            x: ``[T, U]`` values on the union support of the module (0 where a task stores nothing).
            stored: ``[T, U]`` bool, where each task stores an entry (trim / drop work among these).
            weights: ``[T]``.

        Returns:
            ``[U]``, or None to defer to :meth:`finish`. The default suits element-wise methods: an entry
            a task does not store is a zero of its delta.
        """
        return self.merge(key, x, weights)

    def run(self, ctx: MergeContext, sink: PartSink) -> None:
        self.prepare(ctx)
        for name, parts in ctx.stream(f"{self.name}: merging"):
            for part, x in parts.items():
                out = self.merge((name, part), x, ctx.part_weights(part))
                if out is not None:
                    sink.put(name, part, out)
        for (name, part), out in self.finish().items():
            sink.put(name, part, out)
