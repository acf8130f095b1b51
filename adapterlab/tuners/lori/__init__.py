"""LoRI: LoRA with reduced interference as a peft tuner (registered on import).

Reference:
    Zhang et al., LoRI, https://arxiv.org/abs/2504.07448.
"""

from __future__ import annotations

from adapterlab.peft_compat import register_tuner
from adapterlab.tuners.lori.config import NAME, PREFIX, LoriConfig
from adapterlab.tuners.lori.functional import (
    concat_factors,
    derive_a_seed,
    from_compact,
    kept_count,
    magnitude_masks,
    random_a,
    to_compact,
)
from adapterlab.tuners.lori.layer import FrozenA, LoriB, LoriLayer
from adapterlab.tuners.lori.model import LoriModel, SparsifyReport

register_tuner(NAME, LoriConfig, LoriModel, prefix=PREFIX)

__all__ = [
    "FrozenA",
    "LoriB",
    "LoriConfig",
    "LoriLayer",
    "LoriModel",
    "SparsifyReport",
    "concat_factors",
    "derive_a_seed",
    "from_compact",
    "kept_count",
    "magnitude_masks",
    "random_a",
    "to_compact",
]
