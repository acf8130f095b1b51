"""TIES-Merging of dense deltas: trim, elect sign, disjoint mean, λ.

Two trim scopes, documented and never mixed silently:

* ``trim_scope="model"`` (the paper, default): per task, keep the entries with
  ``|τ_t| ≥ κ_t`` where κ_t is the ⌈k·P_t⌉-th largest magnitude over **all** entries of that task
  (P_t = total size of the modules task t targets; a module a task does not target is not part of its
  task vector, so its zeros are not counted). κ_t is exact: two extra streaming passes
  build a two-level histogram over the fp32 bit patterns of ``|τ_t|`` (high 16 bits, then the low 16
  bits inside the selected bin), so no flattened model is ever held. A vote that sums to exactly 0
  takes the majority sign of the whole model (``sgn Σ_p γ_p``, +1 if that is 0 as well); modules
  with such entries are finished after the stream, once the majority is known. (The official code
  keeps ``int(k·P) + 1`` entries; adapterlab follows the paper's ⌈k·P⌉.)
* ``trim_scope="tensor"`` (peft 0.21.2 ``utils/merge_utils.ties``): exactly ``⌊k·numel⌋`` entries
  per tensor via ``topk``, and a tied vote counts as +1.

In both scopes the sign is elected on the **unweighted** trimmed tensors, task weights multiply
after the election, and the merged value is ``λ · Σ_{t∈A_p} w_t τ̂_{t,p} / |A_p|``; with unit
weights this is the paper's ``λ · disjoint-mean``.

SHiRA inputs merge in sparse form (:mod:`adapterlab.merging.sparse`), and there ``density`` is
relative to each adapter's **stored** entries, not to the ``d_out·d_in`` positions: per tensor the top
``⌊k·K_t⌋`` of the K_t values adapter t stores in the module; per model ``κ_t`` is the ``⌈k·ΣK_t⌉``-th
largest stored ``|value|`` of adapter t over all modules. Election and disjoint mean run on the union
of the adapters' supports (entries an adapter does not store are zeros and do not vote).

Reference:
    Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
    https://arxiv.org/abs/2306.01708
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

from adapterlab.merging.functional import (
    HIST_BINS,
    abs_bits_histogram,
    bits_to_float,
    disjoint_merge,
    elect_sign,
    histogram_select,
    threshold_trim,
    ties_tensor,
    topk_trim,
)
from adapterlab.merging.merger import (
    MergeContext,
    Merger,
    SparseMergeContext,
    check_choice,
    check_fraction,
    check_number,
    register_merger,
)

__all__ = ["TRIM_SCOPES", "TiesMerger", "keep_count"]

TRIM_SCOPES = ("model", "tensor")


def keep_count(density: float, total: int) -> int:
    """⌈density · total⌉ computed exactly from the decimal density (0.7·10 is 7, not 8)."""
    return max(1, math.ceil(Fraction(repr(float(density))) * total))


@register_merger("ties")
@dataclass
class TiesMerger(Merger):
    """TIES-Merging (see the module docstring for the two trim scopes).

    Attributes:
        density: kept fraction k in (0, 1] (paper default 0.2 = top-20 %); for SHiRA inputs (sparse form)
            a fraction of each adapter's stored entries (see the module docstring).
        lambda_: scaling λ (``lambda`` in configs; paper: 1 without validation, sweep 0.8 … 2.5).
        elect: ``"mass"`` (sign of the sum) or ``"frequency"`` (sign of the sign count).
        trim_scope: ``"model"`` (paper) or ``"tensor"`` (peft).
    """

    density: float = 0.2
    lambda_: float = 1.0
    elect: str = "mass"
    trim_scope: str = "model"
    sparse_form: ClassVar[bool] = True
    kappa: dict[int, float] = field(default_factory=dict, init=False, repr=False)
    _vote: int = field(default=0, init=False, repr=False)
    _deferred: dict[tuple[str, str], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.density = check_fraction("params.density", self.density)
        self.lambda_ = check_number("params.lambda", self.lambda_)
        self.elect = check_choice("params.elect", self.elect, ("mass", "frequency"))
        self.trim_scope = check_choice("params.trim_scope", self.trim_scope, TRIM_SCOPES)

    def describe(self) -> dict:
        return {
            "density": self.density,
            "lambda": self.lambda_,
            "elect": self.elect,
            "trim_scope": self.trim_scope,
            "agg": "dis-mean",
            "kappa": [self.kappa[t] for t in sorted(self.kappa)] or None,
        }

    # -- whole-model thresholds -----------------------------------------------------------------
    def prepare(self, ctx: MergeContext) -> None:
        if self.trim_scope != "model":
            return
        T = ctx.n_tasks

        def passes(description: str) -> Iterator[list[Tensor]]:
            for name, parts in ctx.stream(description):
                own = [name in s.modules for s in ctx.sources]  # a module a task does not target is not its entries
                for x in parts.values():  # [T, *shape]
                    yield [x[t] if own[t] else x.new_zeros(0) for t in range(T)]

        self._thresholds(passes, T)

    def prepare_sparse(self, ctx: SparseMergeContext) -> None:
        """Whole-model κ_t over the **stored** entries of each adapter (sparse form)."""
        if self.trim_scope != "model":
            return
        T = ctx.n_tasks

        def passes(description: str) -> Iterator[list[Tensor]]:
            for _, x, stored in ctx.stream(description):  # [T, U], [T, U]
                yield [x[t][stored[t]] for t in range(T)]  # per task its [K_t] stored values

        self._thresholds(passes, T)

    def _thresholds(self, passes: Callable[[str], Iterator[list[Tensor]]], T: int) -> None:
        """Exact κ_t = the ⌈k·P_t⌉-th largest ``|τ_t|`` over the P_t entries task t contributes (two passes)."""
        hist = torch.zeros(T, HIST_BINS, dtype=torch.int64)  # high 16 bits of |τ_t|
        totals = [0] * T
        for values in passes("ties: thresholds (1/2)"):
            for t, v in enumerate(values):
                totals[t] += v.numel()
                hist[t] += abs_bits_histogram(v)
        sel = {t: histogram_select(hist[t], keep_count(self.density, totals[t])) for t in range(T) if totals[t]}
        low = torch.zeros(T, HIST_BINS, dtype=torch.int64)
        for values in passes("ties: thresholds (2/2)"):
            for t in sel:
                low[t] += abs_bits_histogram(values[t], sel[t][0])
        for t in range(T):
            if t not in sel:  # a task with no entries at all keeps nothing
                self.kappa[t] = math.inf
                continue
            lo, _ = histogram_select(low[t], sel[t][1])
            self.kappa[t] = bits_to_float(sel[t][0], lo)

    # -- merge ----------------------------------------------------------------------------------
    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor | None:
        if self.trim_scope == "tensor":
            return self.lambda_ * ties_tensor(x, weights, density=self.density, elect=self.elect, zero_sign=1.0)
        trimmed = torch.stack([threshold_trim(x[t], self.kappa[t]) for t in range(x.shape[0])])  # [T, *shape]
        return self._elect_and_merge(key, trimmed, weights)

    def merge_sparse(self, key: tuple[str, str], x: Tensor, stored: Tensor, weights: Tensor) -> Tensor | None:
        """Sparse form: ``x, stored [T, U]`` on the union support; trims among each task's stored entries."""
        if self.trim_scope == "model":
            return self.merge(key, x, weights)  # |τ| ≥ κ_t; unstored entries are zeros (κ_t from stored ones)
        trimmed = torch.zeros_like(x)  # [T, U]
        for t in range(x.shape[0]):
            trimmed[t][stored[t]] = topk_trim(x[t][stored[t]], self.density)  # top ⌊k·K_t⌋ of the K_t stored
        sign = elect_sign(trimmed, self.elect)  # [U]
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)  # peft: a tied vote counts as +1
        return self.lambda_ * disjoint_merge(trimmed, sign, weights)

    def _elect_and_merge(self, key: tuple[str, str], trimmed: Tensor, weights: Tensor) -> Tensor | None:
        sign = elect_sign(trimmed, self.elect)  # [*shape] in {-1, 0, 1}
        self._vote += int((sign > 0).sum()) - int((sign < 0).sum())
        tied = (sign == 0) & (trimmed != 0).any(0)  # a real tie, not an all-zero entry
        if bool(tied.any()):
            self._deferred[key] = (trimmed, sign, weights)
            return None
        return self.lambda_ * disjoint_merge(trimmed, sign, weights)

    def finish(self) -> dict[tuple[str, str], Tensor]:
        majority = 1.0 if self._vote >= 0 else -1.0
        out: dict[tuple[str, str], Tensor] = {}
        for key, (trimmed, sign, weights) in self._deferred.items():
            tied = (sign == 0) & (trimmed != 0).any(0)
            sign = torch.where(tied, torch.full_like(sign, majority), sign)
            out[key] = self.lambda_ * disjoint_merge(trimmed, sign, weights)
        self._deferred.clear()
        return out
