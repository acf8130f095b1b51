"""Wanda: prune by weights and activations, ``|W_ij| * ||X_j||_2`` per output row.

Reference:
    Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language
    Models", https://arxiv.org/abs/2306.11695
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from adapterlab.pruning.functional import accumulate_sq_norm, wanda_mask
from adapterlab.pruning.pruner import Pruner, register_pruner

#: Wanda's statistic: (running mean of ||X_j||^2 of shape (d_in,), sequences seen).
WandaStats = tuple[Tensor, int]


@register_pruner("wanda")
class WandaPruner(Pruner):
    """Score ``|W| * sqrt(scaler)`` with Wanda's running-mean input scaler; groups = output rows.

    No weight update. N:M keeps the N highest scores in every group of M input weights.

    Reference:
        https://arxiv.org/abs/2306.11695 (``prune_wanda``, ``WrappedGPT``)
    """

    needs_calibration: ClassVar[bool] = True
    scopes: ClassVar[tuple[str, ...]] = ("row",)

    def init_stats(self, layer: nn.Linear) -> WandaStats:
        return torch.zeros(layer.in_features, dtype=torch.float32, device=layer.weight.device), 0

    def add_batch(self, stats: WandaStats, x: Tensor) -> WandaStats:
        return accumulate_sq_norm(stats[0], stats[1], x)

    def prune_weight(self, weight: Tensor, stats: WandaStats) -> Tensor:
        keep = wanda_mask(weight, stats[0], self.sparsity, nm=self.nm)
        return weight.masked_fill(~keep, 0)
