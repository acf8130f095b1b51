"""Pruning for sparse bases: magnitude, Wanda, SparseGPT; unstructured or N:M.

``prune_`` prunes a model in memory; ``prune_checkpoint`` prunes a safetensors model folder one decoder
block at a time (models larger than memory) with the same result.

Adding a method: write ``<method>.py`` with ``@register_pruner("name") class ...(Pruner)`` and
import it below.
"""

from __future__ import annotations

from adapterlab.pruning import magnitude, sparsegpt, wanda  # noqa: F401  (registers the methods)
from adapterlab.pruning._streamed import StreamedPrune, prune_checkpoint
from adapterlab.pruning.functional import check_nm, parse_pattern
from adapterlab.pruning.magnitude import MagnitudePruner
from adapterlab.pruning.pruner import (
    PRUNERS,
    LayerSparsity,
    Pruner,
    PruneReport,
    apply_masks_,
    get_masks,
    load_masks,
    mask_hash,
    prunable_linears,
    prune_,
    register_pruner,
    save_masks,
    sparsity_of,
)
from adapterlab.pruning.sparsegpt import SparseGPTPruner
from adapterlab.pruning.wanda import WandaPruner

__all__ = [
    "PRUNERS",
    "LayerSparsity",
    "MagnitudePruner",
    "PruneReport",
    "Pruner",
    "SparseGPTPruner",
    "StreamedPrune",
    "WandaPruner",
    "apply_masks_",
    "check_nm",
    "get_masks",
    "load_masks",
    "mask_hash",
    "parse_pattern",
    "prunable_linears",
    "prune_",
    "prune_checkpoint",
    "register_pruner",
    "save_masks",
    "sparsity_of",
]
