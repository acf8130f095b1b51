"""Oracles for the merge math: exact whole-model threshold, TIES by hand, DARE, RMM closed form."""

from __future__ import annotations

import pytest
import torch

from adapterlab.merging import functional as F
from adapterlab.merging.ties import keep_count
from tests.tolerances import assert_close


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_kth_largest_abs_matches_sort(n: int) -> None:
    torch.manual_seed(n)
    x = torch.randn(n) * 10 ** torch.randint(-6, 4, (n,)).float()
    x[: n // 3] = x[n // 3 : 2 * (n // 3)]  # duplicates
    ref = x.abs().sort(descending=True).values
    for k in {1, max(1, n // 5), n // 2 or 1, n}:
        assert F.kth_largest_abs(x, k) == ref[k - 1].item()


def test_kth_largest_abs_zeros_and_ties() -> None:
    x = torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0, 2.0])
    assert [F.kth_largest_abs(x, k) for k in range(1, 7)] == [2.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_keep_count_is_exact_ceiling() -> None:
    assert keep_count(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001 in floats
    assert keep_count(0.2, 11) == 3
    assert keep_count(1.0, 5) == 5
    assert keep_count(1e-9, 5) == 1


def test_topk_trim_keeps_floor_density_numel() -> None:
    x = torch.tensor([[3.0, -1.0, 0.5], [-4.0, 2.0, 0.1]])
    assert_close(F.topk_trim(x, 0.5), torch.tensor([[3.0, 0.0, 0.0], [-4.0, 2.0, 0.0]]))  # floor(0.5 * 6) = 3
    assert_close(F.topk_trim(x, 0.4), torch.tensor([[3.0, 0.0, 0.0], [-4.0, 0.0, 0.0]]))  # floor(2.4) = 2
    assert int((F.topk_trim(x, 0.1) != 0).sum()) == 0  # floor(0.6) = 0, as in peft


def test_ties_tensor_by_hand() -> None:
    # three tasks, one 1x4 tensor, keep 2 entries each (per-tensor scope)
    x = torch.tensor([[4.0, 2.5, 2.0, 0.5], [-2.0, 1.5, -5.0, 0.2], [3.2, 2.0, 1.0, -6.0]])
    # trimmed: [4, 2.5, 0, 0], [-2, 0, -5, 0], [3.2, 0, 0, -6]; mass signs [+, +, -, -]
    # disjoint means: (4 + 3.2)/2, 2.5, -5, -6
    out = F.ties_tensor(x, density=0.5)
    assert_close(out, torch.tensor([3.6, 2.5, -5.0, -6.0]))


def test_elect_frequency_vs_mass() -> None:
    x = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert_close(F.ties_tensor(x, density=1.0, elect="mass"), torch.tensor([5.0]))
    assert_close(F.ties_tensor(x, density=1.0, elect="frequency"), torch.tensor([-1.0]))


def test_dare_drop_density_one_is_identity_and_seeded() -> None:
    x = torch.randn(50, 40)
    assert F.dare_drop(x, 1.0) is x
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = F.dare_drop(x, 0.3, g1), F.dare_drop(x, 0.3, g2)
    assert torch.equal(a, b)
    kept = a != 0
    assert 0.2 < kept.float().mean() < 0.4
    assert_close(a[kept], x[kept] / 0.3)


def test_rmm_fit_exact_at_k_equal_n_and_monotone() -> None:
    torch.manual_seed(0)
    D = torch.randn(5, 200)
    errs = []
    for k in range(1, 6):
        U, C = F.rmm_fit(D, k)
        assert_close(C @ C.T, torch.eye(k))
        errs.append(float((C.T @ U - D).norm()))
    assert errs[-1] < 1e-4 * float(D.norm())
    assert all(a >= b - 1e-5 for a, b in zip(errs, errs[1:]))


def test_canonical_gauge_keeps_product() -> None:
    torch.manual_seed(1)
    B, A = torch.randn(12, 4), torch.randn(4, 9)
    Bc, Ac = F.canonical_gauge(B, A)
    assert_close(Bc @ Ac, B @ A)
    # the same product in another gauge gives the same canonical factors
    R = torch.randn(4, 4) + 4 * torch.eye(4)
    Bc2, Ac2 = F.canonical_gauge(B @ R, torch.linalg.solve(R, A))
    torch.testing.assert_close(Bc2, Bc, atol=1e-3, rtol=1e-3)


def test_topk_trim_equals_topk_and_keeps_exact_count_with_ties() -> None:
    from adapterlab.merging.functional import topk_trim

    g = torch.Generator().manual_seed(3)
    for shape in [(64, 96), (7, 9), (100,)]:
        x = torch.randn(*shape, generator=g)
        for density in (0.0, 0.01, 0.2, 0.5, 1.0):
            flat = x.reshape(-1)
            k = int(density * flat.numel())
            ref = torch.zeros_like(flat)
            if k:
                idx = torch.topk(flat.abs(), k).indices  # no ties in continuous data: a unique answer
                ref[idx] = flat[idx]
            assert torch.equal(topk_trim(x, density).reshape(-1), ref)
    # ties at the cut: exactly k kept, the tied ones in index order
    x = torch.tensor([1.0, -1.0, 1.0, 0.5, 2.0, 1.0])
    assert torch.equal(topk_trim(x, 0.5), torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, 0.0]))
