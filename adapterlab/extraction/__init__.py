"""Adapter extraction from full checkpoints (PHLoRA)."""

from __future__ import annotations

from adapterlab.extraction.functional import LowRankFactors, energy_rank, low_rank_factors, retained_energy
from adapterlab.extraction.phlora import ExtractResult, ModuleExtraction, extract_lora

__all__ = [
    "ExtractResult",
    "LowRankFactors",
    "ModuleExtraction",
    "energy_rank",
    "extract_lora",
    "low_rank_factors",
    "retained_energy",
]
