"""Merging sparse adapters without densifying them: SHiRA in sparse form, LoRI by exact concatenation.

**SHiRA, sparse form.** Every input stores per module K_t entries (flat row-major indices and values,
its scale folded in). Per module the T index sets are united (``torch.unique``) and the values put on
the union support as one ``[T, U]`` matrix (``U = nnz_union``), with a ``[T, U]`` mask of the entries
each adapter stores; the registered method then merges that matrix (:meth:`Merger.merge_sparse`) —
one module in memory at a time, never a dense ``d_out × d_in`` delta per adapter. Semantics per method:

* ``linear`` / ``task_arithmetic``: exactly the weighted sum of the dense deltas, restricted to the union.
* ``ties``: ``density`` is relative to each adapter's **stored** entries — ``trim_scope="tensor"`` keeps
  the top ``⌊density·K_t⌋`` of the K_t values adapter t stores in the module (peft's ``topk`` rule);
  ``trim_scope="model"`` keeps ``|v| ≥ κ_t`` with κ_t the ``⌈density·ΣK_t⌉``-th largest stored ``|v|``
  of adapter t over all modules (exact, two histogram passes). Sign election and the disjoint mean run
  on the union support (an entry an adapter does not store is a zero: it does not vote). A dense TIES of
  the same adapters would count the ``d_out·d_in`` positions instead, so at usual densities it trims
  nothing of a 1 %-dense SHiRA adapter.
* ``dare_linear`` / ``dare_ties``: each adapter's stored entries are dropped with probability
  ``1 - density`` (seeded per task and module, in stored-index order) and rescaled by ``1/density``.

Outputs: ``shira`` (a SHiRA adapter folder whose indices are the union support, or its nonzero part with
``drop_zeros=True``), ``sparse`` (adapterlab's sparse-delta format) or ``full`` (scatter-added into a
copy of the base as ``(W.float() + v).to(W.dtype)``: only union entries are written, so zeros of a pruned
base stay zero unless an adapter stores entries there — counted as ``base_zeros_hit`` and warned about;
``keep_sparsity=True`` masks those entries out, and SHiRA's ``respect_base_sparsity=True`` avoids them).

**LoRI, concatenation.** For ``linear`` / ``task_arithmetic`` (coefficients ``c_t``): per module
``B = [c_1 s_1 B_1, …, c_T s_T B_T]`` (columns) and ``A = [A_1; …; A_T]`` (rows), so ``B A = Σ_t c_t ΔW_t``
exactly, with rank ``Σ r_t``; B keeps each input's zeros (LoRI-S masks) and A the frozen random
projections. Modules an adapter does not target get a zero block, so the rank is one number. Written as
a LoRI adapter (``output="lori"``: ``r = lora_alpha = Σ r_t``, scale 1, ``store_a=True`` since a
concatenated A has no single seed; B compact when any input is LoRI-S) that ``PeftModel.from_pretrained``
loads after ``import adapterlab``, or as a plain peft LoRA (``output="lora"``) for any peft user.

Reference:
    SHiRA — Bhardwaj et al. 2024, https://arxiv.org/abs/2406.13175 (multi-adapter fusion, §5.3);
    LoRI — Zhang et al. 2025, https://arxiv.org/abs/2504.07448 (``cat`` merging);
    TIES — https://arxiv.org/abs/2306.01708 ; DARE — https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterlab.adapters import LoraSource
from adapterlab.folding import write_merged_, zeros_hit_note
from adapterlab.lora_dir import _PREFIX, safetensors_metadata
from adapterlab.merging.base import Merger, MergeResult, ModuleReport
from adapterlab.merging.functional import union_support
from adapterlab.progress import ProgressFactory, track

logger = logging.getLogger(__name__)

__all__ = [
    "SparseMergeContext",
    "choose_route",
    "lori_concat",
    "merge_lori_concat",
    "merge_sparse_form",
    "write_lori_dir",
    "write_shira_dir",
]

_SPARSE_OUTPUTS = ("shira", "sparse", "full")


# ------------------------------------------------------------------------------------------------
# route


def _label(sources: Sequence[LoraSource], i: int) -> str:
    return f"adapters[{i}] ({sources[i].name!r}, {sources[i].peft_type or sources[i].kind})"


def choose_route(
    sources: Sequence[LoraSource],
    merger: Merger,
    weights: Tensor,
    output: str | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    factorwise: bool = False,
) -> tuple[str, str, str | None]:
    """Pick how to merge: ``"sparse"`` (all SHiRA), ``"concat"`` (all LoRI, linear) or ``"dense"``.

    Args:
        output: the requested output, or None for the default of the inputs.

    Returns:
        ``(route, output, why)``: ``why`` is a one-line reason when SHiRA inputs fall back to dense
        deltas because other adapter types are mixed in (the caller warns with it), else None.

    Raises:
        ValueError: an output or method the inputs cannot give (naming an offending adapter).
    """
    kinds = [s.kind for s in sources]
    all_shira, all_lori = set(kinds) == {"shira"}, set(kinds) == {"lori"}
    linear = merger.linear_coefficients(weights) is not None
    if output is None:
        output = "shira" if all_shira and merger.sparse_form else "lori" if all_lori and linear else "lora"
    if "shira" in kinds:
        i = kinds.index("shira")
        if not merger.sparse_form or factorwise:
            what = f"merge method {merger.name!r}" if not merger.sparse_form else "factorwise=True"
            raise ValueError(
                f"{_label(sources, i)}: {what} needs low-rank factors, which a SHiRA adapter has not; use linear, "
                f"task_arithmetic, ties, dare_linear or dare_ties"
            )
    if output == "shira" and not all_shira:
        i = next(j for j, k in enumerate(kinds) if k != "shira")
        raise ValueError(f"output='shira' needs every adapter to be a SHiRA adapter; {_label(sources, i)} is not")
    if output == "lori" and not (all_lori and linear):
        if not all_lori:
            i = next(j for j, k in enumerate(kinds) if k != "lori")
            raise ValueError(f"output='lori' needs every adapter to be a LoRI adapter; {_label(sources, i)} is not")
        raise ValueError(
            f"output='lori' is the exact concatenation of linear / task_arithmetic merges, not {merger.name!r}; "
            f"use output='lora', 'sparse' or 'full'"
        )
    if all_shira and output in _SPARSE_OUTPUTS:
        return "sparse", output, None
    if all_shira:
        logger.info("output=%r for SHiRA adapters: dense deltas, then a truncated SVD (lossy below full rank)", output)
        return "dense", output, None
    if "shira" in kinds:
        i, j = kinds.index("shira"), next(j for j, k in enumerate(kinds) if k != "shira")
        why = (
            f"merge_adapters: {_label(sources, i)} is SHiRA but {_label(sources, j)} is not; sparse-form merging "
            f"needs every adapter to be SHiRA, so dense deltas are merged per module instead"
        )
        return "dense", output, why
    if all_lori and linear and output in ("lori", "lora") and rank is None and energy is None and not factorwise:
        return "concat", output, None
    return "dense", output, None


# ------------------------------------------------------------------------------------------------
# SHiRA in sparse form


@dataclass
class SparseMergeContext:
    """What a merger sees in sparse form: per module the ``[T, U]`` values on the union support.

    Attributes:
        sources: the T SHiRA adapters.
        shapes: module name -> weight shape (union over adapters, sorted).
        weights: ``[T]`` fp32 task weights.
        supports: module name -> union support ``[U]`` (int64 flat indices), filled while streaming.
    """

    sources: list[Any]
    shapes: dict[str, tuple[int, int]]
    weights: Tensor
    progress: ProgressFactory | None = None
    supports: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return len(self.sources)

    def tensors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """``union [U]``, values ``[T, U]`` fp32 and ``stored [T, U]`` bool of one module."""
        idx, val = [], []
        for s in self.sources:
            if name in s.modules:
                i, v = s.entries(name)
            else:
                i, v = torch.zeros(0, dtype=torch.int64), torch.zeros(0)
            idx.append(i)
            val.append(v)
        union, x, stored = union_support(idx, val)  # [U], [T, U], [T, U]
        self.supports[name] = union
        return union, x, stored

    def stream(self, description: str) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(module, x [T, U], stored [T, U])`` per module, one module in memory at a time."""
        for name in track(list(self.shapes), description, progress=self.progress):
            _, x, stored = self.tensors(name)
            yield name, x, stored


