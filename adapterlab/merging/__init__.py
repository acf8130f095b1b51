"""Combining adapters (LoRA, SHiRA in sparse form, LoRI by concatenation): linear, task arithmetic, TIES,
DARE (linear / TIES) and RMM.

The layout: :mod:`~adapterlab.merging.merger` (the method interface and registry), one file per method
(``linear``, ``ties``, ``dare``, ``rmm``), :mod:`~adapterlab.merging.routes` (how inputs become an output)
with one file per route (``sparse``, ``concat``, ``dense``; ``basis`` lives with RMM), the result type
(:mod:`~adapterlab.merging.result`) and :func:`~adapterlab.merging.combine.merge_adapters`, which ties them
together. Folding one adapter into its base model is :mod:`adapterlab.folding`.

Adding a method: write ``<method>.py`` with ``@register_merger("name") class ...(Merger)`` and import it
below; a route: ``@register_route("name", order=N) class ...(Route)`` in its own file, imported below.
"""

from __future__ import annotations

from adapterlab.adapters import LoraSource, LoriSource, ShiraSource, resolve_adapter, resolve_adapters
from adapterlab.merging import concat, dare, dense, linear, rmm, sparse, ties  # noqa: F401  (register methods/routes)
from adapterlab.merging.combine import merge_adapters
from adapterlab.merging.dare import DareLinearMerger, DareTiesMerger
from adapterlab.merging.linear import LinearMerger, TaskArithmeticMerger
from adapterlab.merging.merger import MERGERS, MergeContext, Merger, register_merger
from adapterlab.merging.result import MergeResult, ModuleReport
from adapterlab.merging.rmm import RMMBundle, RmmMerger
from adapterlab.merging.routes import ROUTES, Route, register_route
from adapterlab.merging.ties import TiesMerger

__all__ = [
    "MERGERS",
    "ROUTES",
    "DareLinearMerger",
    "DareTiesMerger",
    "LinearMerger",
    "LoraSource",
    "LoriSource",
    "MergeContext",
    "MergeResult",
    "Merger",
    "ModuleReport",
    "RMMBundle",
    "RmmMerger",
    "Route",
    "ShiraSource",
    "TaskArithmeticMerger",
    "TiesMerger",
    "merge_adapters",
    "register_merger",
    "register_route",
    "resolve_adapter",
    "resolve_adapters",
]
