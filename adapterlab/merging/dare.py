"""DARE: random drop-and-rescale of each task vector, then a linear sum or TIES' sign election.

Each task's delta is sparsified independently per module with a generator seeded from
``(seed, task index, module name)``, so results do not depend on module order and are reproducible
from the recorded seed. With ``density=1`` nothing is dropped or rescaled: ``dare_linear`` equals
``linear`` with the same weights, and ``dare_ties`` equals TIES without trimming.

SHiRA inputs (sparse form, :mod:`adapterlab.merging.sparse`): the drop runs among each adapter's
**stored** entries only (the random stream follows the stored entries in index order), so an
adapter's drop pattern does not depend on which other adapters it is merged with.

Reference:
    DARE — Yu et al. 2023, https://arxiv.org/abs/2311.03099 (peft 0.21.2 ``dare_linear`` / ``dare_ties``)
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from adapterlab.merging.functional import dare_drop, derive_seed, disjoint_merge, elect_sign
from adapterlab.merging.merger import Merger, check_choice, check_fraction, check_number, register_merger

__all__ = ["DareLinearMerger", "DareTiesMerger"]


@dataclass
class _Dare(Merger):
    density: float = 0.5
    seed: int = 0
    lambda_: float = 1.0
    sparse_form: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.density = check_fraction("params.density", self.density)
        self.lambda_ = check_number("params.lambda", self.lambda_)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"params.seed must be an integer, got {self.seed!r}")

    def _drop(self, key: tuple[str, str], x: Tensor) -> Tensor:
        out = []
        for t in range(x.shape[0]):
            gen = torch.Generator(device=x.device).manual_seed(derive_seed(self.seed, t, *key))
            out.append(dare_drop(x[t], self.density, gen))
        return torch.stack(out)  # [T, *shape]

    def _drop_sparse(self, key: tuple[str, str], x: Tensor, stored: Tensor) -> Tensor:
        """DARE among the stored entries of each task: ``x, stored [T, U]`` -> ``[T, U]``."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            gen = torch.Generator(device=x.device).manual_seed(derive_seed(self.seed, t, *key))
            out[t][stored[t]] = dare_drop(x[t][stored[t]], self.density, gen)  # [K_t] stored values
        return out

    @abstractmethod
    def _combine(self, dropped: Tensor, weights: Tensor) -> Tensor:
        """Combine the dropped task tensors ``[T, *shape]`` into one ``[*shape]`` (linear or TIES)."""

    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor:
        return self._combine(self._drop(key, x), weights)

    def merge_sparse(self, key: tuple[str, str], x: Tensor, stored: Tensor, weights: Tensor) -> Tensor:
        return self._combine(self._drop_sparse(key, x, stored), weights)


@register_merger("dare_linear")
@dataclass
class DareLinearMerger(_Dare):
    """``ΔW = λ Σ_t w_t DARE(ΔW_t)``; weights default to 1/T like ``linear``."""

    default_weights: ClassVar[str] = "mean"

    def _combine(self, dropped: Tensor, weights: Tensor) -> Tensor:
        w = weights.reshape(-1, *([1] * (dropped.dim() - 1)))  # [T, 1, ...]
        return self.lambda_ * (dropped * w).sum(0)  # [T, *shape] -> [*shape]


@register_merger("dare_ties")
@dataclass
class DareTiesMerger(_Dare):
    """DARE drop, then TIES' sign election (``mass`` / ``frequency``; a tied vote counts as +1, as in
    peft) and disjoint mean; weights (default 1) multiply after the election, then λ."""

    elect: str = "mass"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.elect = check_choice("params.elect", self.elect, ("mass", "frequency"))

    def _combine(self, dropped: Tensor, weights: Tensor) -> Tensor:
        sign = elect_sign(dropped, self.elect)  # [*shape]
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        return self.lambda_ * disjoint_merge(dropped, sign, weights)