class _SparseSink:
    """Turns each merged ``[U]`` value vector into the output (entries, or a scatter into the base)."""

    def __init__(
        self,
        output: str,
        ctx: SparseMergeContext,
        *,
        model: nn.Module | None,
        drop_zeros: bool,
        keep_sparsity: bool = False,
    ) -> None:
        self.output, self.ctx, self.model, self.drop_zeros = output, ctx, model, drop_zeros
        self.keep_sparsity = keep_sparsity
        self.sparse: dict[str, tuple[Tensor, Tensor]] = {}
        self.reports: dict[str, ModuleReport] = {}
        self.base_zeros_hit: dict[str, int] = {}

    def put(self, name: str, values: Tensor) -> None:
        t = time.perf_counter()
        union = self.ctx.supports[name]  # [U]
        shape = self.ctx.shapes[name]
        idx, val = union, values
        if self.drop_zeros and self.output != "full":
            keep = values != 0  # [U]
            idx, val = union[keep], values[keep]  # [nnz]
        rep = ModuleReport(name, shape)
        rep.norm = float(values.norm())
        rep.density = int(torch.count_nonzero(values)) / (shape[0] * shape[1])
        if self.output == "full":
            assert self.model is not None
            rep.base_zeros_hit = write_merged_(self.model, name, val, keep_sparsity=self.keep_sparsity, index=idx)
            self.base_zeros_hit[name] = rep.base_zeros_hit
        else:
            self.sparse[name] = (idx, val.clone())
        rep.seconds = time.perf_counter() - t
        self.reports[name] = rep


