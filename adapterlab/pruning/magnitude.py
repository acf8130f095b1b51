"""Magnitude pruning: remove the smallest ``|W|`` (per matrix, the reference, or per row).

Reference:
    The magnitude baseline of Wanda (Sun et al. 2023), https://arxiv.org/abs/2306.11695
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from adapterlab.pruning.functional import magnitude_mask
from adapterlab.pruning.pruner import Pruner, register_pruner


@register_pruner("magnitude")
class MagnitudePruner(Pruner):
    """Score ``|W|``; no calibration data.

    Scopes (unstructured only): ``matrix`` prunes exactly ``floor(s * numel)`` weights per matrix
    (reference); ``row`` prunes ``floor(s * d_in)`` per output row. N:M keeps the N largest
    ``|W|`` in every group of M input weights.

    Reference:
        https://arxiv.org/abs/2306.11695 (``prune_magnitude`` baseline)
    """

    needs_calibration: ClassVar[bool] = False
    scopes: ClassVar[tuple[str, ...]] = ("matrix", "row")

    def prune_weight(self, weight: Tensor, stats: Any) -> Tensor:
        keep = magnitude_mask(weight, self.sparsity, nm=self.nm, scope=self.scope)
        return weight.masked_fill(~keep, 0)
