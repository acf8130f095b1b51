"""Builders for the export tests: one adapter folder of every kind on a pruned tiny base (random, nonzero
values), and each kind's true delta computed independently from the saved tensors (safetensors + JSON)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."
TARGETS = ["q_proj", "v_proj"]
KINDS = ("lora", "rslora", "lori", "lori-s", "dylora", "shira", "snell", "spp", "lors")
DENSE = ("shira", "snell", "spp", "lors")
_ADAPTER_PARTS = ("lora_", "lori_", "dylora_", "adapterlab_shira", "snell_", "spp_", "lors_")


def base_model():
    """tiny_llama with every linear layer of the blocks magnitude-pruned to 50% (SPP / LoRS see the zeros)."""
    from adapterlab import prune_
    from adapterlab.models import tiny_llama

    model = tiny_llama(seed=3)
    prune_(model, "magnitude", 0.5)
    return model


def save_base(root: Path) -> Path:
    path = root / "base"
    if not path.exists():
        base_model().save_pretrained(str(path))
    return path


def _config(kind: str):
    from peft import LoraConfig

    from adapterlab import DyLoraConfig, LoriConfig, LorsConfig, ShiraConfig, SnellConfig, SppConfig

    if kind in ("lora", "rslora"):
        return LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, use_rslora=kind == "rslora")
    if kind in ("lori", "lori-s"):
        return LoriConfig(r=4, lora_alpha=6.0, target_modules=TARGETS, store_a=True, a_seed=5)
    return {
        "dylora": lambda: DyLoraConfig(r=6, r_min=1, lora_alpha=5.0, target_modules=TARGETS),
        "shira": lambda: ShiraConfig(r=4, target_modules=TARGETS),
        "snell": lambda: SnellConfig(r=4, sparsity=0.3, target_modules=TARGETS),
        "spp": lambda: SppConfig(r=4, groups=4, target_modules=TARGETS),
        "lors": lambda: LorsConfig(r=4, lora_alpha=6.0, target_modules=TARGETS),
    }[kind]()


def make_adapter(kind: str, root: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """One adapter folder of ``kind`` (random nonzero trainable values, stored in ``dtype``) on :func:`base_model`."""
    from peft import get_peft_model

    path = root / f"{kind}-{str(dtype).removeprefix('torch.')}-{seed}"
    if path.exists():
        return path
    save_base(root)
    pm = get_peft_model(base_model(), _config(kind))
    gen = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    if kind == "lori-s":
        pm.base_model.sparsify_(0.5)
    if dtype != torch.float32:  # the adapter's tensors in dtype (the base stays fp32)
        for name, p in [*pm.named_parameters(), *pm.named_buffers()]:
            if p.is_floating_point() and "base_layer" not in name and any(f".{x}" in name for x in _ADAPTER_PARTS):
                p.data = p.data.to(dtype)
    pm.save_pretrained(str(path))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(root / "base")
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def _mods(t: dict[str, torch.Tensor], suffix: str) -> list[str]:
    return sorted(k[len(PREFIX) : -len(suffix)] for k in t if k.endswith(suffix))


def true_deltas(folder: Path, base: Path | None = None, dylora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """module -> the adapter's delta (fp64), from its files alone (each kind's formula written out)."""
    t = {
        k: v.double() if v.is_floating_point() else v
        for k, v in load_file(str(folder / "adapter_model.safetensors")).items()
    }
    cfg = json.loads((folder / "adapter_config.json").read_text())
    pt = cfg["peft_type"].upper()
    W = {}
    if base is not None:
        W = {k[: -len(".weight")]: v.double() for k, v in load_file(str(base / "model.safetensors")).items()}
    out: dict[str, torch.Tensor] = {}
    if pt == "LORA":
        for m in _mods(t, ".lora_A.weight"):
            A, B = t[f"{PREFIX}{m}.lora_A.weight"], t[f"{PREFIX}{m}.lora_B.weight"]
            r = A.shape[0]
            s = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
            out[m] = s * B @ A
    elif pt == "ADAPTERLAB_LORI":
        r, s = cfg["r"], cfg["lora_alpha"] / cfg["r"]
        for m in _mods(t, ".lori_A.weight"):
            A = t[f"{PREFIX}{m}.lori_A.weight"]
            d_out = int(t[f"{PREFIX}{m}.lori_B.dims"][0])
            if f"{PREFIX}{m}.lori_B.values" in t:
                B = torch.zeros(d_out * r, dtype=torch.float64)
                B[t[f"{PREFIX}{m}.lori_B.indices"].long()] = t[f"{PREFIX}{m}.lori_B.values"]
                B = B.view(d_out, r)
            else:
                B = t[f"{PREFIX}{m}.lori_B.weight"]
            out[m] = s * B @ A
    elif pt == "ADAPTERLAB_SHIRA":
        for m in _mods(t, ".adapterlab_shira_values"):
            d_out, d_in = (int(x) for x in t[f"{PREFIX}{m}.adapterlab_shira_dims"])
            D = torch.zeros(d_out * d_in, dtype=torch.float64)
            D[t[f"{PREFIX}{m}.adapterlab_shira_indices"].long()] = t[f"{PREFIX}{m}.adapterlab_shira_values"]
            out[m] = D.view(d_out, d_in)
    elif pt == "ADAPTERLAB_DYLORA":
        b = dylora_rank or cfg.get("eval_rank") or cfg["r"]
        for m in _mods(t, ".dylora_A.weight"):
            A, B = t[f"{PREFIX}{m}.dylora_A.weight"][:b], t[f"{PREFIX}{m}.dylora_B.weight"][:, :b]
            out[m] = cfg["lora_alpha"] / b * B @ A
    elif pt == "ADAPTERLAB_SNELL":
        c = cfg["coeff"]
        for m in _mods(t, ".snell_P"):
            P, Q = t[f"{PREFIX}{m}.snell_P"], t[f"{PREFIX}{m}.snell_Q"]  # (H, n, d), (H, m, d)
            H = P.shape[0]
            dist = ((P[:, :, None, :] - Q[:, None, :, :]) ** 2).sum(-1).sqrt()  # (H, n, m), the p=2 distance
            K = sum(c * (-1) ** h * dist[h] for h in range(H))  # (n, m)
            keep = int(t[f"{PREFIX}{m}.snell_keep"])
            order = K.abs().flatten().argsort(descending=True)
            mask = torch.zeros(K.numel(), dtype=torch.bool)
            mask[order[:keep]] = True
            out[m] = (K * mask.view_as(K)).T  # (m, n) like W
    elif pt == "ADAPTERLAB_SPP":
        s = cfg["lora_alpha"] / cfg["r"]
        for m in _mods(t, ".spp_alpha"):
            alpha, beta = t[f"{PREFIX}{m}.spp_alpha"], t[f"{PREFIX}{m}.spp_beta"]  # (g, d_in), (d_out, 1)
            w = W[m]
            rows = torch.stack([alpha[i // (w.shape[0] // alpha.shape[0])] for i in range(w.shape[0])])
            out[m] = s * beta * rows * w
    elif pt == "ADAPTERLAB_LORS":
        s = cfg["lora_alpha"] / math.sqrt(cfg["r"])
        for m in _mods(t, ".lors_A"):
            out[m] = s * (t[f"{PREFIX}{m}.lors_B"] @ t[f"{PREFIX}{m}.lors_A"]) * (W[m] != 0)
    else:  # pragma: no cover
        raise AssertionError(pt)
    return out


def written_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """module -> ``scale · lora_B @ lora_A`` (fp64) of a written PEFT LoRA folder, read from its files."""
    t = {k: v.double() for k, v in load_file(str(folder / "adapter_model.safetensors")).items()}
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    out = {}
    for m in _mods(t, ".lora_A.weight"):
        A, B = t[f"{PREFIX}{m}.lora_A.weight"], t[f"{PREFIX}{m}.lora_B.weight"]
        r = (cfg.get("rank_pattern") or {}).get(m, cfg["r"])
        alpha = (cfg.get("alpha_pattern") or {}).get(m, cfg["lora_alpha"])
        assert A.shape[0] == r
        out[m] = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r) * B @ A
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
