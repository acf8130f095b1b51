"""Linear merging and task arithmetic of dense deltas.

Reference:
    Task arithmetic — Ilharco et al. 2023, https://arxiv.org/abs/2212.04089
    Model soups (weighted averaging) — Wortsman et al. 2022, https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from adapterlab.merging.merger import Merger, check_number, register_merger

__all__ = ["LinearMerger", "TaskArithmeticMerger"]


def _weighted_sum(x: Tensor, weights: Tensor) -> Tensor:
    return (x * weights.reshape(-1, *([1] * (x.dim() - 1)))).sum(0)  # [T, *shape] -> [*shape]


@register_merger("linear")
@dataclass
class LinearMerger(Merger):
    """``ΔW = Σ_t w_t ΔW_t`` with ``w_t = 1/T`` unless weights are given (a weighted average).

    SHiRA inputs merge in sparse form (the same sum on the union support); LoRI inputs by exact
    concatenation (see :mod:`adapterlab.merging.sparse`).
    """

    default_weights: ClassVar[str] = "mean"
    sparse_form: ClassVar[bool] = True

    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor:
        return _weighted_sum(x, weights)

    def linear_coefficients(self, weights: Tensor) -> Tensor:
        return weights


@register_merger("task_arithmetic")
@dataclass
class TaskArithmeticMerger(Merger):
    """``ΔW = λ Σ_t w_t ΔW_t`` with ``w_t = 1`` unless weights are given.

    Attributes:
        lambda_: the scaling λ (``lambda`` in configs); the paper sweeps 0.1 … 1.0 on validation.
    """

    lambda_: float = 1.0
    sparse_form: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.lambda_ = check_number("params.lambda", self.lambda_)

    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor:
        return self.lambda_ * _weighted_sum(x, weights)

    def linear_coefficients(self, weights: Tensor) -> Tensor:
        return self.lambda_ * weights
