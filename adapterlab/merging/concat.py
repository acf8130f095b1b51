"""The ``concat`` route: LoRI adapters merged by a linear method, exactly, by concatenating factors.

**LoRI, concatenation.** For ``linear`` / ``task_arithmetic`` (coefficients ``c_t``): per module
``B = [c_1 s_1 B_1, …, c_T s_T B_T]`` (columns) and ``A = [A_1; …; A_T]`` (rows), so ``B A = Σ_t c_t ΔW_t``
exactly, with rank ``Σ r_t``; B keeps each input's zeros (LoRI-S masks) and A the frozen random
projections. Modules an adapter does not target get a zero block, so the rank is one number. Written as
a LoRI adapter (``output="lori"``: ``r = lora_alpha = Σ r_t``, scale 1, ``store_a=True`` since a
concatenated A has no single seed; B compact when any input is LoRI-S) that ``PeftModel.from_pretrained``
loads after ``import adapterlab``, or as a plain peft LoRA (``output="lora"``) for any peft user.

Reference:
    LoRI — Zhang et al. 2025, https://arxiv.org/abs/2504.07448 (``cat`` merging)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from adapterlab.merging.result import MergeResult, ModuleReport
from adapterlab.merging.routes import MergePlan, Route, register_route

__all__ = ["LoriConcatRoute", "lori_concat"]


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


@register_route("concat", order=20)
class LoriConcatRoute(Route):
    """All-LoRI inputs, a linear method (linear / task_arithmetic), output ``lori`` / ``lora`` at full rank."""

    @classmethod
    def accepts(cls, plan: MergePlan) -> bool:
        linear = plan.merger.linear_coefficients(plan.weights) is not None
        return (
            set(plan.kinds) == {"lori"}
            and linear
            and plan.output in ("lori", "lora")
            and plan.rank is None
            and plan.energy is None
            and not plan.factorwise
        )

    @classmethod
    def run(cls, plan: MergePlan) -> MergeResult:
        merger, shapes, output = plan.merger, plan.shapes, plan.output
        assert output is not None
        coeffs = merger.linear_coefficients(plan.weights)
        assert coeffs is not None
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        masks: dict[str, Tensor] = {}
        reports = []
        for name in shapes:
            t = time.perf_counter()
            B, A, M = lori_concat(plan.sources, name, shapes[name], coeffs)
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
            **plan.common,
        )
