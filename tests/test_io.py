"""Safetensors-only I/O, hashing and base fingerprints."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from adapterlab import io
from adapterlab.models import decoder_layers, tiny_llama


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "a": base,
        "a_view": base[1:3],  # shares storage with "a"
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "idx": torch.arange(5, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "t": base.t(),  # non-contiguous
    }


def test_roundtrip_with_metadata(tmp_path):
    tensors = _tensors()
    path = io.save_tensors(tmp_path / "sub" / "x.safetensors", tensors, metadata={"k": "v"})
    got = io.load_tensors(path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    assert io.load_metadata(path) == {"k": "v"}
    assert list(path.parent.iterdir()) == [path]  # no temporary files left


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        io.save_tensors(tmp_path / "x.bin", {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="str to str"):
        io.save_tensors(tmp_path / "x.safetensors", {"a": torch.zeros(1)}, metadata={"n": 1})
    with pytest.raises(ValueError, match="not a torch.Tensor"):
        io.save_tensors(tmp_path / "x.safetensors", {"a": [1, 2]})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["w.pt", "w.bin", "w.pth", "disguised.safetensors"])
def test_refuses_pickle_by_default(tmp_path, name):
    path = tmp_path / name
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(ValueError) as err:
        io.load_tensors(path)
    msg = str(err.value)
    assert "allow_pickle=True" in msg and "\n" not in msg
    got = io.load_tensors(path, allow_pickle=True)
    torch.testing.assert_close(got["a"], torch.ones(2))


def test_allow_pickle_still_refuses_code(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"a": torch.ones(1), "f": hashlib.sha256}, path)  # not loadable with weights_only
    with pytest.raises(pickle.UnpicklingError):
        io.load_tensors(path, allow_pickle=True)


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "x.safetensors"
    io.save_tensors(path, {"a": torch.zeros(3)})
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_tensors(path, {"a": torch.ones(3)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert io.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert io.sha256_file(path, chunk_size=7) == hashlib.sha256(data).hexdigest()


def _digest(model) -> str:
    return io.fingerprint_digest(io.base_fingerprint(model))


def test_fingerprint_same_shapes_same_digest():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    fa = io.base_fingerprint(a)
    assert fa == io.base_fingerprint(a)  # deterministic
    assert _digest(a) == _digest(b)
    assert fa["quantization"] == "none" and fa["sparsity"] == 0.0
    assert fa["architecture"] == "LlamaForCausalLM" and fa["dtype"] == "float32"
    # changing nonzero values (not the zero pattern) keeps the fingerprint
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(2.0)
    assert _digest(a) == _digest(b)


def test_fingerprint_differs_on_shapes():
    assert _digest(tiny_llama()) != _digest(tiny_llama(intermediate_size=192))
    assert _digest(tiny_llama()) != _digest(tiny_llama(num_hidden_layers=3))


def test_fingerprint_sparsity_mask_oracle():
    dense, pruned = tiny_llama(), tiny_llama()
    linears = [m for block in decoder_layers(pruned) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    total = sum(m.weight.numel() for m in linears)
    with torch.no_grad():
        w = linears[0].weight
        w[:, : w.shape[1] // 2] = 0  # zero half of one layer
    fp = io.base_fingerprint(pruned)
    assert fp["n_decoder_linears"] == len(linears) == 14
    assert fp["sparsity"] == pytest.approx((w.numel() // 2) / total)
    assert fp["shapes_digest"] == io.base_fingerprint(dense)["shapes_digest"]
    assert _digest(pruned) != _digest(dense)
    # same ratio, different positions -> different mask digest
    other = tiny_llama()
    with torch.no_grad():
        w2 = [m for block in decoder_layers(other) for m in block.modules() if isinstance(m, torch.nn.Linear)][0].weight
        w2[:, w2.shape[1] // 2 :] = 0
    fo = io.base_fingerprint(other)
    assert fo["sparsity"] == fp["sparsity"] and _digest(other) != _digest(pruned)


def test_fingerprint_ignores_adapters_and_wrappers():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama()
    fp = io.base_fingerprint(base)
    wrapped = get_peft_model(tiny_llama(seed=3), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    fw = io.base_fingerprint(wrapped)
    assert io.fingerprint_digest(fw) == io.fingerprint_digest(fp)
    assert fw["n_params"] == fp["n_params"]


def test_fingerprint_differs_on_quantization(tmp_path):
    from adapterlab.quant import quantize_model

    base = tiny_llama()
    digests = {"none": _digest(base)}
    for bits, qt in [(4, "nf4"), (4, "fp4"), (8, "nf4")]:
        q = quantize_model(base, bits, quant_type=qt)
        fp = io.base_fingerprint(q)
        expected = f"bnb-4bit-{qt}" if bits == 4 else "bnb-8bit"
        assert fp["quantization"] == expected
        assert fp["shapes_digest"] == io.base_fingerprint(base)["shapes_digest"]  # logical shapes
        digests[expected] = io.fingerprint_digest(fp)
    assert len(set(digests.values())) == 4


def test_fingerprint_digest_requires_keys():
    with pytest.raises(ValueError, match="lacks"):
        io.fingerprint_digest({"format": 1})
