"""One table of numeric tolerances for oracle tests, keyed by dtype (DESIGN.md §5a.8)."""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, **tol)
