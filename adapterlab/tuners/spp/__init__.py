"""SPP: sparsity-preserved PEFT as a peft tuner (registered on import).

Reference:
    Lu et al., SPP, https://arxiv.org/abs/2405.16057.
"""

from __future__ import annotations

from adapterlab.peft_compat import register_tuner
from adapterlab.tuners.spp.config import NAME, PREFIX, SppConfig
from adapterlab.tuners.spp.functional import (
    FORWARD_MODES,
    expand_rows,
    merge_factor,
    pattern_digest,
    spp_delta,
    spp_extra,
    zeros_preserved,
)
from adapterlab.tuners.spp.layer import SparsityViolation, SppLayer
from adapterlab.tuners.spp.model import SppModel

register_tuner(NAME, SppConfig, SppModel, prefix=PREFIX)

__all__ = [
    "FORWARD_MODES",
    "SparsityViolation",
    "SppConfig",
    "SppLayer",
    "SppModel",
    "expand_rows",
    "merge_factor",
    "pattern_digest",
    "spp_delta",
    "spp_extra",
    "zeros_preserved",
]
