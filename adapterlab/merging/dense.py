"""The ``dense`` route: per module, the T dense deltas ``[T, d_out, d_in]`` are built, merged and turned
into the output right away (truncated-SVD LoRA factors, sparse entries, or added into a copy of the base),
so memory holds one module of T adapters plus the output — never T models. It takes every input the
other routes do not (LoRA, LoRI with TIES / DARE, SHiRA mixed with other types, ``output="lora"`` for
SHiRA). ``factorwise=True`` merges the A and B factors separately instead (peft's non-SVD behaviour; warns).
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
from torch import Tensor, nn

from adapterlab.extraction.functional import low_rank_factors
from adapterlab.folding import write_merged_, zeros_hit_note
from adapterlab.io import check_finite
from adapterlab.merging.merger import MergeContext
from adapterlab.merging.result import MergeResult, ModuleReport
from adapterlab.merging.routes import MergePlan, Route, register_route

logger = logging.getLogger(__name__)

__all__ = ["DenseRoute", "DenseSink"]


class DenseSink:
    """Collects merged parts per module and turns each finished module into the output form."""

    def __init__(
        self,
        output: str,
        ctx: MergeContext,
        *,
        rank: int | None,
        energy: float | None,
        model: nn.Module | None,
        keep_sparsity: bool = False,
    ) -> None:
        self.output, self.ctx, self.rank, self.energy, self.model = output, ctx, rank, energy, model
        self.keep_sparsity = keep_sparsity
        self.pending: dict[str, dict[str, Tensor]] = {}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.sparse: dict[str, tuple[Tensor, Tensor]] = {}
        self.reports: dict[str, ModuleReport] = {}
        self.t0 = time.perf_counter()

    def _default_rank(self, name: str) -> int:
        return sum(s.modules[name].rank for s in self.ctx.sources if name in s.modules)

    def put(self, name: str, part: str, value: Tensor) -> None:
        got = self.pending.setdefault(name, {})
        got[part] = value
        if len(got) < len(self.ctx.parts):
            return
        del self.pending[name]
        t = time.perf_counter()
        shape = self.ctx.shapes[name]
        rep = ModuleReport(name, shape)
        if self.ctx.factorwise:
            B, A = got["B"], got["A"]  # [d_out, r], [r, d_in]
            delta = B @ A  # [d_out, d_in]
            for part, t in (("factor B", B), ("factor A", A), ("delta B @ A", delta)):
                check_finite(
                    t,
                    f"module {name!r}: the merged {part}",
                    " (an fp32 overflow: the adapters' values are too large to merge); nothing was merged or written",
                )
            if self.output == "lora":
                self.factors[name] = (B, A)
                rep.rank, rep.energy, rep.error = int(A.shape[0]), 1.0, 0.0
        else:
            delta = got["delta"]
            check_finite(  # the inputs are finite (checked as read): this is an fp32 overflow
                delta,
                f"module {name!r}: the merged delta",
                " (an fp32 overflow: the adapters' values are too large to merge); nothing was merged or written",
            )
            if self.output == "lora":
                k = (
                    self.rank
                    if self.rank is not None
                    else (None if self.energy is not None else self._default_rank(name))
                )
                lr = low_rank_factors(delta, rank=k, energy=self.energy, solver="gram")
                self.factors[name] = (lr.B, lr.A)
                rep.rank, rep.energy = lr.rank, lr.energy
                dn = float(delta.norm())
                rep.error = float((delta - lr.B @ lr.A).norm()) / dn if dn > 0 else 0.0
        rep.norm = float(delta.norm())
        nnz = int(torch.count_nonzero(delta))
        rep.density = nnz / delta.numel()
        if self.output == "sparse":
            flat = delta.reshape(-1)  # [d_out*d_in]
            idx = torch.nonzero(flat).reshape(-1)  # [nnz]
            self.sparse[name] = (idx, flat[idx].clone())
        elif self.output == "full":
            assert self.model is not None
            rep.base_zeros_hit = write_merged_(self.model, name, delta, keep_sparsity=self.keep_sparsity)
        rep.seconds = time.perf_counter() - t
        self.reports[name] = rep


@register_route("dense", order=1000)
class DenseRoute(Route):
    """Every input: dense deltas per module (or factor-wise with ``factorwise=True``)."""

    @classmethod
    def accepts(cls, plan: MergePlan) -> bool:
        return True

    @classmethod
    def check(cls, plan: MergePlan) -> None:
        super().check(plan)
        if plan.factorwise:
            sources, shapes = plan.sources, plan.shapes
            ranks = {s.modules[n].rank for s in sources for n in shapes if n in s.modules}
            missing = [n for n in shapes if any(n not in s.modules for s in sources)]
            if len(ranks) > 1 or missing:
                raise ValueError(
                    "factorwise: merging factors needs every adapter to target the same modules at one rank"
                )
            method = plan.merger.name
            msg = (
                f"factorwise=True merges LoRA A and B factors separately with {method!r}: the factors of "
                f"different adapters are not aligned and the product gains cross terms; this is not "
                f"{method} of the deltas (adapterlab's default merges dense deltas)"
            )
            warnings.warn(msg, UserWarning, stacklevel=4)
            plan.notes.append(msg)

    @classmethod
    def run(cls, plan: MergePlan) -> MergeResult:
        merger, shapes, output = plan.merger, plan.shapes, plan.output
        assert output is not None
        ctx = MergeContext(plan.sources, shapes, plan.weights, factorwise=plan.factorwise, progress=plan.progress)
        sink = DenseSink(
            output, ctx, rank=plan.rank, energy=plan.energy, model=plan.model, keep_sparsity=plan.keep_sparsity
        )
        merger.run(ctx, sink)
        if sink.pending:
            raise RuntimeError(f"merge method {merger.name!r} left modules unfinished: {sorted(sink.pending)[:3]}")
        hits = None
        if output == "full":
            hits = {n: int(sink.reports[n].base_zeros_hit or 0) for n in shapes}
            note = zeros_hit_note(hits)
            if note:
                logger.warning(note)
                plan.notes.append(note)
        params = {
            **merger.describe(),
            "output": output,
            "rank": plan.rank,
            "energy": plan.energy,
            "factorwise": plan.factorwise,
        }
        if output == "full":
            params["keep_sparsity"] = plan.keep_sparsity
        return MergeResult(
            params=params,
            output=output,
            modules=[sink.reports[n] for n in shapes],
            factors=sink.factors if output == "lora" else None,
            sparse=sink.sparse if output == "sparse" else None,
            model=plan.model,
            base_zeros_hit=None if hits is None else sum(hits.values()),
            **plan.common,
        )
