"""LoRS: sparsity-preserving LoRA with weight recompute as a peft tuner (registered on import).

Reference:
    Hu et al., LoRS, https://arxiv.org/abs/2501.08582.
"""

from __future__ import annotations

from adapterlab.peft_compat import register_tuner
from adapterlab.tuners.lors.config import NAME, PREFIX, LorsConfig
from adapterlab.tuners.lors.functional import (
    GRAD_MODES,
    LorsLinearFunction,
    effective_weight,
    gradient_init_a,
    lors_linear,
    masked_delta,
)
from adapterlab.tuners.lors.layer import LorsLayer
from adapterlab.tuners.lors.model import LorsInitReport, LorsModel

register_tuner(NAME, LorsConfig, LorsModel, prefix=PREFIX)

__all__ = [
    "GRAD_MODES",
    "LorsConfig",
    "LorsInitReport",
    "LorsLayer",
    "LorsLinearFunction",
    "LorsModel",
    "effective_weight",
    "gradient_init_a",
    "lors_linear",
    "masked_delta",
]
