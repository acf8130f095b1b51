"""AdapterRegistry: content addressing, refs, verification, refusals, gc, bundles."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from adapterlab.io import save_tensors
from adapterlab.registry import AdapterRegistry, RefNotFoundError
from tests.registry._helpers import lora_dir


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [lora_dir(root / f"task{i}", seed=i) for i in range(2)]


@pytest.fixture
def reg(tmp_path: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "hub")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_digest_is_the_documented_hash_of_the_files(reg: AdapterRegistry, adapters: list[Path]) -> None:
    # oracle: sha256 over "name\0sha256(file)\0size\n" of the sorted files, by hand
    h = hashlib.sha256(b"adapterlab-object-v1\n")
    for f in sorted(adapters[0].iterdir(), key=lambda p: p.name):
        data = f.read_bytes()
        h.update(f"{f.name}\0{hashlib.sha256(data).hexdigest()}\0{len(data)}\n".encode())
    digest = reg.put(adapters[0], "a")
    assert digest == h.hexdigest()
    obj = reg.root / "objects" / digest
    assert sorted(p.name for p in obj.iterdir()) == sorted([p.name for p in adapters[0].iterdir()] + ["manifest.json"])
    assert (reg.root / "refs" / "a").read_text().strip() == digest
    for f in adapters[0].iterdir():  # stored bytes are the source bytes
        assert (obj / f.name).read_bytes() == f.read_bytes()
    assert list((reg.root / "tmp").iterdir()) == []


def test_manifest_records_what_the_contract_says(reg: AdapterRegistry, adapters: list[Path]) -> None:
    from adapterlab.io import base_fingerprint, fingerprint_digest
    from adapterlab.models import tiny_llama

    base = tiny_llama(hidden_size=32)
    d = reg.put(
        adapters[0], "a", base=base, provenance={"kind": "trained", "parents": ["x"], "recipe": {"lr": 1}}, tags=("v1",)
    )
    m = reg.show("a")
    assert m["method"] == "lora" and m["peft_type"] == "LORA" and m["peft_version"]
    assert m["rank"] == 2 and m["lora_alpha"] == 4 and m["scaling"] == pytest.approx(2.0)
    assert m["target_modules"] == ["q_proj", "v_proj"] and m["dtype"] == "float32"
    assert m["modules"] == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    # 2 layers x (q: A [2, 32] + B [32, 2]; v (2 kv heads of 8): A [2, 32] + B [16, 2])
    assert m["n_params"] == 2 * ((2 * 32 + 32 * 2) + (2 * 32 + 16 * 2))
    sizes = {f.name: f.stat().st_size for f in adapters[0].iterdir()}
    assert m["bytes"] == sum(sizes.values())
    assert {k: v["bytes"] for k, v in m["files"].items()} == sizes
    st = adapters[0] / "adapter_model.safetensors"
    assert m["files"]["adapter_model.safetensors"]["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    fp = base_fingerprint(base)
    assert m["base"] == json.loads(json.dumps(fp)) and m["base_digest"] == fingerprint_digest(fp)
    assert (reg.root / "bases" / f"{fingerprint_digest(fp)}.json").is_file()
    assert m["provenance"] == {"kind": "trained", "parents": ["x"], "recipe": {"lr": 1}}
    assert m["digest"] == d and sorted(m["names"]) == ["a", "v1"]


def test_resolve_names_digests_prefixes_and_errors(reg: AdapterRegistry, adapters: list[Path]) -> None:
    d0 = reg.put(adapters[0], "a")
    d1 = reg.put(adapters[1], "b")
    assert d0 != d1
    assert reg.resolve("a") == reg.resolve("hub:a") == reg.resolve(d0) == reg.resolve(d0[:8]) == d0
    assert reg.resolve(f"a@{d0[:10]}") == d0
    with pytest.raises(ValueError, match="points to"):
        reg.resolve(f"a@{d1[:10]}")
    with pytest.raises(RefNotFoundError, match="no adapter 'nope'.*known names: a, b"):
        reg.resolve("nope")
    with pytest.raises(RefNotFoundError):
        reg.resolve(d0[:7])  # fewer than 8 hex digits is not a prefix
    with pytest.raises(KeyError):  # KeyError subclass: callers that catch KeyError keep working
        reg.get("../refs/a")


def test_same_adapter_twice_is_one_object_and_names_move(
    reg: AdapterRegistry, adapters: list[Path], tmp_path: Path
) -> None:
    d = reg.put(adapters[0], "a")
    assert reg.put(_copy(adapters[0], tmp_path / "copy"), "a2", provenance={"kind": "merged"}) == d
    assert len(list((reg.root / "objects").iterdir())) == 1
    assert reg.show("a2")["provenance"]["kind"] == "imported"  # the first manifest is kept
    d1 = reg.put(adapters[1], "a")  # a name is a pointer: put moves it
    assert reg.resolve("a") == d1 and reg.resolve("a2") == d


def test_tag_rm_gc(reg: AdapterRegistry, adapters: list[Path]) -> None:
    d0 = reg.put(adapters[0], "a")
    d1 = reg.put(adapters[1], "b")
    assert reg.tag("a", "prod") == d0
    with pytest.raises(FileExistsError, match="already points to"):
        reg.tag("b", "prod")
    assert reg.tag("b", "prod", force=True) == d1
    assert reg.tag("b", "prod") == d1  # same target: fine
    with pytest.raises(ValueError, match="not a valid registry name"):
        reg.tag("a", "bad/name")
    assert [r["name"] for r in reg.ls()] == ["a", "b", "prod"]
    assert reg.gc() == []
    assert reg.rm("a") == d0
    with pytest.raises(KeyError, match="no name 'a'"):
        reg.rm("a")
    assert reg.gc(dry_run=True) == [d0] and (reg.root / "objects" / d0).is_dir()
    assert reg.gc() == [d0]
    assert not (reg.root / "objects" / d0).exists() and reg.verify() == []
    assert reg.ls(all=True) == reg.ls()


def test_flipped_byte_fails_verify_get_and_load(reg: AdapterRegistry, adapters: list[Path]) -> None:
    from adapterlab.models import tiny_llama

    d = reg.put(adapters[0], "a")
    assert reg.verify() == [] and reg.verify("a") == []
    st = reg.root / "objects" / d / "adapter_model.safetensors"
    data = bytearray(st.read_bytes())
    data[-5] ^= 0x01
    st.chmod(0o644)
    st.write_bytes(bytes(data))
    problems = reg.verify()
    assert len(problems) == 1 and "adapter_model.safetensors" in problems[0] and "sha256" in problems[0]
    assert reg.verify("a") == problems
    with pytest.raises(ValueError, match="failed verification.*sha256 mismatch"):
        reg.get("a")
    with pytest.raises(ValueError, match="failed verification"):
        reg.load("a", tiny_llama(hidden_size=32))
    # re-putting the good files repairs the object
    assert reg.put(adapters[0], "a") == d
    assert reg.verify() == [] and reg.get("a") == reg.root / "objects" / d


def test_truncated_file_edited_manifest_and_stray_file_fail_verify(reg: AdapterRegistry, adapters: list[Path]) -> None:
    d = reg.put(adapters[0], "a")
    obj = reg.root / "objects" / d
    st = obj / "adapter_model.safetensors"
    assert st.stat().st_mode & 0o222 == 0  # stored files are read-only
    st.chmod(0o644)
    st.write_bytes(st.read_bytes()[:-10])
    assert any("truncated" in p for p in reg.verify("a"))
    reg.put(adapters[0], "a")
    m = json.loads((obj / "manifest.json").read_text())
    m["provenance"]["kind"] = "trained"
    (obj / "manifest.json").chmod(0o644)
    (obj / "manifest.json").write_text(json.dumps(m))
    assert any("checksum" in p for p in reg.verify("a"))
    reg.put(adapters[0], "a")
    (obj / "extra.txt").write_text("x")
    assert any("unexpected file 'extra.txt'" in p for p in reg.verify())
    (obj / "extra.txt").unlink()
    (reg.root / "refs" / "ghost").write_text("0" * 64 + "\n")
    assert any("refs/ghost" in p for p in reg.verify())
    with pytest.raises(ValueError, match="not in"):
        reg.get("ghost")


def test_pickle_nan_and_non_adapter_folders_are_refused(
    reg: AdapterRegistry, adapters: list[Path], tmp_path: Path
) -> None:
    bad = _copy(adapters[0], tmp_path / "pickled")
    torch.save({"w": torch.zeros(2)}, bad / "adapter_model.bin")
    with pytest.raises(ValueError, match="refusing 'adapter_model.bin'.*pickle"):
        reg.put(bad, "x")
    nan = _copy(adapters[0], tmp_path / "nan")
    from safetensors.torch import load_file

    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = sorted(tensors)[1]
    tensors[key][0, 0] = float("inf")
    save_tensors(nan / "adapter_model.safetensors", tensors, allow_nonfinite=True)
    with pytest.raises(ValueError, match=rf"tensor '{key}'.*1 NaN/Inf"):
        reg.put(nan, "x")
    fake = _copy(adapters[0], tmp_path / "fake")
    (fake / "adapter_model.safetensors").write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        reg.put(fake, "x")
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "adapter_config.json").write_text("{}")
        reg.put(tmp_path / "empty", "x")
    with pytest.raises(ValueError, match="provenance.kind 'guessed'"):
        reg.put(adapters[0], "x", provenance={"kind": "guessed"})
    with pytest.raises(ValueError, match="lacks"):
        reg.put(adapters[0], "x", base={"model_id": "m"})
    for name in ("a b", "x/y", "-x", "a" * 129, "f" * 64):
        with pytest.raises(ValueError, match="name"):
            reg.put(adapters[0], name)
    # nothing was stored by any refused put
    assert not (reg.root / "objects").exists() or list((reg.root / "objects").iterdir()) == []
    assert reg.ls() == []


def test_failure_while_staging_leaves_nothing(
    reg: AdapterRegistry, adapters: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERLAB_HUB_FAULT", "raise")
    with pytest.raises(RuntimeError, match="simulated failure"):
        reg.put(adapters[0], "a")
    assert list((reg.root / "objects").iterdir()) == [] and list((reg.root / "tmp").iterdir()) == []
    assert reg.ls(all=True) == [] and reg.verify() == []


def test_concurrent_puts_in_threads_give_one_object(reg: AdapterRegistry, adapters: list[Path]) -> None:
    digests: list[str] = []
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:  # separate instances: separate lock file descriptions, as in separate processes
            digests.append(AdapterRegistry(reg.root).put(adapters[0], f"t{i}"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(digests)) == 1
    assert [p.name for p in (reg.root / "objects").iterdir()] == digests[:1]
    assert reg.verify() == [] and list((reg.root / "tmp").iterdir()) == []


def test_adapterlab_tuner_types_round_trip(reg: AdapterRegistry, tmp_path: Path) -> None:
    from peft import get_peft_model

    from adapterlab import LoriConfig, ShiraConfig
    from adapterlab.models import tiny_llama

    x = torch.arange(10).reshape(1, 10) % 128
    for i, cfg in enumerate(
        [
            LoriConfig(r=2, task="t", target_modules=["q_proj", "v_proj"]),
            ShiraConfig(r=2, mask_type="random", target_modules=["q_proj", "v_proj"]),
        ]
    ):
        torch.manual_seed(i)
        pm = get_peft_model(tiny_llama(hidden_size=32), cfg)
        with torch.no_grad():
            for _n, p in pm.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        pm.eval()
        want = pm(input_ids=x).logits
        name = type(cfg).__name__.lower()
        d = reg.put(pm, name, provenance={"kind": "trained"})
        assert (
            reg.show(name)["method"]
            == str(cfg.peft_type.value if hasattr(cfg.peft_type, "value") else cfg.peft_type).lower()
        )
        loaded = reg.load(name, tiny_llama(hidden_size=32))
        assert torch.allclose(loaded(input_ids=x).logits, want, atol=1e-6)
        assert reg.get(d).is_dir()


def test_bundle_put_get(reg: AdapterRegistry, adapters: list[Path], tmp_path: Path) -> None:
    from adapterlab.compression import SharedBasisBundle, compress_adapters

    bundle = compress_adapters(adapters, rank=4)
    bundle.save(tmp_path / "bundle")
    d = reg.put_bundle(tmp_path / "bundle", "both")
    assert (reg.root / "compressed" / d / "manifest.json").is_file()
    m = reg.show("both")
    assert m["kind"] == "bundle" and m["provenance"]["kind"] == "compressed" and m["adapters"] == bundle.names
    back = SharedBasisBundle.load(reg.get_bundle("both"))
    assert back.names == bundle.names
    with pytest.raises(ValueError, match="is a shared-basis bundle; use get_bundle"):
        reg.get("both")
    reg.put(adapters[0], "a")
    with pytest.raises(ValueError, match="is a adapter|is an adapter|use get"):
        reg.get_bundle("a")
    assert reg.verify() == []


def test_hub_refs_resolve_through_merging(
    adapters: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterlab.merging import resolve_adapter

    reg = AdapterRegistry(tmp_path / "envhub")
    d = reg.put(adapters[0], "first")
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "envhub"))
    src = resolve_adapter("hub:first")
    direct = resolve_adapter(adapters[0])
    assert src.path == reg.root / "objects" / d and src.name == "first"
    assert src.modules.keys() == direct.modules.keys()
    for mod in src.modules:
        assert torch.equal(src.delta(mod), direct.delta(mod))
    with pytest.raises(KeyError, match="no adapter 'missing'"):
        resolve_adapter("hub:missing")
    assert AdapterRegistry().root == tmp_path / "envhub"
