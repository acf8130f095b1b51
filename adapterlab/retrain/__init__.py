"""Retraining after pruning: PERP (parameter-efficient retraining) and the prune -> retrain -> merge pipeline."""

from __future__ import annotations

from adapterlab.retrain.perp import (
    PRESETS,
    SUBSETS,
    HeadLoRA,
    MaskLoRALinear,
    PerpMergeReport,
    PerpReport,
    ScaleLoRALinear,
    has_perp_layers,
    merge_perp_,
    perp_,
    perp_state_dict,
    resolve_scope,
)
from adapterlab.retrain.pipeline import PerpPipelineResult, RetrainResult, retrain_, run_perp_pipeline

__all__ = [
    "PRESETS",
    "SUBSETS",
    "HeadLoRA",
    "MaskLoRALinear",
    "PerpMergeReport",
    "PerpPipelineResult",
    "PerpReport",
    "RetrainResult",
    "ScaleLoRALinear",
    "has_perp_layers",
    "merge_perp_",
    "perp_",
    "perp_state_dict",
    "resolve_scope",
    "retrain_",
    "run_perp_pipeline",
]