def run_sparse(merger: Merger, ctx: SparseMergeContext, sink: _SparseSink) -> None:
    """Stream the modules through :meth:`Merger.merge_sparse` (after :meth:`Merger.prepare_sparse`)."""
    merger.prepare_sparse(ctx)
    for name, x, stored in ctx.stream(f"{merger.name}: merging (sparse form)"):
        out = merger.merge_sparse((name, "values"), x, stored, ctx.weights)
        if out is not None:
            sink.put(name, out)
    for (name, _), out in merger.finish().items():
        sink.put(name, out)


def merge_sparse_form(
    sources: Sequence[LoraSource],
    shapes: dict[str, tuple[int, int]],
    merger: Merger,
    weights: Tensor,
    *,
    output: str,
    model: nn.Module | None,
    drop_zeros: bool,
    progress: ProgressFactory | None,
    common: Mapping[str, Any],
    keep_sparsity: bool = False,
) -> MergeResult:
    """Merge SHiRA adapters in sparse form (see the module docstring); ``common`` holds the shared
    :class:`MergeResult` fields. ``keep_sparsity`` (output ``full``): entries where the base is 0 are not written."""
    ctx = SparseMergeContext(list(sources), shapes, weights, progress=progress)
    sink = _SparseSink(output, ctx, model=model, drop_zeros=drop_zeros, keep_sparsity=keep_sparsity)
    run_sparse(merger, ctx, sink)
    missing = [n for n in shapes if n not in sink.reports]
    if missing:
        raise RuntimeError(f"merge method {merger.name!r} left modules unfinished: {missing[:3]}")
    notes = list(common.get("warnings", []))
    note = zeros_hit_note(sink.base_zeros_hit)
    if note:
        note += " (or train SHiRA with respect_base_sparsity=True)"
        logger.warning(note)
        notes.append(note)
    params = {**merger.describe(), "output": output, "form": "sparse", "drop_zeros": drop_zeros}
    if output == "full":
        params["keep_sparsity"] = keep_sparsity
    return MergeResult(
        params=params,
        output=output,
        modules=[sink.reports[n] for n in shapes],
        sparse=sink.sparse if output != "full" else None,
        model=model,
        base_zeros_hit=sum(sink.base_zeros_hit.values()) if output == "full" else None,
        **{**common, "warnings": notes},
    )


# ------------------------------------------------------------------------------------------------
# LoRI by concatenation


def lori_concat(
    sources: Sequence[Any], name: str, shape: tuple[int, int], coeffs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One module of the exact concatenation: ``B [d_out, R]``, ``A [R, d_in]``, B's mask ``[d_out, R]``.

    ``B = [c_1 s_1 B_1, …]`` and ``A = [A_1; …]`` (R = Σ r_t; an adapter that does not target the module
    contributes a zero block of its rank), so ``B A = Σ_t c_t s_t B_t A_t``.

    Semantics:
        B A = Σ_t (c_t s_t B_t) A_t      # block t of the rank dimension is task t
    """
    bs, as_, ms = [], [], []
    for s, c in zip(sources, coeffs.tolist()):
        r = next(iter(s.modules.values())).rank
        if name in s.modules:
            b, a = s.factors(name)  # [d_out, r] (scale folded in), [r, d_in]
            bs.append(b * c)
            as_.append(a)
            ms.append(s.b_mask(name))
        else:
            bs.append(torch.zeros(shape[0], r))
            as_.append(torch.zeros(r, shape[1]))
            ms.append(torch.zeros(shape[0], r, dtype=torch.bool))
    return torch.cat(bs, 1), torch.cat(as_, 0), torch.cat(ms, 1)  # [d_out, R], [R, d_in], [d_out, R]


def merge_lori_concat(
    sources: Sequence[Any],
    shapes: dict[str, tuple[int, int]],
    merger: Merger,
    weights: Tensor,
    *,
    output: str,
    common: Mapping[str, Any],
) -> MergeResult:
    """Merge LoRI adapters by exact concatenation (see the module docstring)."""
    coeffs = merger.linear_coefficients(weights)
    assert coeffs is not None
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    masks: dict[str, Tensor] = {}
    reports = []
    for name in shapes:
        t = time.perf_counter()
        B, A, M = lori_concat(sources, name, shapes[name], coeffs)
        factors[name], masks[name] = (B, A), M
        rep = ModuleReport(name, shapes[name], rank=int(A.shape[0]), energy=1.0, error=0.0)
        rep.norm = float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0).sqrt())  # ‖B A‖_F via R×R products
        rep.density = int(M.sum()) / M.numel()  # stored fraction of B (the LoRI-S masks)
        rep.seconds = time.perf_counter() - t
        reports.append(rep)
    rank = int(next(iter(factors.values()))[1].shape[0])
    params = {**merger.describe(), "output": output, "form": "concat", "rank": rank}
    return MergeResult(
        params=params,
        output=output,
        modules=reports,
        factors=factors,
        b_masks=masks if output == "lori" else None,
        **common,
    )


# ------------------------------------------------------------------------------------------------
# writers


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
    from adapterlab.io import save_tensors
    from adapterlab.tuners.shira import ShiraConfig
    from adapterlab.tuners.shira.functional import index_dtype

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
    from adapterlab.io import save_tensors
    from adapterlab.tuners.lori import LoriConfig

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
