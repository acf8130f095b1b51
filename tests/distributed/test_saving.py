"""save_adapter in one process: save_pretrained plus a read-back check; a partial or empty adapter never lands."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

from adapterlab import distributed as D
from adapterlab.io import load_tensors, save_tensors
from adapterlab.models import tiny_llama
from adapterlab.tuners import DyLoraConfig, LoriConfig, save_adapter


def _model(cfg=None):
    return get_peft_model(tiny_llama(), cfg or DyLoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))


def test_writes_what_save_pretrained_writes(tmp_path):
    model = _model()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    out = save_adapter(model, tmp_path / "a")
    model.save_pretrained(str(tmp_path / "b"))
    assert out == tmp_path / "a"
    a, b = (load_tensors(tmp_path / x / "adapter_model.safetensors") for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    assert D.fingerprint(get_peft_model_state_dict(loaded)) == D.fingerprint(a)


def test_a_named_adapter_and_overwrite(tmp_path):
    model = _model(LoriConfig(r=2, lora_alpha=4, target_modules=["v_proj"]))
    model.add_adapter("second", LoriConfig(r=2, lora_alpha=4, target_modules=["v_proj"], task="second"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stale.txt").write_text("old")
    save_adapter(model, tmp_path / "a", adapter_name="second")
    assert (tmp_path / "a" / "second" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "a" / "stale.txt").read_text() == "old"  # other files (checkpoints) stay
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        save_adapter(model, tmp_path / "c", adapter_name="nope")
    with pytest.raises(ValueError, match="state_dict"):
        save_adapter(model, tmp_path / "c", state_dict={})


def test_a_partial_write_is_caught_and_nothing_lands(tmp_path, monkeypatch):
    """The read-back check: a file holding one shard of a tensor (the FSDP / ZeRO-3 failure) is refused."""
    model = _model()
    real = type(model).save_pretrained

    def partial(self, directory, **kwargs):
        real(self, directory, **kwargs)
        path = f"{directory}/adapter_model.safetensors"
        t = load_tensors(path)
        key = sorted(t)[0]
        t[key] = t[key][: max(1, t[key].shape[0] // 2)].clone()  # half the rows: one rank's shard
        save_tensors(path, t)

    monkeypatch.setattr(type(model), "save_pretrained", partial)
    with pytest.raises(ValueError, match="a shard instead of the whole tensor"):
        save_adapter(model, tmp_path / "a")
    assert not list((tmp_path / "a").iterdir())  # nothing landed
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging folder left either


def test_check_same_tensors():
    a = {"x": torch.arange(4.0), "i": torch.tensor([1, 2], dtype=torch.int32)}
    D.check_same_tensors({k: v.clone() for k, v in a.items()}, a, "out")
    with pytest.raises(ValueError, match="empty adapter"):
        D.check_same_tensors({}, {}, "out")
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        D.check_same_tensors({"i": a["i"]}, a, "out")
    with pytest.raises(ValueError, match="a shard instead"):
        D.check_same_tensors({"x": a["x"][:2], "i": a["i"]}, a, "out")
    with pytest.raises(ValueError, match="other values"):
        D.check_same_tensors({"x": a["x"] + 1, "i": a["i"]}, a, "out")


def test_full_tensors_passes_plain_tensors_through():
    t = torch.ones(2, requires_grad=True)
    out = D.full_tensors({"t": t})
    assert torch.equal(out["t"], t.detach()) and not out["t"].requires_grad and out["t"].data_ptr() != t.data_ptr()
    with pytest.raises(ValueError, match="only plain tensors and DTensors"):
        D.full_tensors({"t": [1, 2]})  # type: ignore[dict-item]
