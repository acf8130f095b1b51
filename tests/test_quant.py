"""bitsandbytes 4/8-bit bases on CPU: loading, shape rule, dequantization, LoRA training."""

from __future__ import annotations

import logging

import pytest
import torch

from adapterlab import quant
from adapterlab.models import tiny_llama

pytest.importorskip("bitsandbytes")

#: Relative Frobenius error of the logits vs fp32 on the tiny random model (measured: nf4 ~0.10,
#: fp4 ~0.15, 8-bit ~0.01); bounds leave ~2x headroom.
LOGIT_REL_ERR = {("4", "nf4"): 0.25, ("4", "fp4"): 0.3, ("8", "nf4"): 0.03}
#: Largest half-gap between adjacent codes, times the block absmax, bounds the 4-bit rounding error
#: (NF4: between -1 and -0.6962; FP4: between 0.6667 and 1).
HALF_GAP = {"nf4": (1.0 - 0.6961928009986877) / 2, "fp4": (1.0 - 0.6666666865348816) / 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def odd_dir(tmp_path_factory):
    """k_proj/v_proj have out_features = 3 kv heads * 16 = 48 (not a multiple of 32)."""
    path = tmp_path_factory.mktemp("odd") / "model"
    tiny_llama(hidden_size=192, num_attention_heads=12, num_key_value_heads=3).save_pretrained(path)
    return path


def _x() -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits.float()


@pytest.mark.parametrize("bits,quant_type", [(4, "nf4"), (4, "fp4"), (8, "nf4")])
def test_load_quantized_close_to_fp32(tiny_dir, bits, quant_type):
    ref = _logits(tiny_llama(), _x())
    q = quant.load_quantized(tiny_dir, bits, quant_type=quant_type)
    info = quant.quant_info(q)
    assert info["bits"] == bits and info["n_quantized"] == 14  # 2 layers x 7 linears
    assert info["skipped"] == ["lm_head"] and info["n_cpu_repacked"] == 0 and not info["cpu_repack"]
    if bits == 4:
        assert info["quant_type"] == quant_type and info["compute_dtype"] == "float32"
    got = _logits(q, _x())
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < LOGIT_REL_ERR[(str(bits), quant_type)]


def test_bad_input_names_choices(tiny_dir):
    with pytest.raises(ValueError, match=r"bits=3.*4, 8"):
        quant.load_quantized(tiny_dir, 3)
    with pytest.raises(ValueError, match=r"quant_type='int4'.*nf4, fp4"):
        quant.load_quantized(tiny_dir, 4, quant_type="int4")
    with pytest.raises(FileNotFoundError):
        quant.load_quantized(tiny_dir / "missing", 4)


def test_shape_rule_skips_or_raises(odd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="adapterlab.quant"):
        q = quant.load_quantized(odd_dir, 4)
    expected = {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj")}
    info = quant.quant_info(q)
    assert set(info["skipped"]) == expected | {"lm_head"} and info["n_quantized"] == 10
    assert "k_proj" in caplog.text and "full precision" in caplog.text
    assert torch.isfinite(_logits(q, _x())).all()
    # the skipped layers also make the (opt-in) CPU repack path safe
    q = quant.load_quantized(odd_dir, 4, cpu_repack=True)
    assert torch.isfinite(_logits(q, _x())).all()

    with pytest.raises(ValueError, match=r"4 linear layer\(s\).*k_proj.*strict=False"):
        quant.load_quantized(odd_dir, 4, strict=True)
    # 8-bit has no shape constraint on CPU
    q8 = quant.load_quantized(odd_dir, 8)
    assert quant.quant_info(q8)["skipped"] == ["lm_head"]
    assert torch.isfinite(_logits(q8, _x())).all()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_4bit_before_and_after_forward(tiny_dir, quant_type):
    fp32 = tiny_llama()
    q = quant.load_quantized(tiny_dir, 4, quant_type=quant_type)
    names = [n for n, m in q.named_modules() if quant.is_4bit(m)]
    before = {n: quant.dequantize_weight(q.get_submodule(n)) for n in names}
    _logits(q, _x())
    for n in names:
        after = quant.dequantize_weight(q.get_submodule(n))
        torch.testing.assert_close(after, before[n], rtol=0, atol=0)
        w = fp32.get_submodule(n).weight.detach()
        assert after.dtype == torch.float32 and after.shape == w.shape
        # oracle bound: per 64-block error <= half the largest code gap * block absmax
        err = (after - w).abs().reshape(-1, 64)
        absmax = w.abs().reshape(-1, 64).amax(dim=1, keepdim=True)
        assert (err <= HALF_GAP[quant_type] * absmax * 1.01 + 1e-7).all()
        assert ((after - w).norm() / w.norm()).item() < 0.15


def test_dequantize_8bit_before_and_after_forward(tiny_dir):
    fp32 = tiny_llama()
    q = quant.load_quantized(tiny_dir, 8)
    names = [n for n, m in q.named_modules() if quant.is_8bit(m)]
    before = {n: quant.dequantize_weight(q.get_submodule(n)) for n in names}
    _logits(q, _x())
    assert q.get_submodule(names[0]).weight.SCB is None  # bnb moved the scales to state.SCB
    for n in names:
        after = quant.dequantize_weight(q.get_submodule(n))
        torch.testing.assert_close(after, before[n], rtol=0, atol=0)
        w = fp32.get_submodule(n).weight.detach()
        # half an int8 step per row, plus bnb's fp16 rounding of the weight before quantizing
        bound = w.abs().amax(dim=1, keepdim=True) * (0.5 / 127 + 2**-11)
        assert ((after - w).abs() <= bound + 1e-7).all()


def test_cpu_repack_facts(tiny_dir, tmp_path):
    """With the repack allowed, a forward repacks in place; dequantize_weight and unpack_cpu_ stay correct."""
    from bitsandbytes.functional import dequantize_4bit, has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    q = quant.load_quantized(tiny_dir, 4, cpu_repack=True)
    layer = q.model.layers[0].mlp.down_proj  # 64 x 128
    before = quant.dequantize_weight(layer)
    raw_shape = tuple(layer.weight.shape)
    _logits(q, _x())
    assert quant.quant_info(q)["n_cpu_repacked"] == 14
    assert tuple(layer.weight.shape) == (64, 64) != raw_shape  # [N, K/2] layout
    naive = dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # what peft would read
    assert (naive - before).abs().max() > 10 * (before - quant.dequantize_weight(layer)).abs().max()
    after = quant.dequantize_weight(layer)
    torch.testing.assert_close(after, before, rtol=2**-7, atol=0)  # absmax rounded to bf16
    assert quant.unpack_cpu_(q) == 14 and quant.quant_info(q)["n_cpu_repacked"] == 0
    torch.testing.assert_close(quant.dequantize_weight(layer), after, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_4bit(layer.weight.data, layer.weight.quant_state), after, rtol=0, atol=0)
    # after unpack_cpu_, save/reload keeps the weights (bnb's own inverse would scramble a non-nested absmax)
    from transformers import AutoModelForCausalLM

    q.save_pretrained(tmp_path / "q4")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map={"": "cpu"})
    torch.testing.assert_close(quant.dequantize_weight(reloaded.model.layers[0].mlp.down_proj), after, rtol=0, atol=0)


def _train_lora(model, steps: int = 6):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    trainable = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    x = _x()
    losses = []
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = pm(x, labels=x).loss
        loss.backward()
        assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
        opt.step()
        losses.append(loss.item())
    changed = [n for n, p in pm.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
    return losses, len(changed), len(trainable)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_trains_on_quantized_base_after_inference(tiny_dir, bits):
    q = quant.load_quantized(tiny_dir, bits)
    _logits(q, _x())  # an eval forward first: with bnb's CPU repack this would kill all gradients
    losses, n_changed, n_trainable = _train_lora(q)
    assert n_changed == n_trainable
    assert losses[-1] < losses[0] - 0.05


def test_quantize_model_matches_load_from_folder(tiny_dir):
    base = tiny_llama()
    base.config._name_or_path = "tiny-test"
    q = quant.quantize_model(base, 4)
    ref = quant.load_quantized(tiny_dir, 4)
    assert q.config._name_or_path == "tiny-test"
    for n, m in q.named_modules():
        if quant.is_4bit(m):
            torch.testing.assert_close(quant.dequantize_weight(m), quant.dequantize_weight(ref.get_submodule(n)))
    assert not any(quant.module_quantization(m) for m in base.modules())  # input untouched
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(q, 4)


def test_dequantize_weight_plain_and_peft_layers():
    from peft import LoraConfig, get_peft_model

    model = tiny_llama()
    lin = model.model.layers[0].self_attn.q_proj
    w = quant.dequantize_weight(lin)
    assert torch.equal(w, lin.weight) and w.data_ptr() != lin.weight.data_ptr()
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(quant.dequantize_weight(wrapped), w)
    assert quant.module_quantization(wrapped) is None


def test_quantized_cache_roundtrip(tiny_dir, tmp_path, monkeypatch):
    import bitsandbytes.functional as bnbF

    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    first = quant.load_quantized(tiny_dir, 4, double_quant=True, cache=True)
    entries = list((tmp_path / "cache" / "quantized").iterdir())
    assert len(entries) == 1 and (entries[0] / "config.json").is_file()

    def no_quantize(*args, **kwargs):
        raise AssertionError("a cached load must not quantize again")

    monkeypatch.setattr(bnbF, "quantize_4bit", no_quantize)
    second = quant.load_quantized(tiny_dir, 4, double_quant=True, cache=True)
    assert second.config._name_or_path == str(tiny_dir)
    assert quant.quant_info(second) == quant.quant_info(first)
    assert quant.quant_info(second)["double_quant"] and not quant.quant_info(second)["cpu_repack"]
    for n, m in first.named_modules():
        if quant.is_4bit(m):
            got = quant.dequantize_weight(second.get_submodule(n))
            torch.testing.assert_close(got, quant.dequantize_weight(m), rtol=0, atol=0)
    torch.testing.assert_close(_logits(second, _x()), _logits(first, _x()), rtol=0, atol=0)
    # other settings get another entry; cache=False neither reads nor writes
    monkeypatch.undo()
    monkeypatch.setenv("ADAPTERLAB_CACHE", str(tmp_path / "cache"))
    quant.load_quantized(tiny_dir, 4, quant_type="fp4", cache=False)
    assert len(list((tmp_path / "cache" / "quantized").iterdir())) == 1


def test_user_skip_patterns_count_as_skipped(odd_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="adapterlab.quant"):
        q = quant.load_quantized(odd_dir, 4, skip_modules=["k_proj", "v_proj", "down_proj"], strict=True)
    assert "full precision" not in caplog.text
    info = quant.quant_info(q)
    assert info["n_quantized"] == 8 and info["n_skipped"] == 7  # 2 x (k, v, down) + lm_head
