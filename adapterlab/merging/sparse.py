"""The ``sparse`` route: SHiRA adapters merged in sparse form, on the union of their supports.

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

Reference:
    SHiRA — Bhardwaj et al. 2024, https://arxiv.org/abs/2406.13175 (multi-adapter fusion, §5.3);
    TIES — https://arxiv.org/abs/2306.01708 ; DARE — https://arxiv.org/abs/2311.03099
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor, nn

from adapterlab.folding import write_merged_, zeros_hit_note
from adapterlab.merging.merger import Merger, SparseMergeContext
from adapterlab.merging.result import MergeResult, ModuleReport
from adapterlab.merging.routes import SPARSE_OUTPUTS, MergePlan, Route, register_route

logger = logging.getLogger(__name__)

__all__ = ["SparseFormRoute", "run_sparse"]


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


@register_route("sparse", order=10)
class SparseFormRoute(Route):
    """All-SHiRA inputs, a sparse-form method, output ``shira`` / ``sparse`` / ``full``."""

    @classmethod
    def accepts(cls, plan: MergePlan) -> bool:
        return set(plan.kinds) == {"shira"} and plan.merger.sparse_form and plan.output in SPARSE_OUTPUTS

    @classmethod
    def run(cls, plan: MergePlan) -> MergeResult:
        """Merge in sparse form; ``keep_sparsity`` (output ``full``): entries where the base is 0 are not written."""
        merger, shapes, output, common = plan.merger, plan.shapes, plan.output, plan.common
        assert output is not None
        ctx = SparseMergeContext(list(plan.sources), shapes, plan.weights, progress=plan.progress)
        sink = _SparseSink(output, ctx, model=plan.model, drop_zeros=plan.drop_zeros, keep_sparsity=plan.keep_sparsity)
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
        params = {**merger.describe(), "output": output, "form": "sparse", "drop_zeros": plan.drop_zeros}
        if output == "full":
            params["keep_sparsity"] = plan.keep_sparsity
        return MergeResult(
            params=params,
            output=output,
            modules=[sink.reports[n] for n in shapes],
            sparse=sink.sparse if output != "full" else None,
            model=plan.model,
            base_zeros_hit=sum(sink.base_zeros_hit.values()) if output == "full" else None,
            **{**common, "warnings": notes},
        )
