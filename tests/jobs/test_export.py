"""export_lora on the inputs that live above extraction: a shared-basis bundle member, an RMM task, merge
results (in memory and on disk, LoRA and sparse outputs), registry refs and --put; each against a delta
computed from the input's own files or factors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterlab.jobs.check import check_vllm
from adapterlab.jobs.export import export_lora
from tests.extraction._export_kinds import rel, written_deltas
from tests.merging._helpers import make_lora_dirs


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("export-loras"), 3, r=4)


def test_shared_basis_member_is_exact(loras: list[Path], tmp_path: Path) -> None:
    from adapterlab import compress_adapters

    bundle_dir = tmp_path / "bundle"
    compress_adapters(loras, rank=6).save(bundle_dir)
    out = tmp_path / "member"
    ex = export_lora(bundle_dir, out, member="task1", for_vllm=True, served_name="org/base")
    assert ex.exact and ex.kind == "shared-basis" and ex.total_error == 0.0
    cfg = json.loads((bundle_dir / "compressed_config.json").read_text())
    i = cfg["names"].index("task1")
    g = next(int(k) for k, v in cfg["clusters"].items() if i in v)
    bases = load_file(str(bundle_dir / "bases.safetensors"))
    sig = load_file(str(bundle_dir / "sigmas.safetensors"))
    got = written_deltas(out)
    assert set(got) == set(cfg["module_names"])
    for m in cfg["module_names"]:  # ΔW_i = U[g] core_i V[g], from the bundle's files
        U, V = bases[f"{m}.{g}.U"].double(), bases[f"{m}.{g}.V"].double().T
        assert rel(got[m], U @ sig[f"{m}.sigma"][i].double() @ V) < 1e-6
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["r"] == 8 and written["base_model_name_or_path"] == "org/base"
    assert check_vllm(out, served_name="org/base") == []
    with pytest.raises(ValueError, match="--member 'nope' is not in the shared-basis bundle; it holds: task0"):
        export_lora(bundle_dir, tmp_path / "x", member="nope")
    with pytest.raises(ValueError, match="choose one with --member NAME"):
        export_lora(bundle_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_rmm_task_reconstruction_is_exact(loras: list[Path], tmp_path: Path) -> None:
    from adapterlab import merge_adapters

    merge_dir = tmp_path / "rmm"
    merge_adapters({f"t{i}": p for i, p in enumerate(loras)}, "rmm", K=2).save(merge_dir)
    ex = export_lora(merge_dir, tmp_path / "t1", task="t1", for_vllm=True)
    assert check_vllm(tmp_path / "t1") == []
    assert ex.exact and ex.kind == "rmm" and ex.source["task"] == "t1"
    t = load_file(str(merge_dir / "rmm_bundle.safetensors"))
    cfg = json.loads((merge_dir / "rmm_config.json").read_text())
    assert cfg["coeff_scope"] == "layer"
    got = written_deltas(tmp_path / "t1")
    for m in cfg["modules"]:  # B̂ = Σ_k C[k, i] U_B[k] (same for A), from the bundle's files
        C_B, C_A = t[f"coeffs.{m}.B"].double(), t[f"coeffs.{m}.A"].double()
        B = torch.einsum("k,kor->or", C_B[:, 1], t[f"basis.{m}.B"].double())
        A = torch.einsum("k,kri->ri", C_A[:, 1], t[f"basis.{m}.A"].double())
        assert rel(got[m], B @ A) < 1e-6
    plain = export_lora(merge_dir)  # without --task: the folder's own (task-average) PEFT LoRA
    assert plain.kind == "lora" and plain.exact
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        export_lora(merge_dir, task="zz")


def test_merge_results_in_memory_and_on_disk(loras: list[Path], tmp_path: Path) -> None:
    from adapterlab import merge_adapters

    res = merge_adapters(loras, "ties", density=0.5, output="lora", rank=6)
    ex = export_lora(res)
    assert ex.exact and ex.kind == "merge"
    for m, (B, A) in res.factors.items():
        assert rel(ex.delta(m).double(), (B.double() @ A.double())) < 1e-6
    sparse = merge_adapters(loras, "ties", density=0.3, output="sparse")
    sparse.save(tmp_path / "sparse")
    with pytest.raises(ValueError, match="sparse adapter's delta is not low rank"):
        export_lora(tmp_path / "sparse")
    ex = export_lora(tmp_path / "sparse", tmp_path / "sparse-lora", rank=5)
    assert ex.kind == "sparse" and not ex.exact
    got = written_deltas(tmp_path / "sparse-lora")
    num = den = 0.0
    for row in ex.modules:  # the reported error is the brute-force one, against the merge's own delta
        D = sparse.delta(row.name).double()
        assert row.error == pytest.approx(rel(got[row.name], D), rel=1e-4)
        s = torch.linalg.svdvals(D)
        assert row.error == pytest.approx(math.sqrt(float(s[5:].square().sum() / s.square().sum())), rel=1e-4)
        num, den = num + float((got[row.name] - D).norm()) ** 2, den + float(D.norm()) ** 2
    assert ex.total_error == pytest.approx(math.sqrt(num / den), rel=1e-4)
    full = merge_adapters(loras[:1], "linear", output="full", base=_base())
    with pytest.raises(ValueError, match="output='full' is a merged model"):
        export_lora(full)


def _base():
    from adapterlab.models import tiny_llama

    return tiny_llama()


def test_registry_refs_in_and_put_out(loras: list[Path], tmp_path: Path) -> None:
    from adapterlab import AdapterRegistry

    hub = tmp_path / "hub"
    reg = AdapterRegistry(hub)
    reg.put(loras[0], "a0")
    ex = export_lora("hub:a0", tmp_path / "out", hub=hub, for_vllm=True, put="a0-vllm")
    assert ex.exact and ex.source["ref"] == "hub:a0"
    folder = reg.get("a0-vllm")
    assert json.loads((Path(folder) / "adapter_config.json").read_text())["r"] == 8
    assert written_deltas(Path(folder)).keys() == written_deltas(tmp_path / "out").keys()
    with pytest.raises(KeyError):
        export_lora("hub:missing", tmp_path / "nope", hub=hub)
    assert not (tmp_path / "nope").exists()
    with pytest.raises(ValueError, match="--put needs an output folder"):
        export_lora(loras[0], put="x", hub=hub)


def test_dtype_option_and_bad_settings(loras: list[Path], tmp_path: Path) -> None:
    ex = export_lora(loras[1], tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "adapter_model.safetensors")).values()} == {
        torch.bfloat16
    }
    assert ex.dtype == torch.bfloat16
    for kwargs, needle in [
        ({"rank": 0}, "--rank must be a positive integer"),
        ({"energy": 1.5}, r"--energy must be in \(0, 1\]"),
        ({"rank": 4, "energy": 0.5}, "give at most one of them"),
        ({"max_error": -1}, "--max-error must be a number >= 0"),
        ({"dtype": "int8"}, "--dtype 'int8'"),
        ({"served_name": " "}, "--served-name is empty"),
    ]:
        with pytest.raises(ValueError, match=needle):
            export_lora(loras[1], tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
