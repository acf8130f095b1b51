"""Compensation adapters (EoRA): oracles for the whitened low-rank fit and the model-level pipeline.

The optimum of ``min_{rank ≤ r} ‖(E − M) X‖_F`` is computed independently in float64 through a Cholesky
whitening (``X Xᵀ = L Lᵀ``: ``M = [E L]_r L⁻¹``), not through the library's eigen-decomposition. Runtime:
a few seconds (tiny models).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapterlab.extraction.compensate import compensate, damping, whitened_low_rank
from adapterlab.models import tiny_llama
from tests.tolerances import TOL


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _inputs(d_in: int, tokens: int, seed: int) -> torch.Tensor:
    """``X`` [d_in, tokens] with a strongly anisotropic covariance (as real activations have)."""
    scales = torch.logspace(0, -2, d_in, dtype=torch.float64)[:, None]  # [d_in, 1]
    mix = torch.linalg.qr(_rand(d_in, d_in, seed=seed + 1))[0]
    return mix @ (scales * _rand(d_in, tokens, seed=seed))


def _whitened_optimum(e: torch.Tensor, x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 brute-force oracle: ``(M [d_out, d_in], singular values of E L)`` for ``C = X Xᵀ = L Lᵀ``."""
    e, x = e.double(), x.double()
    chol = torch.linalg.cholesky(x @ x.T)  # [d_in, d_in] lower
    u, s, vh = torch.linalg.svd(e @ chol, full_matrices=False)
    m = (u[:, :r] * s[:r]) @ vh[:r] @ torch.linalg.inv(chol)  # [E L]_r L^-1
    return m, s


def _out_err(e: torch.Tensor, m: torch.Tensor, x: torch.Tensor) -> float:
    return float(((e.double() - m.double()) @ x.double()).norm())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("r", [1, 3, 8])
def test_activation_space_is_the_brute_force_optimum_and_beats_weight_space(r: int) -> None:
    e, x = _rand(24, 16, seed=0), _inputs(16, 64, seed=2)
    lr, lam = whitened_low_rank(e, x @ x.T, rank=r, percdamp=0.0)
    assert lam == 0.0 and lr.rank == r and lr.B.shape == (24, r) and lr.A.shape == (r, 16)
    assert lr.B.dtype == torch.float32
    expected, s = _whitened_optimum(e, x, r)
    got = lr.B.double() @ lr.A.double()
    assert _rel(got, expected) < 1e-4
    # Eckart-Young in the whitened space: the remaining output error is the tail of the spectrum
    assert _out_err(e, got, x) == pytest.approx(float(s[r:].square().sum().sqrt()), rel=1e-4)
    # the plain SVD of E (weight space) at the same rank leaves a strictly larger output error
    u, sw, vh = torch.linalg.svd(e, full_matrices=False)
    weight = (u[:, :r] * sw[:r]) @ vh[:r]
    assert _out_err(e, got, x) < 0.9 * _out_err(e, weight, x)
    # balanced split: every component has ||B_i|| = ||A_i||
    torch.testing.assert_close(lr.B.norm(dim=0), lr.A.norm(dim=1), rtol=1e-5, atol=0)


def test_dampening_is_the_optimum_of_the_dampened_objective() -> None:
    """``C = X Xᵀ + λ I`` is the covariance of ``[X, sqrt(λ) I]``: the optimum for those inputs."""
    e, x = _rand(12, 16, seed=3), _inputs(16, 40, seed=4)
    gram = x @ x.T
    lam = 0.05 * float(torch.diagonal(gram).mean())
    lr, used = whitened_low_rank(e, gram, rank=4, percdamp=0.05)
    assert used == pytest.approx(lam, rel=1e-6) and damping(gram.float(), 0.05) == pytest.approx(lam, rel=1e-6)
    augmented = torch.cat([x, lam**0.5 * torch.eye(16, dtype=torch.float64)], dim=1)  # [16, 40 + 16]
    expected, _ = _whitened_optimum(e, augmented, 4)
    assert _rel(lr.B @ lr.A, expected) < 1e-4


def test_rank_deficient_inputs_get_the_optimal_error_and_no_correction_off_their_span() -> None:
    """X of rank 5 in 16 dims, no dampening: the optimal error is the tail of svd(E X); null directions get 0."""
    e = _rand(10, 16, seed=5)
    basis = torch.linalg.qr(_rand(16, 16, seed=6))[0]
    x = basis[:, :5] @ _rand(5, 30, seed=7)  # [16, 30], rank 5
    lr, _ = whitened_low_rank(e, x @ x.T, rank=3, percdamp=0.0)
    got = (lr.B @ lr.A).double()
    tail = torch.linalg.svdvals(e @ x)[3:]
    assert _out_err(e, got, x) == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-3)
    off_span = basis[:, 5:]  # [16, 11]: directions the inputs never reach
    assert float((got @ off_span).norm()) < 1e-4 * float(got.norm())


