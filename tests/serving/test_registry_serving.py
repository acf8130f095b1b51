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
    hub.put(
        make_lora(tmp_path / "w", seed=2),
        "wrong",
        base=base_fingerprint(tiny_llama(hidden_size=64, num_hidden_layers=3)),
    )
    bundle = compress_adapters(["hub:alpha", "hub:beta"], rank=8, registry=hub)
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


def test_second_server_on_the_same_model_object(tmp_path):
    """A second AdapterServer on a model an earlier one wrapped (and fused SHiRA into) serves the
    registry's adapters: the base it fingerprints and runs is the original one, and the first
    server keeps working too."""
    from adapterlab.io import base_fingerprint
    from tests.serving._helpers import make_shira, merged_shira_model

    hub = AdapterRegistry(tmp_path / "hub")
    a = make_lora(tmp_path / "a", seed=0)
    shira = make_shira(tmp_path / "s", seed=1)
    fresh = base_model()
    hub.put(a, "alpha", base=fresh)
    base = base_model()
    ids = torch.randint(4, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    want_a = merged_lora_model(a)(input_ids=ids).logits
    want_s = merged_shira_model(shira)(input_ids=ids).logits
    want_base = fresh(input_ids=ids).logits

    first = AdapterServer(base, hub, adapters={"s": shira})
    torch.testing.assert_close(first.forward(ids, adapters=["alpha", "alpha"]), want_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(first.forward(ids, adapters=["s", "s"]), want_s, atol=1e-4, rtol=1e-4)
    assert first.router.fused == "s"  # the base weights now hold the SHiRA entries

    second = AdapterServer(base, hub)  # the same model object, wrapped and fused by `first`
    assert second._base_fingerprint() == base_fingerprint(fresh)
    second.load("alpha")  # was BaseMismatchError
    torch.testing.assert_close(
        second.forward(ids, adapters=["alpha", None]), torch.stack([want_a[0], want_base[1]]), atol=1e-4, rtol=1e-4
    )
    assert (
        second.generate([Request([5, 6, 7], "alpha", 3)])[0].tokens
        == first.generate([Request([5, 6, 7], "alpha", 3)])[0].tokens
    )
    # back and forth: each server claims the model when it runs
    torch.testing.assert_close(
        first.forward(ids, adapters=["s", None]), torch.stack([want_s[0], want_base[1]]), atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(second.forward(ids, adapters=[None, None]), want_base, atol=1e-4, rtol=1e-4)
    first.close()
    second.close()
    plain = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items()}
    for k, v in fresh.state_dict().items():
        assert torch.equal(plain[k], v), k
