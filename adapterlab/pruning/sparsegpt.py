"""SparseGPT: one-shot OBS-style pruning with weight reconstruction from a layer Hessian.

Reference:
    Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
    One-Shot", https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adapterlab.pruning.functional import accumulate_hessian, sparsegpt_solve
from adapterlab.pruning.pruner import Pruner, register_pruner

logger = logging.getLogger(__name__)

#: SparseGPT's statistic: (running fp32 Hessian (d_in, d_in), sequences seen).
SparseGPTStats = tuple[Tensor, int]


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Disable TF32 matmuls for reproducibility (as the reference does), restoring the flags."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@register_pruner("sparsegpt")
class SparseGPTPruner(Pruner):
    """Hessian ``H = 2/n sum x x^T`` (fp32), dead inputs, dampening, upper Cholesky of ``H^-1``,
    lazy column blocks with an exact-count mask per block (scope ``block``), N:M variant.

    The dampening used for each layer (raised 10x per failed Cholesky, logged as a warning when it
    had to be) is recorded in the report row (:attr:`LayerSparsity.damping`).

    Options:
        percdamp: dampening as a fraction of ``mean(diag H)`` (default 0.01).
        blocksize: columns per lazy-update block (default 128).

    Reference:
        https://arxiv.org/abs/2301.00774 (``SparseGPT.fasterprune``)
    """

    needs_calibration: ClassVar[bool] = True
    scopes: ClassVar[tuple[str, ...]] = ("block",)

    def __init__(
        self,
        sparsity: float,
        nm: tuple[int, int] | None = None,
        scope: str | None = None,
        *,
        percdamp: float = 0.01,
        blocksize: int = 128,
    ) -> None:
        super().__init__(sparsity, nm, scope)
        if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp > 0:
            raise ValueError(f"percdamp must be a positive number, got {percdamp!r}")
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
            raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
        self.percdamp = float(percdamp)
        self.blocksize = blocksize

    def params(self) -> dict[str, Any]:
        return {**super().params(), "percdamp": self.percdamp, "blocksize": self.blocksize}

    def init_stats(self, layer: nn.Linear) -> SparseGPTStats:
        d = layer.in_features
        return torch.zeros(d, d, dtype=torch.float32, device=layer.weight.device), 0

    def add_batch(self, stats: SparseGPTStats, x: Tensor) -> SparseGPTStats:
        with _no_tf32():
            return accumulate_hessian(stats[0], stats[1], x)

    def prune_weight(self, weight: Tensor, stats: SparseGPTStats) -> Tensor:
        return self.prune_layer("<weight>", weight, stats)[0]

    def prune_layer(self, name: str, weight: Tensor, stats: SparseGPTStats) -> tuple[Tensor, dict[str, Any]]:
        """Prune with :func:`sparsegpt_solve`; a failed Cholesky that needed more dampening is logged
        once (warning, naming the layer and the dampening used); the final dampening is returned as
        the report row's ``damping``."""
        try:
            with _no_tf32():
                out = sparsegpt_solve(
                    weight,
                    stats[0],
                    self.sparsity,
                    nm=self.nm,
                    blocksize=self.blocksize,
                    percdamp=self.percdamp,
                )
        except RuntimeError as exc:
            raise RuntimeError(f"layer {name!r}: {exc}") from exc
        if out.retries:
            logger.warning(
                "SparseGPT layer %r: the damped Hessian was not positive definite; raised the dampening %d time(s) "
                "by 10x to %.6g (= percdamp %g * mean(diag H) * 10^%d)",
                name,
                out.retries,
                out.damping,
                self.percdamp,
                out.retries,
            )
        return out.weight, {"damping": out.damping}
