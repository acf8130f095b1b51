"""Writing PEFT LoRA folders (merge and extraction outputs), staged through :mod:`adapterlab.staging`.

Factors are given in the layout of the base weight (``delta = B @ A`` has ``weight.shape``) with
scale 1; the writer sets ``lora_alpha = r`` per module (``rank_pattern`` / ``alpha_pattern`` when
ranks differ) so peft's scale is exactly 1, and transposes embeddings / ``fan_in_fan_out`` layers
into peft's storage layout.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adapterlab.io import save_tensors

__all__ = ["safetensors_metadata", "write_lora_dir"]

_PREFIX = "base_model.model."


def safetensors_metadata(metadata: Any = None) -> dict[str, str]:
    """The safetensors header of an adapter file: ``format=pt`` plus the merge report as JSON."""
    meta = {"format": "pt"}
    if metadata is not None:
        meta["adapterlab"] = json.dumps(metadata, sort_keys=True, default=str)
    return meta


def _peft_tensors(name: str, B: Tensor, A: Tensor, transpose: bool, embedding: bool) -> dict[str, Tensor]:
    if embedding:  # peft: delta = (emb_B @ emb_A)ᵀ, emb_A [k, num_emb], emb_B [dim, k]
        return {f"{_PREFIX}{name}.lora_embedding_A": B.T, f"{_PREFIX}{name}.lora_embedding_B": A.T}
    if transpose:  # fan_in_fan_out (Conv1D): delta = (lora_B @ lora_A)ᵀ
        return {f"{_PREFIX}{name}.lora_A.weight": B.T, f"{_PREFIX}{name}.lora_B.weight": A.T}
    return {f"{_PREFIX}{name}.lora_A.weight": A, f"{_PREFIX}{name}.lora_B.weight": B}


def write_lora_dir(
    stage: Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    embeddings: set[str] | frozenset[str] = frozenset(),
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    modules_to_save: Mapping[str, Mapping[str, Tensor]] | None = None,
    ensure_weight_tying: bool = False,
    metadata: Mapping[str, Any] | None = None,
    lora_alpha: float | None = None,
    use_rslora: bool = False,
) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into an (already staged) folder.

    Args:
        stage: the folder to write into (see :func:`adapterlab.staging.staged_dir`).
        factors: module name -> ``(B [d_out, k], A [k, d_in])`` in weight layout, scale 1; k = 0 is skipped.
        embeddings: names of embedding modules among ``factors``.
        fan_in_fan_out: the base stores these weights as ``[d_in, d_out]`` (GPT-2 Conv1D).
        modules_to_save: module name -> {param name: full tensor} stored densely.
        metadata: JSON-able dict stored under the ``adapterlab`` key of the safetensors header.
        lora_alpha: ``None`` (default) writes scale-1 factors (``lora_alpha = r`` per module); a
            value keeps the adapter's own ``lora_alpha`` / ``use_rslora`` (the factors then carry no
            folded scale, e.g. a DyLoRA rank export), which needs one rank for every module.

    Returns:
        The written config as a dict.
    """
    from peft import LoraConfig

    ranks = {n: int(a.shape[0]) for n, (b, a) in factors.items() if a.shape[0] > 0}
    if not ranks:
        raise ValueError("nothing to write: every module has rank 0 (all deltas are zero)")
    r = max(ranks.values())
    pattern = {n: k for n, k in ranks.items() if k != r}
    if lora_alpha is not None and pattern:
        raise ValueError(
            f"lora_alpha={lora_alpha} needs one rank for every module, got ranks {sorted(set(ranks.values()))}"
        )
    mts = dict(modules_to_save or {})
    cfg = LoraConfig(
        r=r,
        # peft annotates lora_alpha as int, but takes a float (scale = lora_alpha / r)
        lora_alpha=r if lora_alpha is None else float(lora_alpha),  # type: ignore[arg-type]
        use_rslora=bool(use_rslora),
        target_modules=sorted(ranks),
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        modules_to_save=sorted(mts) or None,
        fan_in_fan_out=fan_in_fan_out,
        base_model_name_or_path=base_model_name_or_path,
        ensure_weight_tying=ensure_weight_tying,
        lora_dropout=0.0,
        bias="none",
    )
    cfg.inference_mode = True
    tensors: dict[str, Tensor] = {}
    for name in ranks:
        B, A = factors[name]
        for key, t in _peft_tensors(name, B, A, fan_in_fan_out and name not in embeddings, name in embeddings).items():
            tensors[key] = t.detach().to(dtype).contiguous()
    for mod, params in mts.items():
        for pname, t in params.items():
            tensors[f"{_PREFIX}{mod}.{pname}"] = t.detach().to(dtype).contiguous()
    cfg.save_pretrained(str(stage))
    save_tensors(stage / "adapter_model.safetensors", tensors, metadata=safetensors_metadata(metadata))
    return json.loads((stage / "adapter_config.json").read_text(encoding="utf-8"))
