from __future__ import annotations

import importlib.metadata

import pytest
import torch

from adapterlab import models
from adapterlab._paths import MissingAssetError


def test_tiny_llama_is_deterministic_and_runs():
    a, b = models.tiny_llama(seed=3), models.tiny_llama(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    out = a(input_ids=torch.randint(0, 100, (2, 9))).logits
    assert out.shape == (2, 9, 128)
    assert len(models.decoder_layers(a)) == 2
    assert set(models.block_linears(models.decoder_layers(a)[0])) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    }


def test_decoder_layers_through_peft_and_opt():
    import peft

    model = models.tiny_llama()
    layers = models.decoder_layers(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"]))
    assert models.decoder_layers(wrapped) is layers
    assert len(models.decoder_layers(models.tiny_opt())) == 2


def test_tiny_tokenizer_round_trip():
    tok = models.tiny_tokenizer()
    text = "Hello, world!\nok"
    ids = tok(text).input_ids
    assert len(ids) == len(text) and max(ids) < 128
    assert tok.decode(ids) == text


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.resolve_model_path(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        models.load_model("someorg/some-model")


def test_missing_asset_names_the_command(monkeypatch):
    def boom(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", boom)
    with pytest.raises(MissingAssetError, match="adapterlab assets"):
        models.default_gguf_path()


@pytest.mark.assets
def test_default_model_loads_from_cache():
    model, tok = models.load_default_model()
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # the cache is a plain safetensors folder: no pickle, no GGUF quantizer left
    folder = models.default_model_dir()
    assert (folder / "model.safetensors").exists()
    assert not list(folder.glob("*.bin"))
    assert getattr(model.config, "quantization_config", None) is None
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        nxt = model(input_ids=ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"
