"""Writing merged sparse adapters as folders their tuners load: SHiRA (union support) and LoRI
(concatenated factors). PEFT LoRA folders are written by :mod:`adapterlab.lora_dir`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adapterlab.io import save_tensors
from adapterlab.lora_dir import _PREFIX, safetensors_metadata
from adapterlab.tuners.lori import LoriConfig
from adapterlab.tuners.shira import ShiraConfig
from adapterlab.tuners.shira.functional import index_dtype

__all__ = ["write_lori_dir", "write_shira_dir"]


def write_shira_dir(
    stage: Path,
    entries: Mapping[str, tuple[Tensor, Tensor]],
    shapes: Mapping[str, tuple[int, int]],
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a SHiRA adapter folder (``adapterlab_shira``) from merged entries.

    Args:
        stage: the folder to write into (see :func:`adapterlab.lora_dir.staged_dir`).
        entries: module -> ``(sorted flat indices [K] int64, values [K])``; modules with K = 0 are left out.
        shapes: module -> ``(d_out, d_in)``.

    Returns:
        The written config as a dict. The tensors are ``<module>.adapterlab_shira_{values,indices,dims}``
        exactly as the SHiRA tuner saves them, so ``PeftModel.from_pretrained`` loads the folder (it adopts
        each module's K); ``density`` in the config is the realised overall density (informational).
    """
    mods = {n: e for n, e in entries.items() if e[0].numel() > 0}
    if not mods:
        raise ValueError("nothing to write: every merged module is empty (all merged entries are zero)")
    nnz = sum(int(e[0].numel()) for e in mods.values())
    numel = sum(shapes[n][0] * shapes[n][1] for n in mods)
    cfg = ShiraConfig(
        density=nnz / numel,
        mask_type="random",
        target_modules=sorted(mods),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    tensors: dict[str, Tensor] = {}
    for name, (idx, val) in mods.items():
        m, n = shapes[name]
        tensors[f"{_PREFIX}{name}.adapterlab_shira_values"] = val.detach().to(dtype).contiguous()
        tensors[f"{_PREFIX}{name}.adapterlab_shira_indices"] = idx.to(index_dtype(m * n)).contiguous()
        tensors[f"{_PREFIX}{name}.adapterlab_shira_dims"] = torch.tensor([m, n], dtype=torch.int64)
    cfg.save_pretrained(str(stage))
    save_tensors(stage / "adapter_model.safetensors", tensors, metadata=safetensors_metadata(metadata))
    return json.loads((stage / "adapter_config.json").read_text(encoding="utf-8"))


def write_lori_dir(
    stage: Path,
    factors: Mapping[str, tuple[Tensor, Tensor]],
    masks: Mapping[str, Tensor],
    *,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a concatenated LoRI adapter folder (``adapterlab_lori``).

    ``r = lora_alpha = R`` (scale 1; the weights and the inputs' scales live in B), ``store_a=True`` (A is
    the stacked frozen projections, stored explicitly), B compact (``lori_B.values`` / ``.indices``, the
    mask positions) unless every mask is full (then ``lori_B.weight``, ``variant="D"``).

    Args:
        factors: module -> ``(B [d_out, R], A [R, d_in])``, one R for all modules.
        masks: module -> bool ``[d_out, R]``.

    Returns:
        The written config as a dict.
    """
    ranks = {int(a.shape[0]) for _, a in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"a LoRI adapter has one rank for every module; the concatenation has ranks {sorted(ranks)}")
    R = ranks.pop()
    sparse = not all(bool(m.all()) for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    cfg = LoriConfig(
        r=R,
        lora_alpha=float(R),
        target_modules=sorted(factors),
        variant="S" if sparse else "D",
        sparsity=min(1.0 - kept / total, 0.999999),
        task="merged",
        store_a=True,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    tensors: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        head = f"{_PREFIX}{name}"
        tensors[f"{head}.lori_A.weight"] = A.detach().to(dtype).contiguous()
        tensors[f"{head}.lori_B.dims"] = torch.tensor([B.shape[0], R, A.shape[1]], dtype=torch.int64)
        if sparse:
            idx = masks[name].reshape(-1).nonzero().reshape(-1)  # [nnz] sorted row-major positions of B
            tensors[f"{head}.lori_B.values"] = B.detach().reshape(-1)[idx].to(dtype).contiguous()
            tensors[f"{head}.lori_B.indices"] = idx.to(torch.int32)
        else:
            tensors[f"{head}.lori_B.weight"] = B.detach().to(dtype).contiguous()
    cfg.save_pretrained(str(stage))
    save_tensors(stage / "adapter_model.safetensors", tensors, metadata=safetensors_metadata(metadata))
    return json.loads((stage / "adapter_config.json").read_text(encoding="utf-8"))
