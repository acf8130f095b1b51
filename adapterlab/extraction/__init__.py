"""Adapter extraction from full checkpoints (PHLoRA) and compensation adapters for compressed bases (EoRA)."""

from __future__ import annotations

from adapterlab.extraction.compensate import CompensationResult, ModuleCompensation, compensate
from adapterlab.extraction.functional import LowRankFactors, energy_rank, low_rank_factors, retained_energy
from adapterlab.extraction.phlora import ExtractResult, ModuleExtraction, extract_lora

__all__ = [
    "CompensationResult",
    "ExtractResult",
    "LowRankFactors",
    "ModuleCompensation",
    "ModuleExtraction",
    "compensate",
    "energy_rank",
    "extract_lora",
    "low_rank_factors",
    "retained_energy",
]
