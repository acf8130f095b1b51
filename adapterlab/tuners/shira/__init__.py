"""SHiRA (Sparse High Rank Adapters) as a peft tuner (registered on import as ``adapterlab_shira``).

Reference:
    Bhardwaj et al., Sparse High Rank Adapters, NeurIPS 2024, https://arxiv.org/abs/2406.13175.
"""

from __future__ import annotations

from adapterlab.peft_compat import register_tuner
from adapterlab.tuners.shira.config import NAME, PREFIX, ShiraConfig
from adapterlab.tuners.shira.functional import (
    MASK_TYPES,
    budget,
    mask_indices,
    random_indices,
    scatter_delta,
    sparse_linear,
    struct_indices,
    topk_indices,
)
from adapterlab.tuners.shira.layer import PendingMaskError, ShiraLayer
from adapterlab.tuners.shira.model import (
    CalibrationReport,
    ShiraModel,
    calibrate_masks_,
    from_peft_state_dict,
    is_peft_shira_dir,
    load_shira,
    shira_layers,
)
from adapterlab.tuners.shira.switching import FuseReport, fuse_adapters, switch_adapter, unfuse_adapters

register_tuner(NAME, ShiraConfig, ShiraModel, prefix=PREFIX)

__all__ = [
    "MASK_TYPES",
    "CalibrationReport",
    "FuseReport",
    "PendingMaskError",
    "ShiraConfig",
    "ShiraLayer",
    "ShiraModel",
    "budget",
    "calibrate_masks_",
    "from_peft_state_dict",
    "fuse_adapters",
    "is_peft_shira_dir",
    "load_shira",
    "mask_indices",
    "random_indices",
    "scatter_delta",
    "shira_layers",
    "sparse_linear",
    "struct_indices",
    "switch_adapter",
    "topk_indices",
    "unfuse_adapters",
]
