"""Oracle: the Gram-eigh truncated SVD gives the same truncation as LAPACK's SVD."""

from __future__ import annotations

import pytest
import torch

from adapterlab.extraction.functional import low_rank_factors


@pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)])
@pytest.mark.parametrize("rank", [1, 5, 40])
def test_gram_matches_svd_fixed_rank(shape: tuple[int, int], rank: int) -> None:
    g = torch.Generator().manual_seed(0)
    # a spectrum with clear gaps so the top-k subspace is well defined
    m, n = shape
    q = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, q, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, q, generator=g, dtype=torch.float64))
    S = 2.0 ** -torch.arange(q, dtype=torch.float64) * 10  # [q]
    d = ((U * S) @ V.T).float()
    ref = low_rank_factors(d, rank=rank, solver="svd")
    got = low_rank_factors(d, rank=rank, solver="gram")
    assert got.rank == ref.rank == min(rank, q)
    exact = (U[:, :rank] * S[:rank]) @ V[:, :rank].T  # brute-force truncation in fp64
    # fp32 tolerance relative to sigma_max = 10
    torch.testing.assert_close((got.B @ got.A).double(), exact, atol=2e-4, rtol=0)
    torch.testing.assert_close((ref.B @ ref.A).double(), exact, atol=2e-4, rtol=0)
    assert got.energy == pytest.approx(ref.energy, rel=1e-5)
    # balanced split: B and A carry the same singular values (where sigma is above fp32's Gram floor)
    top = min(rank, 8)  # sigma_8 = 10 * 2^-8
    torch.testing.assert_close(got.B.norm(dim=0)[:top], got.A.norm(dim=1)[:top], atol=1e-4, rtol=1e-3)


def test_gram_energy_rank_and_planted_lowrank() -> None:
    g = torch.Generator().manual_seed(1)
    B0, A0 = torch.randn(80, 4, generator=g), torch.randn(4, 50, generator=g)
    d = B0 @ A0  # rank 4
    for energy in (0.5, 0.9, 0.999999):
        ref = low_rank_factors(d, energy=energy, solver="svd")
        got = low_rank_factors(d, energy=energy, solver="gram")
        assert got.rank == ref.rank
    got = low_rank_factors(d, rank=4, solver="gram")
    torch.testing.assert_close(got.B @ got.A, d, atol=1e-4, rtol=1e-4)
    # asking for more components than the rank does not blow up the factors
    over = low_rank_factors(d, rank=20, solver="gram")
    torch.testing.assert_close(over.B @ over.A, d, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(over.B).all() and torch.isfinite(over.A).all()


def test_unknown_solver() -> None:
    with pytest.raises(ValueError, match="solver"):
        low_rank_factors(torch.ones(3, 3), rank=1, solver="qr")


def test_extract_lora_gram_solver_equals_svd() -> None:
    from adapterlab.extraction import extract_lora
    from adapterlab.models import tiny_llama
    from tests.extraction.test_phlora import _tuned

    base, tuned = tiny_llama(), _tuned()
    ref = extract_lora(base, tuned, energy=0.99, extras="skip")
    got = extract_lora(base, tuned, energy=0.99, extras="skip", solver="gram")
    assert got.ranks == ref.ranks and set(got.ranks.values()) == {3}
    for name in ref.ranks:
        torch.testing.assert_close(got.delta(name), ref.delta(name), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="solver"):
        extract_lora(base, tuned, rank=2, solver="lu")
