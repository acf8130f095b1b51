"""Pure functions of DyLoRA: deterministic rank sampling and truncation.

Reference:
    Valipour et al., DyLoRA, https://arxiv.org/abs/2210.07558 (official code huawei-noah/Efficient-NLP).
"""

from __future__ import annotations

import torch

from adapterlab.tuners._lowrank import lowrank_scale

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, step) over the 63-bit seed space


def rank_seed(seed: int, step: int) -> int:
    """The generator seed of optimizer step ``step``: a fixed mix of ``(seed, step)`` (no salted hash)."""
    return (int(seed) * _MIX + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


def sample_rank(seed: int, step: int, r_min: int, r_max: int) -> int:
    """Draw ``b ~ U{r_min..r_max}`` for optimizer step ``step`` from a generator seeded by ``(seed, step)``.

    Every process gets the same ``b`` for the same step without communication, and a resumed run
    repeats the schedule.

    Semantics:
        g = torch.Generator().manual_seed(rank_seed(seed, step)); b = randint(r_min, r_max + 1, g)
    """
    if not 1 <= r_min <= r_max:
        raise ValueError(f"rank range is empty: need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")
    g = torch.Generator().manual_seed(rank_seed(seed, step))
    return int(torch.randint(r_min, r_max + 1, (1,), generator=g).item())


def truncated_factors(
    a: torch.Tensor, b: torch.Tensor, rank: int, alpha: float, use_rslora: bool = False
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The rank-``rank`` prefix of full factors and its scale.

    ``A_{:b} = A[:b]``, ``B_{:b} = B[:, :b]`` and ``s = alpha / b`` (``alpha / sqrt(b)`` with rsLoRA):
    the paper's ``alpha / r_max`` times the two ``sqrt(r_max / b)`` factors.

    Args:
        a: (r_max, d_in).
        b: (d_out, r_max).
        rank: 1-based rank ``b`` in ``[1, r_max]``.
    """
    r_max = a.shape[0]
    if not 1 <= rank <= r_max:
        raise ValueError(f"rank must be in [1, {r_max}], got {rank}")
    return a[:rank], b[:, :rank], lowrank_scale(alpha, rank, use_rslora)  # (b, d_in), (d_out, b)
