"""Small PEFT adapters of tiny models for registry tests."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = ("q_proj", "v_proj")


def lora_dir(path: Path, seed: int = 0, *, r: int = 2, hidden_size: int = 32) -> Path:
    """A nonzero LoRA adapter of ``tiny_llama(hidden_size=...)`` saved at ``path``."""
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    model = tiny_llama(hidden_size=hidden_size)
    torch.manual_seed(seed)  # after tiny_llama, which seeds its own init
    pm = get_peft_model(
        model,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS), init_lora_weights=False),
    )
    pm.save_pretrained(str(path))
    return path
