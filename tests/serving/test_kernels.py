"""Oracles for the multi-adapter kernels: each equals the plain per-row loop (reference_delta)."""

from __future__ import annotations

import pytest
import torch

from adapterlab.serving.kernels import lora_delta, plan_rows, shared_basis_delta, sparse_delta
from adapterlab.serving.layer import dense_shira, reference_delta
from tests.tolerances import assert_close

S, R, D_IN, D_OUT, T = 5, 3, 12, 10, 4


def _bank(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S + 1, R, D_IN, generator=g)
    B = torch.randn(S + 1, D_OUT, R, generator=g)
    A[S].zero_()
    B[S].zero_()
    return A, B


def test_plan_rows_hand_computed():
    plan = plan_rows(torch.tensor([2, 5, 0, 2, 2]), null=5, mode="grouped")
    assert plan.uniq.tolist() == [0, 2]
    assert plan.index.tolist() == [[2, 5, 5], [0, 3, 4]]  # row 2 alone, then rows 0, 3, 4; pad = B = 5
    assert plan.place.tolist() == [3, 6, 0, 4, 5]  # null row -> G*m = 6
    assert not plan.identity
    assert plan_rows(torch.tensor([1, 1]), null=5).identity


@pytest.mark.parametrize("mode", ["grouped", "gather", "auto"])
@pytest.mark.parametrize("slots", [[0, 3, 0, 5, 1, 3, 3], [2, 2, 2], [5, 5], [4, 0, 1, 2, 3, 5, 4, 4]])
def test_lora_delta_matches_reference(mode, slots):
    A, B = _bank()
    x = torch.randn(len(slots), T, D_IN)
    plan = plan_rows(torch.tensor(slots), null=S, mode=mode)
    got = lora_delta(x, A, B, plan)
    want = reference_delta(x, [None if s == S else B[s] @ A[s] for s in slots])
    if all(s == S for s in slots):
        assert got is None
    else:
        assert_close(got, want)


@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4, 5], [5, -1, 2, 2, -1, 0]])
def test_shared_basis_delta_matches_reference(full, G, rows):
    g = torch.Generator().manual_seed(1)
    n, c = 6, 4
    U, V = torch.randn(G, D_OUT, c, generator=g), torch.randn(G, c, D_IN, generator=g)
    cores = torch.randn(n, c, c, generator=g) if full else torch.randn(n, c, generator=g)
    group = torch.arange(n) % G
    x = torch.randn(len(rows), T, D_IN, generator=g)
    got = shared_basis_delta(x, U, V, cores, group, torch.tensor(rows))

    def dense(i):  # brute force: U_g Σ_i V_g
        core = cores[i] if full else torch.diag(cores[i])
        return U[group[i]] @ core @ V[group[i]]

    want = reference_delta(x, [None if i < 0 else dense(i) for i in rows])
    assert_close(got, want)
    assert shared_basis_delta(x, U, V, cores, group, torch.full((len(rows),), -1)) is None


def test_sparse_delta_matches_dense():
    g = torch.Generator().manual_seed(2)
    flat = torch.randperm(D_OUT * D_IN, generator=g)[:15]
    values = torch.randn(15, generator=g)
    x = torch.randn(3, T, D_IN, generator=g)
    got = sparse_delta(x, flat // D_IN, flat % D_IN, values, D_OUT)
    assert_close(got, x @ dense_shira((D_OUT, D_IN), flat, values).T)


def test_hand_computed_lora_row():
    # one row, rank 1: A = [1, 2], B = [[3], [0]] -> ΔW = [[3, 6], [0, 0]]; x = [1, 1] -> Δy = [9, 0]
    A = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]]])  # [S+1=2, r=1, d_in=2]
    B = torch.tensor([[[3.0], [0.0]], [[0.0], [0.0]]])  # [2, d_out=2, 1]
    x = torch.ones(2, 1, 2)
    out = lora_delta(x, A, B, plan_rows(torch.tensor([0, 1]), null=1))
    assert out.tolist() == [[[9.0, 0.0]], [[0.0, 0.0]]]
