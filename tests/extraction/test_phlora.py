"""PHLoRA oracles: a planted rank-r delta comes back at rank r, error non-increasing in rank, the
saved folder loads in peft, extras are reported / stored / skipped, and bad input is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterlab.extraction import energy_rank, extract_lora, low_rank_factors
from adapterlab.models import tiny_llama

R = 3
PLANTED = ("q_proj", "down_proj")


def _tuned(seed: int = 0, norm: bool = True) -> torch.nn.Module:
    """tiny_llama() plus a planted rank-R delta on q_proj / down_proj (and a changed final norm)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(t in name for t in PLANTED) and name.endswith("weight"):
                p.add_(torch.randn(p.shape[0], R, generator=g) @ torch.randn(R, p.shape[1], generator=g) * 0.02)
        if norm:
            model.model.norm.weight.add_(0.05)
    return model


def test_low_rank_factors_planted_rank_and_monotone_error() -> None:
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(48, 5, generator=g) @ torch.randn(5, 80, generator=g)  # rank 5
    errs = []
    for k in range(1, 8):
        lr = low_rank_factors(delta, rank=k)
        errs.append(float((delta - lr.B @ lr.A).norm()))
        assert lr.B.shape == (48, min(k, 48)) and lr.A.shape == (min(k, 48), 80)
    assert all(a >= b - 1e-5 for a, b in zip(errs, errs[1:]))
    lr5 = low_rank_factors(delta, rank=5)
    assert float((lr5.B @ lr5.A - delta).abs().max()) <= 1e-5 * float(delta.abs().max())
    assert lr5.energy == pytest.approx(1.0, abs=1e-6)
    # balanced split: B and A share sqrt(S)
    torch.testing.assert_close(lr5.B.norm(dim=0), lr5.A.norm(dim=1), atol=1e-4, rtol=1e-4)
    rnd = low_rank_factors(delta, rank=5, randomized=True)
    torch.testing.assert_close(rnd.B @ rnd.A, delta, atol=1e-4, rtol=1e-4)


def test_energy_rank_rule() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.65) == 2
    assert energy_rank(s, 13 / 14) == 2
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_extract_planted_rank_round_trips_through_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    base, tuned = tiny_llama(), _tuned()
    res = extract_lora(base, tuned, rank=R)
    assert set(res.ranks) == {n for n, _ in tuned.named_modules() if n.endswith(PLANTED)}
    for name in res.ranks:
        d = (tuned.get_submodule(name).weight - base.get_submodule(name).weight).detach()
        assert float((res.delta(name) - d).abs().max()) <= 1e-5 * float(d.abs().max()) + 1e-7
    assert res.global_energy == pytest.approx(1.0, abs=1e-6)
    assert sorted(res.extras) == ["model.norm"]
    rows = {m.name: m for m in res.modules}
    assert rows["model.norm"].stored_as == "modules_to_save"
    assert rows["model.layers.0.self_attn.k_proj"].stored_as == "unchanged"
    res.save(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == R and cfg["lora_alpha"] == R and cfg["modules_to_save"] == ["model.norm"]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ad"))
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, tuned(x).logits, atol=1e-4, rtol=1e-4)
    report = json.loads((tmp_path / "ad" / "phlora_report.json").read_text())
    assert report["modules_to_save"] == ["model.norm"] and report["global_energy"] == pytest.approx(1.0, abs=1e-6)