@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95])
def test_energy_picks_the_brute_force_smallest_rank(tau: float) -> None:
    e, x = _rand(20, 16, seed=8), _inputs(16, 48, seed=9)
    lr, _ = whitened_low_rank(e, x @ x.T, energy=tau, percdamp=0.0)
    base = _out_err(e, torch.zeros_like(e), x) ** 2
    brute = next(r for r in range(1, 17) if 1 - _out_err(e, _whitened_optimum(e, x, r)[0], x) ** 2 / base >= tau - 1e-9)
    assert lr.rank == brute
    assert lr.energy >= tau - 1e-6


def test_bad_layer_inputs() -> None:
    with pytest.raises(ValueError, match="gram must be"):
        whitened_low_rank(torch.zeros(4, 8), torch.eye(4), rank=1)
    with pytest.raises(ValueError, match="percdamp"):
        whitened_low_rank(torch.ones(4, 8), torch.eye(8), rank=1, percdamp=-1.0)


# ------------------------------------------------------------------------------------------------
# model level


def _block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


def _calib(n: int = 8, seqlen: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _planted(dense: nn.Module, r0: int = 2) -> nn.Module:
    comp = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in _block_linears(comp).values():
            o, i = m.weight.shape
            b0 = torch.randn(o, r0, generator=g) * 0.02
            a0 = torch.randn(r0, i, generator=g)
            m.weight.sub_(b0 @ a0)
    return comp


@pytest.mark.parametrize("space", ["activation", "weight"])
def test_planted_low_rank_error_is_recovered_exactly(space: str, tmp_path) -> None:
    from peft import PeftModel

    dense = tiny_llama(seed=0)
    comp = _planted(dense)
    ids = _calib(2, 16, seed=5)
    ref, before = _logits(dense, ids), _logits(comp, ids)
    assert (ref - before).abs().max() > 0.05  # the planted error matters
    res = compensate(dense, comp, rank=2, space=space, calibration=_calib() if space == "activation" else None)
    assert set(res.ranks.values()) == {2} and len(res.factors) == 14
    assert all(row.compression == "changed" for row in res.modules)
    merged = copy.deepcopy(comp)
    res.apply_(merged)
    torch.testing.assert_close(_logits(merged, ids), ref, atol=1e-4, rtol=1e-4)
    # the written PEFT folder, loaded on the compressed base, gives the dense logits too
    out = res.save(tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(comp), str(out))
    torch.testing.assert_close(_logits(peft_model, ids), ref, atol=1e-4, rtol=1e-4)
    assert (out / "compensation_report.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]


def _captured_inputs(model: nn.Module, name: str, calib: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``X`` [d_in, tokens] fp64 that ``name`` receives in plain forwards of ``model`` (the test's own hook)."""
    xs: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda mod, args, out: xs.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
    )
    try:
        with torch.no_grad():
            for chunk in calib.split(batch_size):
                model(chunk, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(xs).T


def _dampened(x: torch.Tensor, percdamp: float) -> torch.Tensor:
    lam = percdamp * float(torch.diagonal(x @ x.T).mean())
    return torch.cat([x, lam**0.5 * torch.eye(x.shape[0], dtype=x.dtype)], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pruned_model_matches_the_oracle_on_its_own_inputs(dtype: torch.dtype) -> None:
    """Magnitude-pruned tiny Llama in each dtype: every block-1 factor equals the whitened optimum on the
    inputs a plain hook sees in the pruned model (so block 0 ran pruned), and beats the weight space."""
    from adapterlab.pruning import prune_

    dense = tiny_llama(seed=1, dtype=dtype)
    comp = copy.deepcopy(dense)
    prune_(comp, "magnitude", 0.5)
    calib = _calib(6, 20, seed=1)
    r = 4
    act = compensate(dense, comp, rank=r, calibration=calib, batch_size=4)
    wgt = compensate(dense, comp, rank=r, space="weight")
    assert act.modules[0].compression == "pruned" and act.modules[0].sparsity == pytest.approx(0.5, abs=0.01)
    assert all(b.dtype == torch.float32 for b, _ in act.factors.values())
    for name in ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        lin = comp.get_submodule(name)
        e = dense.get_submodule(name).weight.double() - lin.weight.double()  # [d_out, d_in]
        x = _captured_inputs(comp, name, calib, batch_size=4)
        expected, _ = _whitened_optimum(e, _dampened(x, 0.01), r)
        assert _rel(act.delta(name), expected) < 1e-3, name
        assert _out_err(e, act.delta(name), x) < _out_err(e, wgt.delta(name), x) < _out_err(e, 0 * e, x)
    # the whole model: the compensated logits are closer to the dense ones
    ids = _calib(2, 16, seed=9)
    merged = copy.deepcopy(comp)
    act.apply_(merged)
    ref = _logits(dense, ids)
    assert (_logits(merged, ids) - ref).norm() < (_logits(comp, ids) - ref).norm()
    assert merged.get_submodule("model.layers.0.mlp.up_proj").weight.dtype == dtype


def test_saved_half_adapter_keeps_its_dtype_and_values(tmp_path) -> None:
    from adapterlab.io import load_tensors

    dense = tiny_llama(seed=2, dtype=torch.bfloat16)
    comp = _planted(dense)
    res = compensate(dense, comp, rank=3, calibration=_calib(), dtype=torch.bfloat16)
    out = res.save(tmp_path / "a")
    tensors = load_tensors(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    assert tensors[key].dtype == torch.bfloat16
    b, _ = res.factors["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(tensors[key].float(), b.to(torch.bfloat16).float(), **TOL[torch.float32])


def test_truncation_is_the_lower_rank_fit() -> None:
    dense = tiny_llama(seed=3)
    comp = copy.deepcopy(dense)
    from adapterlab.pruning import prune_

    prune_(comp, "magnitude", 0.5)
    calib = _calib()
    big = compensate(dense, comp, rank=8, calibration=calib)
    small = compensate(dense, comp, rank=3, calibration=calib)
    cut = big.truncated(3)
    assert cut.ranks == small.ranks and cut.n_params() == small.n_params()
    for name in small.factors:
        assert _rel(cut.delta(name), small.delta(name)) < 1e-4
        row = next(m for m in cut.modules if m.name == name)
        ref = next(m for m in small.modules if m.name == name)
        assert row.energy == pytest.approx(ref.energy, rel=1e-5)


def test_global_energy_budget_is_a_minimal_greedy_prefix() -> None:
    """Kept energy ≥ τ of the summed (activation-weighted) error, and dropping the last component taken in
    the greedy order (the taken module tail with the smallest σ²/(d_out + d_in)) falls below τ."""
    from adapterlab.pruning import prune_

    dense = tiny_llama(seed=4)
    comp = copy.deepcopy(dense)
    prune_(comp, "magnitude", 0.5)
    tau = 0.6
    res = compensate(dense, comp, energy=tau, energy_scope="global", calibration=_calib())
    total = kept = 0.0
    last_ratio, last_s2 = float("inf"), 0.0
    shapes = {m.name: m.shape for m in res.modules}
    for name, spec in res.spectra.items():
        k, s2 = res.ranks[name], spec.double().square()
        total += float(s2.sum())
        kept += float(s2[:k].sum())
        ratio = float(s2[k - 1]) / sum(shapes[name])
        if k > 1 and ratio < last_ratio:  # (the first component of every module is forced: min_rank=1)
            last_ratio, last_s2 = ratio, float(s2[k - 1])
    assert kept >= tau * total * (1 - 1e-9)
    assert kept - last_s2 < tau * total
    assert len(set(res.ranks.values())) > 1  # ranks differ between layers


def test_bnb_4bit_error_is_against_the_dequantized_weights(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from adapterlab.quant import dequantize_weight, quantize_model

    dense = tiny_llama(seed=5)
    q = quantize_model(dense, 4, quant_type="nf4")
    calib = _calib()
    res = compensate(dense, q, rank=6, calibration=calib)
    assert {row.compression for row in res.modules} == {"bnb-4bit-nf4"}
    name = "model.layers.1.mlp.down_proj"
    e = dense.get_submodule(name).weight.double() - dequantize_weight(q.get_submodule(name)).double()
    x = _captured_inputs(q, name, calib, batch_size=8)
    expected, _ = _whitened_optimum(e, _dampened(x, 0.01), 6)
    assert _rel(res.delta(name), expected) < 1e-3
    # on the 4-bit base through peft: the logits of "dequantized weights + B A" in fp32
    out = res.save(tmp_path / "nf4")
    got = _logits(PeftModel.from_pretrained(q, str(out)), _calib(2, 16, seed=3))
    plain = copy.deepcopy(dense)
    with torch.no_grad():
        for n, m in _block_linears(plain).items():
            m.weight.copy_(dequantize_weight(q.get_submodule(n)) + res.delta(n))
    torch.testing.assert_close(got, _logits(plain, _calib(2, 16, seed=3)), atol=1e-3, rtol=1e-3)


def test_bad_input_is_one_clear_error(tmp_path) -> None:
    dense = tiny_llama(seed=6)
    comp = _planted(dense)
    with pytest.raises(ValueError, match="rank/energy"):
        compensate(dense, comp, rank=2, energy=0.5, calibration=_calib())
    with pytest.raises(ValueError, match="calibration"):
        compensate(dense, comp, rank=2)
    with pytest.raises(ValueError, match="space is 'eigen'"):
        compensate(dense, comp, rank=2, space="eigen")
    with pytest.raises(ValueError, match="nothing to compensate"):
        compensate(dense, copy.deepcopy(dense), rank=2, calibration=_calib())
    with pytest.raises(ValueError, match=r"dense: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape"):
        compensate(tiny_llama(intermediate_size=192), comp, rank=2, space="weight")
    with pytest.raises(FileNotFoundError, match="compressed"):
        compensate(dense, tmp_path / "missing", rank=2, space="weight")
