"""Shared builders for merging / extraction tests: tiny LoRA adapters and hand-written deltas."""

from __future__ import annotations

from pathlib import Path

import torch

from adapterlab.adapters import LoraModule, LoraSource


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


#: LoRA factors on the grid ``k · 2^-10`` (|k| <= 127) with ``lora_alpha / r = 2``: exact in fp32, bf16 and
#: fp16, and every ``s · B @ A`` (|Σ| < 2^16 · 2^-20) and sums of a few of them are exact in fp32, so an
#: oracle in fp64 equals the library's fp32 delta bit for bit, whatever the summation order.
DYADIC_STEP = 2.0**-10


def dyadic_(pm, seed: int) -> None:
    """Give every LoRA factor of a peft model exact grid values (see :data:`DYADIC_STEP`), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                k = torch.randint(-127, 128, p.shape, generator=g).to(torch.float64)
                p.copy_((k * DYADIC_STEP).to(p.dtype))


def make_dyadic_lora_dirs(
    root: Path,
    n: int = 2,
    *,
    dtype: torch.dtype = torch.float32,
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"),
    seed: int = 0,
) -> list[Path]:
    """n LoRA adapters (r = 4, α = 8) of ``tiny_llama(dtype=dtype)`` whose saved tensors are ``dtype``
    (an adapter saved from a half base, no fp32 autocast) with grid values (:func:`dyadic_`)."""
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    paths = []
    for i in range(n):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
        pm = get_peft_model(tiny_llama(dtype=dtype), cfg, autocast_adapter_dtype=False)
        dyadic_(pm, seed + 7 * i)
        path = root / f"{str(dtype).removeprefix('torch.')}_task{i}"
        pm.save_pretrained(str(path))
        paths.append(path)
    return paths


def oracle_deltas(paths: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Brute force from the saved factors: module -> ``Σ_t w_t (α_t / r_t) B_t A_t`` in fp64 (exact for
    :func:`make_dyadic_lora_dirs` adapters and dyadic weights), weight layout."""
    import json

    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for w, path in zip(weights, paths):
        cfg = json.loads((path / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        tensors = load_file(str(path / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            mod = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            d = torch.einsum("ik,kj->ij", b.double(), a.double()) * (w * scale)  # [d_out, r] x [r, d_in]
            out[mod] = out.get(mod, torch.zeros_like(d)) + d
    return out
