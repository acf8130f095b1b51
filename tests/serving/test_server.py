"""AdapterServer oracles: a mixed batch equals each request run alone with its adapter merged."""

from __future__ import annotations

import pytest
import torch

from adapterlab.serving import AdapterServer, Request, UnknownAdapterError
from tests.serving._helpers import base_model, make_lora, make_shira, merged_lora_model, merged_shira_model
from tests.tolerances import TOL

ATOL = {"atol": 1e-4, "rtol": 1e-4}  # fp32 through a whole (tiny) model


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {
        "a": make_lora(root / "a", r=4, seed=0),
        "b": make_lora(root / "b", r=2, seed=1, rslora=True, targets=("q_proj", "k_proj", "o_proj")),
        "c": make_lora(root / "c", r=6, seed=2, targets=("v_proj", "up_proj")),
    }


@pytest.fixture(scope="module")
def merged(loras):
    """Each adapter merged alone into a fresh base by peft (the oracle), plus the plain base."""
    return {n: merged_lora_model(p) for n, p in loras.items()} | {None: base_model()}


def _ids(B: int, T: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 100, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _alone(models: dict, names, ids, mask=None):
    rows = []
    for b, n in enumerate(names):
        m = models[n]
        if mask is None:
            rows.append(m(input_ids=ids[b : b + 1]).logits[0])
        else:
            keep = mask[b].bool()
            rows.append(m(input_ids=ids[b : b + 1, keep]).logits[0])
    return rows


@pytest.mark.parametrize("plan_mode", ["grouped", "gather"])
def test_mixed_lora_batch_equals_merged_alone(loras, merged, plan_mode):
    server = AdapterServer(base_model(), capacity=4, plan_mode=plan_mode, adapters=loras)
    names = ["a", "b", None, "a", "c", "b", "a"]
    ids = _ids(len(names))
    got = server.forward(ids, adapters=names)
    ref = server.forward(ids, adapters=names, reference=True)
    for b, want in enumerate(_alone(merged, names, ids)):
        torch.testing.assert_close(got[b], want, **ATOL)
        torch.testing.assert_close(ref[b], want, **ATOL)
    # the adapters really change the output (otherwise the oracle is vacuous)
    assert (got[0] - got[2]).abs().max() > 1e-2


def test_left_padded_batch(loras, merged):
    server = AdapterServer(base_model(), capacity=4, adapters=loras)
    names = ["c", "a", "b"]
    ids = _ids(3, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, :4] = 0
    got = server.forward(ids, mask, adapters=names)
    for b, want in enumerate(_alone(merged, names, ids, mask)):
        torch.testing.assert_close(got[b, mask[b].bool()], want, **ATOL)


@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_shared_basis_batch_equals_exported_merged(loras, merged, mode, tmp_path):
    from adapterlab.compression import compress_adapters

    same = {"a": loras["a"], "a2": make_lora(tmp_path / "a2", r=4, seed=7)}  # same targets
    bundle = compress_adapters(same, rank=4, mode=mode, niter=3)
    server = AdapterServer(base_model(), capacity=2, adapters={"c": loras["c"]})
    served = server.add_bundle(bundle, key="bundle", prefix="sb/")
    assert served == ["sb/a", "sb/a2"]
    names = ["sb/a2", "c", "sb/a", None, "sb/a2"]
    ids = _ids(len(names), seed=4)
    got = server.forward(ids, adapters=names)
    models = {None: merged[None], "c": merged["c"]}
    for n in ("a", "a2"):
        models[f"sb/{n}"] = merged_lora_model(bundle.export(n, tmp_path / f"export_{mode}_{n}"))
    for b, want in enumerate(_alone(models, names, ids)):
        torch.testing.assert_close(got[b], want, **ATOL)
    # bundle saved and served from its folder gives the same logits
    bundle.save(tmp_path / f"saved_{mode}")
    server2 = AdapterServer(base_model())
    server2.add_bundle(tmp_path / f"saved_{mode}", prefix="sb/")
    torch.testing.assert_close(server2.forward(ids[:1], adapters=names[:1]), got[:1], **ATOL)


def test_shira_fused_and_unfused(loras, merged, tmp_path):
    s1, s2 = make_shira(tmp_path / "s1", seed=1), make_shira(tmp_path / "s2", seed=2, targets=("v_proj",))
    base = base_model()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    server = AdapterServer(base, capacity=3, adapters={"s1": s1, "s2": s2, "a": loras["a"]})
    models = {"s1": merged_shira_model(s1), "s2": merged_shira_model(s2), "a": merged["a"], None: merged[None]}
    ids = _ids(3, seed=5)
    for names in (["s1"] * 3, ["s2"] * 3, ["s1", "a", "s2"], [None, "s1", None]):
        got = server.forward(ids, adapters=names)
        for b, want in enumerate(_alone(models, names, ids)):
            torch.testing.assert_close(got[b], want, **ATOL)
        if len(set(names)) == 1:
            assert server.router.fused == names[0]  # rapid switching path
    server.close()  # restores the base weights exactly
    after = {k.replace(".base_layer", ""): v for k, v in server.model.state_dict().items()}
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_lru_eviction_and_pinning(loras):
    server = AdapterServer(base_model(), capacity=2, adapters=loras)
    server.load("a")
    server.load("b")
    server.forward(_ids(1), adapters=["a"])  # a becomes most recent
    server.load("c")  # evicts b (LRU)
    assert server.loaded() == ["a", "c"]
    server.pin("c")
    server.forward(_ids(1), adapters=["c"])
    server.load("b")  # a is the only unpinned one
    assert server.loaded() == ["c", "b"]
    server.pin("b")
    with pytest.raises(RuntimeError, match="cache is full"):
        server.load("a")
    server.pin("b", False)
    server.unload("c")
    assert "c" not in server.loaded()
    # a hot-swapped slot holds exactly the new adapter: compare with a fresh server
    server.load("a")
    fresh = AdapterServer(base_model(), capacity=1, adapters={"a": loras["a"]})
    ids = _ids(2, seed=9)
    torch.testing.assert_close(
        server.forward(ids, adapters=["a", "b"])[0], fresh.forward(ids[:1], adapters=["a"])[0], **TOL[torch.float32]
    )
    assert server.stats["evictions"] >= 3


def test_batch_larger_than_capacity_is_split(loras):
    server = AdapterServer(base_model(), capacity=1, adapters=loras)
    out = server.generate([Request([5, 6, 7], n, 3) for n in ("a", "b", "c", "a")])
    assert [c.adapter for c in out] == ["a", "b", "c", "a"]
    assert out[0].tokens == out[3].tokens


def test_generate_equals_merged_greedy(loras, merged):
    server = AdapterServer(base_model(), capacity=4, adapters=loras, max_batch_size=8)
    reqs = [
        Request([5, 9, 13, 40], "a", 5),
        Request([7, 8], "b", 3),
        Request([11, 12, 13], None, 4),
        Request([20, 21, 22, 23, 24], "c", 6),
    ]
    got = server.generate(reqs)
    for r, c in zip(reqs, got):
        m = merged[r.adapter]
        seq = m.generate(
            input_ids=torch.tensor([r.prompt]),
            max_new_tokens=r.max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        want = seq[0, len(r.prompt) :].tolist()
        stop = next((i for i, t in enumerate(want) if t == 2), None)
        assert c.tokens == (want if stop is None else want[:stop])
        assert c.prompt_tokens == len(r.prompt)


def test_bad_input(loras, tmp_path):
    from safetensors.torch import load_file, save_file

    server = AdapterServer(base_model(), capacity=2, adapters={"a": loras["a"]})
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nope'"):
        server.generate([Request([5, 6], "nope")])
    with pytest.raises(UnknownAdapterError):
        server.forward(_ids(1), adapters=["nope"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        Request([1, 2], "a", 0)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter folder"):
        server.register("x", tmp_path / "missing")
    with pytest.raises(ValueError, match="adapter name"):
        server.register("bad name", loras["a"])
    # NaN weights
    nan_dir = tmp_path / "nan"
    make_lora(nan_dir, seed=3)
    t = load_file(str(nan_dir / "adapter_model.safetensors"))
    k = next(k for k in t if "lora_B" in k)
    t[k][0, 0] = float("nan")
    save_file(t, str(nan_dir / "adapter_model.safetensors"))
    server.register("nan", nan_dir)
    with pytest.raises(ValueError, match="NaN or Inf"):
        server.load("nan")
    # pickle only
    pk = tmp_path / "pickle"
    make_lora(pk, seed=4)
    (pk / "adapter_model.safetensors").rename(pk / "adapter_model.bin")
    server.register("pk", pk)
    with pytest.raises(ValueError, match="pickle"):
        server.load("pk")
    # an adapter made for another base (wider hidden size)
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    other = get_peft_model(tiny_llama(hidden_size=128), LoraConfig(r=2, target_modules=["q_proj"]))
    other.save_pretrained(str(tmp_path / "other"))
    server.register("other", tmp_path / "other")
    with pytest.raises(ValueError, match="different base"):
        server.load("other")
    # the server keeps serving after all of these
    assert server.generate([Request([5, 6], "a", 2)])[0].adapter == "a"
    assert {r["name"] for r in server.adapters()} >= {"a", "nan", "pk", "other"}


def test_adapterlab_shira_folder_matches_its_peft_model(tmp_path):
    shira = pytest.importorskip("adapterlab.tuners.shira")
    from peft import get_peft_model

    pm = get_peft_model(base_model(), shira.ShiraConfig(r=2, target_modules=["q_proj", "up_proj"], init_weights=False))
    pm.save_pretrained(str(tmp_path / "s"))
    ids = _ids(2, seed=11)
    with torch.no_grad():
        want = pm(input_ids=ids).logits
    server = AdapterServer(base_model(), adapters={"s": tmp_path / "s"})
    torch.testing.assert_close(server.forward(ids, adapters=["s", "s"]), want, **ATOL)  # fused
    assert server.router.fused == "s"
    torch.testing.assert_close(server.forward(ids, adapters=["s", None])[0], want[0], **ATOL)  # unfused


def test_token_ids_outside_vocab_are_refused(loras):
    server = AdapterServer(base_model(), adapters={"a": loras["a"]})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        server.generate([Request([5, 100000], "a", 2)])
