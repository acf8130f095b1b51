"""DyLoRA: common matrix, rsLoRA scale, rank-b oracle vs plain peft LoRA, frozen-prefix exactness, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from adapterlab.models import tiny_llama
from adapterlab.tuners import DyLoraConfig, lowrank_scale
from adapterlab.tuners.dylora import sample_rank
from adapterlab.tuners.dylora.layer import DyLoraLayer
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, TunerCase, TunerMatrix, batch, logits, train_step


class TestDyLoraMatrix(TunerMatrix):
    cases = [
        TunerCase("dylora", lambda: DyLoraConfig(r=4, target_modules=TARGETS), fresh_process=True),
        TunerCase(
            "dylora_rslora_rank2", lambda: DyLoraConfig(r=4, eval_rank=2, use_rslora=True, target_modules=TARGETS)
        ),
        TunerCase(
            "dylora_nonfrozen", lambda: DyLoraConfig(r=4, frozen_mode=False, lora_dropout=0.1, target_modules=TARGETS)
        ),
    ]


def _random_dylora(use_rslora: bool = False, r: int = 4, alpha: float = 8.0):
    from peft import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(
        tiny_llama(),
        DyLoraConfig(r=r, lora_alpha=alpha, use_rslora=use_rslora, init_weights=False, target_modules=TARGETS),
    )


def test_scale_values():
    assert lowrank_scale(16, 4) == 4.0
    assert lowrank_scale(16, 4, use_rslora=True) == 8.0  # alpha / sqrt(r)
    assert lowrank_scale(16, 64, use_rslora=True) == 2.0
    pm = _random_dylora(use_rslora=True, alpha=16.0)
    layer = next(m for m in pm.modules() if isinstance(m, DyLoraLayer))
    for b in (1, 2, 3, 4):
        assert layer.factors_at("default", b)[2] == pytest.approx(16.0 / b**0.5)
    pm = _random_dylora(alpha=16.0)
    layer = next(m for m in pm.modules() if isinstance(m, DyLoraLayer))
    assert [layer.factors_at("default", b)[2] for b in (1, 2, 4)] == [16.0, 8.0, 4.0]  # alpha / b


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_b_equals_plain_peft_lora(use_rslora, tmp_path):
    """Oracle: DyLoRA at rank b == peft LoRA(r=b, alpha) built from A[:b], B[:, :b] (also via save_at_rank)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    pm = _random_dylora(use_rslora=use_rslora)
    x = batch()
    for b in (1, 2, 3, 4):
        pm.set_rank(b)
        got = logits(pm, x)
        lora = get_peft_model(
            tiny_llama(), LoraConfig(r=b, lora_alpha=8.0, use_rslora=use_rslora, target_modules=TARGETS)
        )
        factors = pm.lora_factors(b)
        with torch.no_grad():
            for name, mod in lora.named_modules():
                key = name.removeprefix("base_model.model.")
                if key in factors:
                    mod.lora_A["default"].weight.copy_(factors[key][0])
                    mod.lora_B["default"].weight.copy_(factors[key][1])
        torch.testing.assert_close(got, logits(lora, x), **TOL[torch.float32])
        out = pm.save_at_rank(tmp_path / f"r{b}", b)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == b and cfg["use_rslora"] is use_rslora
        plain = PeftModel.from_pretrained(tiny_llama(), str(out))
        torch.testing.assert_close(logits(plain, x), got, **TOL[torch.float32])


def test_rank_sampling_deterministic_and_uniform():
    draws = [sample_rank(7, s, 2, 6) for s in range(600)]
    assert draws == [sample_rank(7, s, 2, 6) for s in range(600)]
    counts = torch.bincount(torch.tensor(draws), minlength=7)[2:]
    assert counts.min() > 80 and set(draws) == {2, 3, 4, 5, 6}
    assert draws[:50] != [sample_rank(8, s, 2, 6) for s in range(50)]


