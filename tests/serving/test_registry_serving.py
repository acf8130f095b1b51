"""Serving from the registry: names resolve on demand, hashes and the base fingerprint are checked."""

from __future__ import annotations

import pytest
import torch

from adapterlab.registry import AdapterRegistry
from adapterlab.serving import AdapterServer, Request, UnknownAdapterError
from tests.serving._helpers import base_model, make_lora, merged_lora_model


def test_registry_refs_bundles_and_refusals(tmp_path):
    from adapterlab.compression import compress_adapters
    from adapterlab.io import base_fingerprint
    from adapterlab.models import tiny_llama

    hub = AdapterRegistry(tmp_path / "hub")
    a, b = make_lora(tmp_path / "a", seed=0), make_lora(tmp_path / "b", seed=1)
    base = base_model()
    hub.put(a, "alpha", base=base)
    hub.put(b, "beta", base=base)
    hub.put(make_lora(tmp_path / "w", seed=2), "wrong", base=base_fingerprint(tiny_llama(hidden_size=64, num_hidden_layers=3)))
    bundle = compress_adapters([f"hub:alpha", f"hub:beta"], rank=8, registry=hub)
    bundle.save(tmp_path / "bundle")
    hub.put_bundle(tmp_path / "bundle", "ab")

    server = AdapterServer(base, hub, capacity=2)
    assert {r["name"] for r in server.adapters()} >= {"alpha", "beta", "wrong"}
    served = server.add_bundle("hub:ab", prefix="sb/")
    ids = torch.randint(4, 100, (3, 6), generator=torch.Generator().manual_seed(0))
    ids[2] = ids[1]
    got = server.forward(ids, adapters=["alpha", "sb/beta", "beta"])  # registry names load on demand
    want = merged_lora_model(a)(input_ids=ids[:1]).logits[0]
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], got[2], atol=1e-4, rtol=1e-4)  # c = n*r: the bundle is exact
    assert served == ["sb/alpha", "sb/beta"]
    # an adapter recorded for another base is refused, naming what it wants
    with pytest.raises(ValueError, match="was made for base"):
        server.load("wrong")
    with pytest.raises(UnknownAdapterError):
        server.load("ghost")
    # a flipped byte fails verification; the server keeps serving the others
    server.unload("beta")
    obj = hub.get("beta") / "adapter_model.safetensors"
    data = bytearray(obj.read_bytes())
    data[-1] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="failed verification"):
        server.load("beta")
    assert server.generate([Request([5, 6, 7], "alpha", 2)])[0].adapter == "alpha"
