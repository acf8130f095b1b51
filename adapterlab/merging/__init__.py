"""Merging adapters (LoRA, SHiRA in sparse form, LoRI by concatenation): linear, task arithmetic, TIES,
DARE (linear / TIES) and RMM.

Adding a method: write ``<method>.py`` with ``@register_merger("name") class ...(Merger)`` and
import it below.
"""

from __future__ import annotations

from adapterlab.adapters import LoraSource, LoriSource, ShiraSource, resolve_adapter, resolve_adapters
from adapterlab.merging import dare, linear, rmm, ties  # noqa: F401  (registers the methods)
from adapterlab.merging.base import (
    MERGERS,
    MergeContext,
    Merger,
    MergeResult,
    ModuleReport,
    merge_adapters,
    register_merger,
)
from adapterlab.merging.dare import DareLinearMerger, DareTiesMerger
from adapterlab.merging.linear import LinearMerger, TaskArithmeticMerger
from adapterlab.merging.rmm import RMMBundle, RmmMerger
from adapterlab.merging.ties import TiesMerger

__all__ = [
    "MERGERS",
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
    "ShiraSource",
    "TaskArithmeticMerger",
    "TiesMerger",
    "merge_adapters",
    "register_merger",
    "resolve_adapter",
    "resolve_adapters",
]
