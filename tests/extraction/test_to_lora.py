"""Oracle tests of the export of every adapter kind to a plain PEFT LoRA (adapterlab.extraction.to_lora).

The true delta of each kind is computed from its saved tensors alone (tests/extraction/_export_kinds.py);
exact kinds must reproduce it, truncated ones must report exactly the brute-force relative error, which
must be the Eckart–Young optimum of the rank they chose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterlab.extraction.to_lora import VLLM_RANKS, lora_input, to_lora, vllm_rank
from tests.extraction._export_kinds import DENSE, make_adapter, rel, true_deltas, written_deltas

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXACT = ("lora", "rslora", "lori", "lori-s", "dylora")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export-kinds")


def _optimal_error(D: torch.Tensor, k: int) -> float:
    """Eckart–Young: the smallest relative Frobenius error of any rank-k matrix."""
    s = torch.linalg.svdvals(D.double())
    return math.sqrt(float(s[k:].square().sum()) / float(s.square().sum()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", EXACT)
def test_exact_kinds_reproduce_the_true_delta(root: Path, kind: str, dtype: torch.dtype) -> None:
    src = make_adapter(kind, root, dtype)
    out = root / f"exact-{kind}-{dtype}"
    ex = to_lora(lora_input(src, base=root / "base"))
    ex.save(out)
    true = true_deltas(src, root / "base")
    got = written_deltas(out)
    assert set(got) == set(true)
    for m in true:  # the stored factors themselves, the scale in lora_alpha: exact up to fp32 rounding
        assert rel(got[m], true[m]) < 1e-6, m
    assert ex.exact and ex.total_error == 0.0 and all(r.error == 0.0 and r.how == "exact" for r in ex.modules)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {dtype}  # the adapter's dtype is kept
    report = json.loads((out / "export_report.json").read_text())
    assert report["exact"] is True and report["total_error"] == 0.0 and len(report["modules"]) == len(true)
    if kind in ("lora", "rslora"):  # bit for bit: the stored tensors are written unchanged
        stored = load_file(str(src / "adapter_model.safetensors"))
        for key, t in tensors.items():
            assert torch.equal(t, stored[key]), key


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", DENSE)
def test_truncated_kinds_report_the_brute_force_error(root: Path, kind: str, dtype: torch.dtype) -> None:
    src = make_adapter(kind, root, dtype)
    ex = to_lora(lora_input(src, base=root / "base"), rank=8)
    true = true_deltas(src, root / "base")
    assert set(ex.factors) == set(true) and not ex.exact
    num = den = 0.0
    for row in ex.modules:
        D, got = true[row.name], ex.delta(row.name).double()
        brute = rel(got, D)
        assert row.how == "svd" and row.rank == 8
        assert row.error == pytest.approx(brute, rel=1e-4, abs=1e-6)
        assert row.error == pytest.approx(_optimal_error(D, 8), rel=1e-4, abs=1e-6)  # the best rank-8 matrix
        num += float((got - D).norm()) ** 2
        den += float(D.norm()) ** 2
    assert ex.total_error == pytest.approx(math.sqrt(num / den), rel=1e-4)
    out = root / f"trunc-{kind}-{dtype}"
    ex.save(out)
    written = written_deltas(out)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {dtype}
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # one rounding of the factors to the adapter's dtype
    for m in true:
        assert rel(written[m], ex.delta(m).double()) < tol


def test_energy_takes_the_smallest_rank_keeping_it(root: Path) -> None:
    src = make_adapter("shira", root)
    ex = to_lora(lora_input(src), energy=0.8)
    true = true_deltas(src)
    for row in ex.modules:
        s2 = torch.linalg.svdvals(true[row.name]).square()
        k = int((torch.cumsum(s2, 0) < 0.8 * s2.sum()).sum()) + 1  # smallest k with Σ_{i<=k} σ² >= 0.8 Σ σ²
        assert row.rank == k
        assert row.energy >= 0.8 and row.energy == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-5)
        assert row.error == pytest.approx(math.sqrt(1 - row.energy), rel=1e-3)


def test_lora_rank_change_pads_exactly_or_truncates_optimally(root: Path) -> None:
    src = make_adapter("rslora", root)
    true = true_deltas(src)
    up = to_lora(lora_input(src), rank=6)  # above r = 4: zero-padded, exact
    assert up.exact and up.rank == 6
    for m in true:
        assert rel(up.delta(m).double(), true[m]) < 1e-6
    down = to_lora(lora_input(src), rank=2)  # below r: the best rank-2 approximation of s·B A
    assert not down.exact and down.rank == 2
    for row in down.modules:
        assert row.how == "truncated" and row.source_rank == 4
        assert row.error == pytest.approx(rel(down.delta(row.name).double(), true[row.name]), rel=1e-4)
        assert row.error == pytest.approx(_optimal_error(true[row.name], 2), rel=1e-4)
    full = to_lora(lora_input(src), energy=1.0)  # needs every rank: kept exactly
    assert full.exact


def test_dylora_exports_any_of_its_nested_ranks_exactly(root: Path) -> None:
    src = make_adapter("dylora", root)
    for b in (1, 3, 6):
        ex = to_lora(lora_input(src, base=root / "base", dylora_rank=b))
        true = true_deltas(src, dylora_rank=b)
        assert ex.exact and ex.rank == b and ex.source["dylora_rank"] == b
        for m in true:
            assert rel(ex.delta(m).double(), true[m]) < 1e-6
    with pytest.raises(ValueError, match=r"\[r_min, r\] = \[1, 6\]"):
        lora_input(src, base=root / "base", dylora_rank=7)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_vllm_padding_gives_the_identical_delta(root: Path, dtype: torch.dtype) -> None:
    src = make_adapter("lora", root, dtype)
    plain, padded = root / f"plain-{dtype}", root / f"padded-{dtype}"
    to_lora(lora_input(src)).save(plain)
    to_lora(lora_input(src), for_vllm=True, served_name="org/base").save(padded)
    cfg = json.loads((padded / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and not cfg.get("rank_pattern")
    assert cfg["base_model_name_or_path"] == "org/base"
    a, b = written_deltas(plain), written_deltas(padded)
    for m in a:
        assert torch.equal(a[m], b[m]), m  # zero columns change nothing
    t = load_file(str(padded / "adapter_model.safetensors"))
    some = next(k for k in t if k.endswith("lora_A.weight"))
    assert t[some].shape[0] == 8 and torch.count_nonzero(t[some][4:]) == 0


def test_vllm_mixed_energy_ranks_become_one_allowed_rank(root: Path) -> None:
    src = make_adapter("snell", root)
    ex = to_lora(lora_input(src, base=root / "base"), energy=0.9)
    ranks = {r.rank for r in ex.modules}
    assert len(ranks) > 1  # the energy rule chose different ranks per module
    vl = to_lora(lora_input(src, base=root / "base"), energy=0.9, for_vllm=True)
    assert {int(a.shape[0]) for _, a in vl.factors.values()} == {vllm_rank(max(ranks))}
    for m in ex.factors:
        torch.testing.assert_close(vl.delta(m), ex.delta(m), atol=0, rtol=0)
    assert vllm_rank(1) == 1 and vllm_rank(9) == 16 and vllm_rank(257) == 320 and VLLM_RANKS[-1] == 512
    with pytest.raises(ValueError, match="above vLLM's largest LoRA rank 512"):
        vllm_rank(513)


def test_max_error_refuses_and_writes_nothing(root: Path) -> None:
    src = make_adapter("lors", root)
    inp = lora_input(src, base=root / "base")
    ok = to_lora(inp, rank=8)
    worst = max(r.error for r in ok.modules)
    assert to_lora(inp, rank=8, max_error=worst * 1.01).total_error <= worst
    with pytest.raises(ValueError, match=r"is above --max-error .*nothing was written"):
        to_lora(inp, rank=8, max_error=worst * 0.99)


def test_dense_kinds_need_a_rank_or_an_energy(root: Path) -> None:
    with pytest.raises(ValueError, match="shira adapter's delta is not low rank: give --rank R"):
        to_lora(lora_input(make_adapter("shira", root)))


def test_peft_loads_the_export_and_adds_the_delta(root: Path) -> None:
    """The written folder through peft itself: merged weight = base + the true delta."""
    from peft import PeftModel

    from tests.extraction._export_kinds import base_model

    src = make_adapter("lori-s", root)
    out = root / "peft-load"
    to_lora(lora_input(src), for_vllm=True).save(out)
    base = base_model()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    true = true_deltas(src)
    for m, D in true.items():
        w = merged.get_submodule(m).weight.detach().double()
        assert rel(w - before[f"{m}.weight"].double(), D) < 1e-5


def test_embedding_and_lm_head_loras_export_exactly(root: Path) -> None:
    """LoRA on embed_tokens (peft's transposed lora_embedding_A/B) and lm_head: peft merging the export
    gives the weights peft merging the original gives."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tests.extraction._export_kinds import base_model

    src, out = root / "emb-lora", root / "emb-export"
    pm = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=3, target_modules=["embed_tokens", "lm_head"]))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(str(src), save_embedding_layers=False)
    to_lora(lora_input(src), for_vllm=True).save(out)
    want = PeftModel.from_pretrained(base_model(), str(src)).merge_and_unload()
    got = PeftModel.from_pretrained(base_model(), str(out)).merge_and_unload()
    for name in ("model.embed_tokens", "lm_head"):
        w0 = base_model().get_submodule(name).weight
        delta_want = (want.get_submodule(name).weight - w0).detach().double()
        assert float(delta_want.norm()) > 0
        assert rel((got.get_submodule(name).weight - w0).detach().double(), delta_want) < 1e-5
    t = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("embed_tokens.lora_embedding_A") for k in t)