def test_frozen_mode_updates_only_bth_component_under_adamw_weight_decay():
    """At rank b only component b moves, even with weight decay and momentum from earlier steps."""
    pm = _random_dylora()
    x = batch()
    layer = next(m for m in pm.modules() if isinstance(m, DyLoraLayer))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    pm.train()
    for b in (2, 3):  # step 1 gives component 2 momentum, step 2 trains component 3 only
        before = [layer.dylora_A["default"].part(i).detach().clone() for i in range(4)]
        before_b = [layer.dylora_B["default"].part(i).detach().clone() for i in range(4)]
        pm.set_train_rank(b)
        pm(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for i in range(4):
            moved_a = not torch.equal(layer.dylora_A["default"].part(i), before[i])
            moved_b = not torch.equal(layer.dylora_B["default"].part(i), before_b[i])
            assert moved_a == moved_b == (i == b - 1), (b, i)


def test_nonfrozen_updates_all_leading_components():
    from peft import get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), DyLoraConfig(r=4, frozen_mode=False, init_weights=False, target_modules=TARGETS))
    layer = next(m for m in pm.modules() if isinstance(m, DyLoraLayer))
    before = layer.dylora_B["default"].full().detach().clone()
    pm.set_train_rank(3)
    train_step(pm, batch())
    moved = (layer.dylora_B["default"].full().detach() != before).any(0)  # (r,)
    assert moved.tolist() == [True, True, True, False]


def test_eval_uses_inference_rank_and_merge_rank_is_pinned():
    pm = _random_dylora()
    x = batch()
    pm.set_rank(2)
    at2 = logits(pm, x)
    pm.set_train_rank(4)  # a sampled training rank does not leak into eval
    torch.testing.assert_close(logits(pm, x), at2, rtol=0, atol=0)
    pm.base_model.merge_adapter()
    torch.testing.assert_close(logits(pm, x), at2, **TOL[torch.float32])
    with pytest.raises(RuntimeError, match="unmerge before set_rank"):
        pm.set_rank(3)
    pm.base_model.unmerge_adapter()
    pm.set_rank(3)
    assert pm.peft_config["default"].eval_rank == 3
    assert not torch.allclose(logits(pm, x), at2)


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match=r"r_min=5 > r=4.*1 <= r_min <= r"):
        DyLoraConfig(r=4, r_min=5)
    with pytest.raises(ValueError, match=r"r_min must be an integer >= 1, got 0"):
        DyLoraConfig(r=4, r_min=0)
    with pytest.raises(ValueError, match=r"r must be an integer >= 1"):
        DyLoraConfig(r=0)
    with pytest.raises(ValueError, match=r"eval_rank=9 must be in \[r_min, r\] = \[1, 8\]"):
        DyLoraConfig(r=8, eval_rank=9)
    with pytest.raises(ValueError, match=r"rank_distribution='gauss'.*uniform"):
        DyLoraConfig(rank_distribution="gauss")
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        DyLoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="rank range is empty"):
        sample_rank(0, 0, 3, 2)
    pm = _random_dylora()
    with pytest.raises(ValueError, match=r"rank=5 is outside the trained range \[r_min, r\] = \[1, 4\]"):
        pm.set_rank(5)


def test_unknown_target_module_names_it():
    from peft import get_peft_model

    with pytest.raises(ValueError, match=r"target_modules: 'qproj' match no module.*q_proj"):
        get_peft_model(tiny_llama(), DyLoraConfig(target_modules=["qproj", "v_proj"]))


def test_load_onto_base_with_other_shapes(tmp_path):
    from peft import PeftModel

    pm = _random_dylora()
    pm.save_pretrained(tmp_path / "a")
    other = tiny_llama(hidden_size=128, intermediate_size=256)
    with pytest.raises(ValueError, match=r"dylora_A.*expected shape \(4, \d+\)"):
        PeftModel.from_pretrained(other, str(tmp_path / "a"))
