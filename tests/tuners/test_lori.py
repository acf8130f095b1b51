"""LoRI: common matrix, seeded frozen A, exact global mask sparsity, truly frozen masked entries,
compact storage round trip, exact concatenation, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapterlab.io import load_tensors
from adapterlab.models import tiny_llama
from adapterlab.tuners import LoriConfig
from adapterlab.tuners.lori import derive_a_seed, from_compact, kept_count, magnitude_masks, to_compact
from adapterlab.tuners.lori.layer import LoriLayer
from tests.tolerances import TOL
from tests.tuners.matrix import TARGETS, TunerCase, TunerMatrix, batch, logits, train_step


class TestLoriMatrix(TunerMatrix):
    cases = [
        TunerCase("lori_d", lambda: LoriConfig(r=4, task="t1", target_modules=TARGETS)),
        TunerCase(
            "lori_s",
            lambda: LoriConfig(r=4, task="t2", sparsity=0.5, target_modules=TARGETS),
            after_step=lambda pm: pm.sparsify_(),
            fresh_process=True,
        ),
        TunerCase(
            "lori_store_a_rslora",
            lambda: LoriConfig(r=4, task="t3", store_a=True, use_rslora=True, lora_dropout=0.1, target_modules=TARGETS),
        ),
    ]


def _lori(task: str = "t", r: int = 4, **kw):
    from peft import get_peft_model

    return get_peft_model(tiny_llama(), LoriConfig(r=r, task=task, init_weights=False, target_modules=TARGETS, **kw))


def _layers(pm):
    return [m for m in pm.modules() if isinstance(m, LoriLayer)]


def test_a_is_frozen_seeded_and_distinct_per_task():
    pm1, pm2, pm3 = _lori("sst"), _lori("sst"), _lori("code")
    assert pm1.peft_config["default"].a_seed == derive_a_seed("sst", 0) != derive_a_seed("code", 0)
    assert not any("lori_A" in n for n, _ in pm1.named_parameters())  # A is a buffer, never trained
    for l1, l2, l3 in zip(_layers(pm1), _layers(pm2), _layers(pm3)):
        a1 = l1.lori_A["default"].weight
        assert torch.equal(a1, l2.lori_A["default"].weight) and not torch.equal(a1, l3.lori_A["default"].weight)
        assert a1.abs().max() <= 1 / math.sqrt(l1.in_features)
    a_by_layer = [layer.lori_A["default"].weight for layer in _layers(pm1)]
    assert not torch.equal(a_by_layer[0], a_by_layer[2])  # q_proj of layer 0 vs layer 1 differ


def test_two_adapters_sharing_a_seed_are_refused():
    pm = _lori("a")
    with pytest.raises(ValueError, match=r"a_seed=\d+ is already used by adapter 'default'.*distinct a_seed"):
        pm.add_adapter("b", LoriConfig(r=4, task="a", target_modules=TARGETS))
    pm.add_adapter("c", LoriConfig(r=4, task="c", target_modules=TARGETS))
    pm.add_adapter("d", LoriConfig(r=4, task="a", allow_shared_a=True, target_modules=TARGETS))


@pytest.mark.parametrize("sparsity", [0.9, 0.5, 0.0, 0.37])
def test_global_mask_has_exact_sparsity_and_keeps_largest(sparsity):
    pm = _lori()
    masks = pm.extract_masks(sparsity)
    weights = {k: layer.lori_B["default"].dense().detach() for k, layer in zip(masks, _layers(pm))}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == kept_count(total, sparsity) == math.floor((1 - sparsity) * total + 1e-9)
    kept_mags = torch.cat([weights[k].abs()[m] for k, m in masks.items()])
    dropped = torch.cat([weights[k].abs()[~m] for k, m in masks.items()])
    if dropped.numel() and kept_mags.numel():
        assert kept_mags.min() >= dropped.max()  # one global threshold over all B


def test_mask_exact_count_with_ties_and_matrix_scope():
    w = {"a": torch.ones(10, 4), "b": torch.zeros(7, 3)}  # all ties: the reference's >= theta keeps everything
    m = magnitude_masks(w, 0.9)
    assert sum(int(x.sum()) for x in m.values()) == kept_count(61, 0.9) == 6
    m = magnitude_masks(w, 0.5, scope="matrix")
    assert int(m["a"].sum()) == 20 and int(m["b"].sum()) == 10
    prev = magnitude_masks({"a": torch.arange(40.0).view(10, 4)}, 0.5)
    new = magnitude_masks({"a": torch.arange(40.0).view(10, 4)}, 0.5, exclude=prev)
    assert not (new["a"] & prev["a"]).any()  # continual learning: disjoint from the earlier mask


def test_masked_entries_stay_exactly_zero_under_adamw_weight_decay():
    pm = _lori(sparsity=0.9)
    x = batch()
    train_step(pm, x, steps=2, weight_decay=0.1)  # LoRI-D with momentum
    report = pm.sparsify_()
    assert report.kept == kept_count(report.total, 0.9)
    masks = pm.masks()
    before = {k: layer.lori_B["default"].dense().detach().clone() for k, layer in zip(masks, _layers(pm))}
    train_step(pm, x, steps=3, lr=5e-2, weight_decay=0.5)
    n_params = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_params == report.kept
    for k, layer in zip(masks, _layers(pm)):
        after = layer.lori_B["default"].dense().detach()
        assert torch.equal(after[~masks[k]], torch.zeros_like(after[~masks[k]]))
    changed = sum(
        int((layer.lori_B["default"].dense().detach() != before[k]).sum()) for k, layer in zip(masks, _layers(pm))
    )
    assert changed > 0.5 * report.kept  # the kept entries do train


def test_compact_storage_roundtrips_exactly(tmp_path):
    from peft import PeftModel

    b = torch.randn(32, 8)
    mask = torch.rand(32, 8) < 0.1
    values, idx = to_compact(b, mask)
    assert idx.dtype == torch.int32 and values.numel() == int(mask.sum())
    assert torch.equal(from_compact(values, idx, (32, 8)), b * mask)

    pm = _lori(sparsity=0.9)
    pm.sparsify_()
    pm.save_pretrained(tmp_path / "s")
    tensors = load_tensors(tmp_path / "s" / "adapter_model.safetensors")
    vals = {k: v for k, v in tensors.items() if k.endswith(".values")}
    idxs = {k: v for k, v in tensors.items() if k.endswith(".indices")}
    assert vals and len(vals) == len(idxs) and all(v.dtype == torch.int32 for v in idxs.values())
    assert not any(k.endswith("lori_B.weight") or "lori_A" in k for k in tensors)  # compact; A regenerated
    assert sum(v.numel() for v in vals.values()) == pm.trainable_b_count()
    assert json.loads((tmp_path / "s" / "adapter_config.json").read_text())["variant"] == "S"
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "s"))
    for (k, m1), (_, m2) in zip(pm.masks().items(), loaded.masks().items()):
        assert torch.equal(m1, m2), k
    for l1, l2 in zip(_layers(pm), _layers(loaded)):
        assert torch.equal(l1.lori_B["default"].values, l2.lori_B["default"].values)
        assert torch.equal(l1.lori_A["default"].weight, l2.lori_A["default"].weight)
    dense_bytes = sum(layer.lori_B["default"].shape[0] * layer.lori_B["default"].shape[1] * 4 for layer in _layers(pm))
    payload = sum(v.numel() * v.element_size() for v in list(vals.values()) + list(idxs.values()))
    assert payload <= 0.21 * dense_bytes  # 10% kept x (4 B value + 4 B index) vs 4 B per dense entry


def test_concatenation_keeps_each_task_exact(tmp_path):
    from peft import PeftModel

    pm = _lori("a", r=4)
    pm.add_adapter("b", LoriConfig(r=2, task="b", init_weights=False, lora_alpha=8.0, target_modules=TARGETS))
    pm.add_adapter("c", LoriConfig(r=3, task="c", init_weights=False, use_rslora=True, target_modules=TARGETS))
    pm.base_model.set_adapter("c")
    pm.sparsify_(0.5, adapter_name="c")
    weights = [0.5, 1.0, 0.3]
    cat = pm.concat_lora_factors(["default", "b", "c"], weights)
    for layer in _layers(pm):
        a_m, b_m = cat[layer.key]
        assert a_m.shape[0] == b_m.shape[1] == 9
        expected = sum(w * layer.delta_weight(n) for w, n in zip(weights, ["default", "b", "c"]))
        torch.testing.assert_close(b_m @ a_m, expected, **TOL[torch.float32])
        offset = 0
        for w, n in zip(weights, ["default", "b", "c"]):  # block t is task t, exactly
            a, b, s = layer.factors(n)
            r = a.shape[0]
            assert torch.equal(b_m[:, offset : offset + r], b.detach().float())
            assert torch.equal(a_m[offset : offset + r], w * s * a.float())
            offset += r
    out = pm.export_concat(tmp_path / "cat", ["default", "b", "c"], weights)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == cfg["lora_alpha"] == 9
    plain = PeftModel.from_pretrained(tiny_llama(), str(out))
    x = batch()
    ref = tiny_llama()  # reference: the weighted sum of the three LoRI deltas added by hand
    with torch.no_grad():
        mods = dict(ref.named_modules())
        for layer in _layers(pm):
            w = mods[layer.key].weight
            w += sum(wt * layer.delta_weight(n) for wt, n in zip(weights, ["default", "b", "c"]))
    torch.testing.assert_close(logits(plain, x), logits(ref, x), **TOL[torch.float32])


def test_export_lora_is_plain_peft(tmp_path):
    from peft import PeftModel

    pm = _lori(sparsity=0.8)
    pm.sparsify_()
    out = pm.export_lora(tmp_path / "lora")
    plain = PeftModel.from_pretrained(tiny_llama(), str(out))
    torch.testing.assert_close(logits(plain, batch()), logits(pm, batch()), **TOL[torch.float32])


def test_bad_config_values_name_the_key():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\), got"):
            LoriConfig(sparsity=bad)
    with pytest.raises(ValueError, match=r"variant='X'.*D, S"):
        LoriConfig(variant="X")
    with pytest.raises(ValueError, match=r"mask_scope='layer'.*global, matrix"):
        LoriConfig(mask_scope="layer")
    with pytest.raises(ValueError, match=r"r must be an integer >= 1"):
        LoriConfig(r=0)
    pm = _lori()
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pm.sparsify_(1.0)


def test_unknown_target_module_names_it():
    from peft import get_peft_model

    with pytest.raises(ValueError, match=r"target_modules: 'foo' match no module.*v_proj"):
        get_peft_model(tiny_llama(), LoriConfig(target_modules=["foo"]))


@pytest.mark.parametrize("sparse", [False, True])
def test_load_onto_base_with_other_shapes(tmp_path, sparse):
    from peft import PeftModel

    pm = _lori()
    if sparse:
        pm.sparsify_()
    pm.save_pretrained(tmp_path / "a")
    other = tiny_llama(hidden_size=128, intermediate_size=256)
    with pytest.raises(ValueError, match=r"lori_B.*(expected shape|expected dims)"):
        PeftModel.from_pretrained(other, str(tmp_path / "a"))
