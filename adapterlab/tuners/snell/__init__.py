"""SNELL: sparse tuning with a kernelized low-rank delta, as a peft tuner (registered on import).

Reference:
    Shen et al., SNELL, https://arxiv.org/abs/2411.01800; SNELLA, https://arxiv.org/abs/2510.24037.
"""

from __future__ import annotations

from adapterlab.peft_compat import register_tuner
from adapterlab.tuners.snell.config import NAME, PREFIX, SnellConfig
from adapterlab.tuners.snell.functional import (
    allocate_budget,
    budget_schedule,
    head_coefficients,
    importance,
    keep_count,
    keep_mask,
    keep_threshold,
    kernel_matrix,
    mask_from_threshold,
    sparsify,
    tie_threshold,
)
from adapterlab.tuners.snell.layer import SnellLayer
from adapterlab.tuners.snell.model import SnellModel

register_tuner(NAME, SnellConfig, SnellModel, prefix=PREFIX)

__all__ = [
    "SnellConfig",
    "SnellLayer",
    "SnellModel",
    "allocate_budget",
    "budget_schedule",
    "head_coefficients",
    "importance",
    "keep_count",
    "keep_mask",
    "keep_threshold",
    "kernel_matrix",
    "mask_from_threshold",
    "sparsify",
    "tie_threshold",
]
