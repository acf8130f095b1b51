"""DyLoRA: dynamic search-free low-rank adaptation as a peft tuner (registered on import).

Reference:
    Valipour et al., DyLoRA, https://arxiv.org/abs/2210.07558.
"""

from __future__ import annotations

from adapterlab.peft_compat import register_tuner
from adapterlab.tuners.dylora.config import NAME, PREFIX, DyLoraConfig
from adapterlab.tuners.dylora.functional import sample_rank, truncated_factors
from adapterlab.tuners.dylora.layer import DyLoraLayer, RankComponents
from adapterlab.tuners.dylora.model import DyLoraModel

register_tuner(NAME, DyLoraConfig, DyLoraModel, prefix=PREFIX)

__all__ = ["DyLoraConfig", "DyLoraLayer", "DyLoraModel", "RankComponents", "sample_rank", "truncated_factors"]