def test_extract_error_non_increasing_in_rank_and_energy_rank_pattern(tmp_path: Path) -> None:
    from peft import PeftModel

    base, tuned = tiny_llama(), _tuned(norm=False)
    name = "model.layers.1.mlp.down_proj"
    d = (tuned.get_submodule(name).weight - base.get_submodule(name).weight).detach()
    errs = [float((extract_lora(base, tuned, rank=k).delta(name) - d).norm()) for k in (1, 2, 3, 4)]
    assert all(a >= b - 1e-6 for a, b in zip(errs, errs[1:])) and errs[2] < 1e-5 * float(d.norm())
    # energy: per-module ranks -> rank_pattern / alpha_pattern; peft applies scale 1 per module
    with torch.no_grad():  # make one module need a different rank
        tuned.get_submodule(name).weight.add_(torch.randn(d.shape) * 1e-2)
    res = extract_lora(base, tuned, energy=0.95, max_rank=20)
    assert res.ranks[name] > R and all(m.energy >= 0.95 - 1e-6 for m in res.modules if m.stored_as == "lora")
    res.save(tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    merged = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ad")).merge_and_unload()
    for n in res.ranks:
        torch.testing.assert_close(
            merged.get_submodule(n).weight, base.get_submodule(n).weight + res.delta(n), atol=1e-5, rtol=1e-4
        )


def test_extract_from_folders_and_skip_extras(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    _tuned().save_pretrained(tmp_path / "tuned")
    res = extract_lora(tmp_path / "base", tmp_path / "tuned", rank=R, extras="skip")
    assert not res.extras and {m.name: m.stored_as for m in res.modules}["model.norm"] == "skipped"
    assert res.sources["tuned"]["sha256"]
    mem = extract_lora(tiny_llama(), _tuned(), rank=R, extras="skip")
    for n in mem.ranks:
        torch.testing.assert_close(res.delta(n), mem.delta(n))


def test_extract_bad_input(tmp_path: Path) -> None:
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"^tuned: tensor 'model.embed_tokens.weight' has shape \[130, 64\]"):
        extract_lora(base, tiny_llama(vocab_size=130), rank=2)
    with pytest.raises(ValueError, match=r"^rank/energy: give exactly one"):
        extract_lora(base, _tuned(), rank=2, energy=0.9)
    with pytest.raises(ValueError, match=r"^energy must be in \(0, 1\]"):
        extract_lora(base, _tuned(), energy=1.5)
    with pytest.raises(ValueError, match=r"^randomized: "):
        extract_lora(base, _tuned(), energy=0.9, randomized=True)
    with pytest.raises(ValueError, match=r"^tuned: the tuned model equals the base"):
        extract_lora(base, tiny_llama(), rank=2)
    with pytest.raises(FileNotFoundError, match=r"model path"):
        extract_lora(base, tmp_path / "missing", rank=2)


def test_tied_embedding_change_is_stored_and_loads(tmp_path: Path) -> None:
    from peft import PeftModel

    base, tuned = tiny_llama(tie_word_embeddings=True), tiny_llama(tie_word_embeddings=True)
    with torch.no_grad():
        tuned.model.embed_tokens.weight.add_(0.01)
        tuned.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    res = extract_lora(base, tuned, rank=1)
    assert sorted(res.extras) == ["lm_head", "model.embed_tokens"]
    res.save(tmp_path / "ad")
    loaded = PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), str(tmp_path / "ad"))
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, tuned(x).logits, atol=1e-4, rtol=1e-4)


def test_global_energy_ranks_by_hand() -> None:
    """Module a costs 10 per rank with σ² = [9, 1]; b costs 20 with σ² = [16, 4] (total 30).
    Worth per parameter: a0 0.9, b0 0.8, b1 0.2, a1 0.1. Energy 0.8 (24) takes a0 + b0 = 25;
    0.9 (27) adds b1 (29); 0.99 (29.7) needs a1 too; max_rank=1 caps both at 1 (25 < 27)."""
    from adapterlab.extraction.functional import global_energy_ranks

    spectra = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0, 2.0])}
    costs = {"a": 10, "b": 20}
    assert global_energy_ranks(spectra, costs, 0.8) == {"a": 1, "b": 1}
    assert global_energy_ranks(spectra, costs, 0.9) == {"a": 1, "b": 2}
    assert global_energy_ranks(spectra, costs, 0.99) == {"a": 2, "b": 2}
    assert global_energy_ranks(spectra, costs, 0.9, max_rank=1) == {"a": 1, "b": 1}
    assert global_energy_ranks(spectra, costs, 0.1, min_rank=2) == {"a": 2, "b": 2}
    # a delta energy the spectra do not hold (truncated spectrum) counts in the total
    assert global_energy_ranks(spectra, costs, 0.8, totals={"a": 10.0, "b": 30.0}) == {"a": 2, "b": 2}


def test_extract_global_energy_scope() -> None:
    """Global scope keeps >= energy of the summed delta energy, with the ranks of the greedy rule,
    and never more parameters than the per-module rule at the same or lower global energy."""
    from adapterlab.extraction.functional import global_energy_ranks

    base, tuned = tiny_llama(), _tuned()
    g = extract_lora(base, tuned, energy=0.9, energy_scope="global", extras="skip", solver="gram")
    assert g.global_energy >= 0.9 - 1e-6
    deltas = {n: tuned.get_submodule(n).weight.detach() - base.get_submodule(n).weight.detach() for n in g.ranks}
    spectra = {n: torch.linalg.svdvals(d) for n, d in deltas.items()}
    want = global_energy_ranks(spectra, {n: sum(d.shape) for n, d in deltas.items()}, 0.9)
    assert g.ranks == want
    m = extract_lora(base, tuned, energy=0.9, extras="skip", solver="gram")
    assert g.n_params() <= m.n_params()
    with pytest.raises(ValueError, match="energy_scope"):
        extract_lora(base, tuned, rank=2, energy_scope="global")
    with pytest.raises(ValueError, match="energy_scope"):
        extract_lora(base, tuned, energy=0.5, energy_scope="layer")
