"""Shared builders for merging / extraction tests: tiny LoRA adapters and hand-written deltas."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterlab.merging.adapters import LoraModule, LoraSource


def delta_source(name: str, deltas: dict[str, list[list[float]] | torch.Tensor]) -> LoraSource:
    """A LoraSource whose module deltas are exactly the given matrices (B = delta, A = I, scale 1)."""
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, LoraModule] = {}
    for mod, value in deltas.items():
        d = torch.as_tensor(value, dtype=torch.float32)
        d = d.reshape(1, -1) if d.dim() == 1 else d
        tensors[f"{mod}.A"], tensors[f"{mod}.B"] = torch.eye(d.shape[1]), d
        modules[mod] = LoraModule(mod, f"{mod}.A", f"{mod}.B", d.shape[1], 1.0, False, False, tuple(d.shape))
    return LoraSource(name, {"peft_type": "LORA"}, modules, tensors.__getitem__)


def make_lora_dirs(
    root: Path,
    n: int = 3,
    *,
    r: int = 4,
    hidden_size: int = 64,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    rslora_every: int = 2,
    seed: int = 0,
) -> list[Path]:
    """n random (nonzero) LoRA adapters of ``tiny_llama(hidden_size=...)`` saved as PEFT folders."""
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    paths = []
    for i in range(n):
        model = tiny_llama(hidden_size=hidden_size)
        torch.manual_seed(seed + 100 + i)
        cfg = LoraConfig(
            r=r,
            lora_alpha=2 * r + i,
            target_modules=list(targets),
            init_lora_weights=False,
            use_rslora=(i % rslora_every == 1),
        )
        pm = get_peft_model(model, cfg)
        path = root / f"task{i}"
        pm.save_pretrained(str(path))
        paths.append(path)
    return paths
