"""Builders for serving tests: tiny LoRA / SHiRA adapter folders and merged single-adapter oracles."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from adapterlab.models import tiny_llama

HIDDEN = 64


def base_model() -> torch.nn.Module:
    return tiny_llama(hidden_size=HIDDEN, seed=0)


def make_lora(
    path: Path,
    *,
    r: int = 4,
    targets=("q_proj", "v_proj", "down_proj"),
    seed: int = 0,
    rslora: bool = False,
    alpha: float | None = None,
) -> Path:
    """A random (nonzero) peft LoRA of ``base_model()`` saved as a PEFT folder."""
    from peft import LoraConfig, get_peft_model

    model = base_model()
    torch.manual_seed(1000 + seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=list(targets),
        init_lora_weights=False,
        use_rslora=rslora,
    )
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # make the deltas clearly visible in the logits
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    pm.save_pretrained(str(path))
    return path


def make_shira(path: Path, *, k: int = 40, targets=("q_proj", "up_proj"), seed: int = 0) -> Path:
    """A SHiRA adapter folder in peft's layout (``shira_weight`` values, ``shira_indices`` [2, K])."""
    from safetensors.torch import save_file

    model = base_model()
    g = torch.Generator().manual_seed(2000 + seed)
    tensors = {}
    for name, mod in model.named_modules():
        if not any(name.endswith(t) for t in targets):
            continue
        m, n = mod.weight.shape
        flat = torch.randperm(m * n, generator=g)[:k].sort().values
        tensors[f"base_model.model.{name}.shira_indices"] = torch.stack([flat // n, flat % n]).to(torch.int32)
        tensors[f"base_model.model.{name}.shira_weight"] = torch.randn(k, generator=g) * 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "SHIRA", "target_modules": list(targets)}))
    return path


@torch.no_grad()
def merged_lora_model(folder: Path) -> torch.nn.Module:
    """A fresh base with the adapter merged by peft (the single-adapter oracle)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base_model(), str(folder))
    return pm.merge_and_unload().eval()


@torch.no_grad()
def merged_shira_model(folder: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    model = base_model()
    t = load_file(str(folder / "adapter_model.safetensors"))
    for key, idx in t.items():
        if key.endswith("shira_indices"):
            mod = key[len("base_model.model.") : -len(".shira_indices")]
            vals = t[key.replace("shira_indices", "shira_weight")]
            w = model.get_submodule(mod).weight
            w[idx[0].long(), idx[1].long()] += vals
    return model
