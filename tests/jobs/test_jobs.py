"""The folder-to-folder jobs called as a library user would: prune, merge and extract tiny models and
adapters built from configs, checked against brute-force / hand-computed results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterlab.jobs import check_merge, check_prune, extract_folder, merge_folder, prune_folder
from adapterlab.models import load_model, tiny_llama, tiny_tokenizer
from adapterlab.pruning import load_masks, mask_hash, prunable_linears
from tests.merging._helpers import make_lora_dirs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("jobs-model") / "tiny"
    tiny_llama(seed=3).save_pretrained(str(path))
    tiny_tokenizer().save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("jobs-adapters"), 2)


class Recorder:
    """A ProgressFactory that records (description, total, steps taken)."""

    def __init__(self) -> None:
        self.bars: list[list] = []

    def __call__(self, description: str, total: int | None):
        bar = [description, total, 0]
        self.bars.append(bar)

        def step(n: int = 1) -> None:
            bar[2] += n

        return step


def _only_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------
# prune


def test_prune_folder_masks_and_report_match_a_brute_force_count(model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    progress = Recorder()
    job = prune_folder(out, model=str(model_dir), method="magnitude", sparsity=0.5, progress=progress)

    assert job.output == out and _only_entries(tmp_path) == ["pruned"]  # staging cleaned up
    assert progress.bars and all(b[2] > 0 for b in progress.bars)  # the factory was driven, not a rich bar
    report = json.loads((out / "sparsity_report.json").read_text(encoding="utf-8"))
    assert report == job.info
    assert report["method"] == "magnitude" and report["model"] == str(model_dir)
    assert report["seqlen"] is None  # magnitude: no calibration

    dense = dict(prunable_linears(load_model(model_dir)))
    pruned = load_model(out)
    modules = dict(pruned.named_modules())
    masks = load_masks(out / "masks.safetensors")
    assert set(masks) == set(dense)
    assert report["mask_sha256"] == mask_hash(masks) == job.mask_sha256
    rows = {row["name"]: row for row in report["layers"]}
    total_zeros = total = 0
    for name, lin in dense.items():
        w0, w1 = lin.weight.detach(), modules[name].weight.detach()
        kept = w1 != 0
        assert torch.equal(masks[name], kept)
        zeros = int((~kept).sum())
        assert zeros == w0.numel() // 2  # matrix scope: exactly half of each matrix
        assert torch.equal(w1[kept], w0[kept])  # kept weights untouched
        assert w0[~kept].abs().max() <= w0[kept].abs().min()  # the smallest magnitudes went
        assert rows[name]["zeros"] == zeros and rows[name]["numel"] == w0.numel()
        total_zeros += zeros
        total += w0.numel()
    assert report["zeros"] == total_zeros and report["numel"] == total
    assert report["global_sparsity"] == pytest.approx(total_zeros / total) == job.sparsity


def test_prune_folder_nm_pattern(model_dir: Path, tmp_path: Path) -> None:
    job = prune_folder(tmp_path / "nm", model=str(model_dir), method="magnitude", pattern="2:4")
    pruned = dict(load_model(tmp_path / "nm").named_modules())
    for name in load_masks(tmp_path / "nm" / "masks.safetensors"):
        w = pruned[name].weight.detach()
        groups = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
        assert bool((groups >= 2).all())  # at least 2 of every 4 consecutive inputs are zero
    assert job.report.nm_valid is True and job.info["pattern"] == "2:4"
    assert job.sparsity == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "magnitude", "scope": "column"}, "unknown scope 'column' for pruning method 'magnitude'"),
        ({"method": "wanda", "nsamples": 0}, "--nsamples must be a positive integer, got 0"),
        ({"method": "wanda", "seqlen": 4096}, "--seqlen 4096 exceeds the model's context length 256"),
        ({"method": "magnitude", "pattern": "2:5"}, "pattern '2:5' needs d_in % M == 0"),
    ],
)
def test_prune_bad_input_is_a_value_error_and_nothing_is_written(
    model_dir: Path, tmp_path: Path, kwargs: dict, message: str
) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError) as err:
        prune_folder(out, model=str(model_dir), **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_prune_refuses_a_non_empty_output_before_loading(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        check_prune(output=tmp_path / "out", model=str(model_dir))
    assert _only_entries(tmp_path / "out") == ["keep.txt"]


# ---------------------------------------------------------------------------------------------
# merge


def _hand_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """scale * B @ A per module, straight from the adapter's files (no adapterlab code)."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            mod = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            out[mod] = scale * (b.double() @ a.double())
    return out


def test_merge_folder_linear_weighted_sum(lora_dirs: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "merged"
    config = {
        "method": "linear",
        "adapters": [{"path": str(lora_dirs[0]), "weight": 0.7}, {"path": str(lora_dirs[1]), "weight": 0.3}],
        "output": {"rank": 8},  # 4 + 4: the weighted sum is exactly representable
    }
    progress = Recorder()
    job = merge_folder(config, out, progress=progress)
    assert job.output == out and job.digest is None and progress.bars
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(_only_entries(out))
    assert _only_entries(tmp_path) == ["merged"]

    d0, d1 = _hand_deltas(lora_dirs[0]), _hand_deltas(lora_dirs[1])
    assert set(d0) == set(d1) and len(d0) > 0
    merged = PeftModel.from_pretrained(tiny_llama(), str(out)).get_base_model()
    for mod, delta in d0.items():
        got = merged.get_submodule(mod).get_delta_weight("default").double()
        torch.testing.assert_close(got, 0.7 * delta + 0.3 * d1[mod], rtol=1e-4, atol=1e-6)


def test_merge_plan_validates_and_describes_without_writing(lora_dirs: list[Path], tmp_path: Path) -> None:
    plan = check_merge(
        {"method": "ties", "adapters": [str(p) for p in lora_dirs], "params": {"density": 0.5}}, tmp_path / "o"
    )
    assert [row["weight"] for row in plan.adapters()] == [None, None]
    assert [row["ranks"] for row in plan.adapters()] == [[4], [4]]
    assert len(plan.shapes) == plan.adapters()[0]["modules"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c["output"].update(rnk=4), "merge config: output.rnk: unknown key"),
        (lambda c: c["adapters"][1].pop("weight"), "merge config: adapters.1.weight: give a weight for every adapter"),
        (lambda c: c.update(method="average"), "merge config: method: "),
        (lambda c: c.update(params={"density": 2.0}), "params.density"),
    ],
)
def test_merge_bad_input_names_the_key_and_writes_nothing(
    lora_dirs: list[Path], tmp_path: Path, mutate, message: str
) -> None:
    config = {
        "method": "ties",
        "adapters": [{"path": str(p), "weight": 1.0} for p in lora_dirs],
        "output": {"rank": 4},
    }
    mutate(config)
    with pytest.raises(ValueError) as err:
        merge_folder(config, tmp_path / "out")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_merge_from_a_yaml_file_with_set_and_relative_paths(lora_dirs: list[Path], tmp_path: Path) -> None:
    import shutil

    import yaml

    for p in lora_dirs:
        shutil.copytree(p, tmp_path / "cfg" / p.name)
    path = tmp_path / "cfg" / "merge.yaml"
    path.write_text(yaml.safe_dump({"method": "linear", "adapters": [p.name for p in lora_dirs]}))
    with pytest.raises(ValueError, match=r"merge\.yaml: output\.rank: Input should be greater than or equal to 1"):
        merge_folder(path, tmp_path / "bad", sets=["output.rank=0"])
    job = merge_folder(path, tmp_path / "ok", sets=["adapters.0.weight=2", "adapters.1.weight=0"])
    assert job.result.method == "linear" and (tmp_path / "ok" / "adapter_config.json").is_file()
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------------------------------------
# extract


def test_extract_folder_recovers_a_low_rank_fine_tune(tmp_path: Path) -> None:
    from peft import PeftModel

    base = tiny_llama(seed=1)
    tuned = tiny_llama(seed=1)
    key = "model.layers.1.mlp.down_proj"
    g = torch.Generator().manual_seed(0)
    w = tuned.get_submodule(key).weight
    delta = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
    with torch.no_grad():
        w.add_(delta)
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")

    job = extract_folder(tmp_path / "ad", base=str(tmp_path / "base"), tuned=str(tmp_path / "tuned"), rank=2)
    assert job.digest is None and (tmp_path / "ad" / "phlora_report.json").is_file()
    assert list(job.result.factors) == [key]
    model = PeftModel.from_pretrained(tiny_llama(seed=1), str(tmp_path / "ad")).get_base_model()
    torch.testing.assert_close(model.get_submodule(key).get_delta_weight("default"), delta, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 2, "energy": 0.9}, "--rank/--energy: give exactly one of them"),
        ({}, "--rank/--energy: give one of them"),
        ({"rank": 2, "dtype": "float64"}, "--dtype 'float64': choose one of float32, float16, bfloat16"),
        ({"rank": 2, "put": "bad name"}, "--put 'bad name'"),
    ],
)
def test_extract_bad_input_writes_nothing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        extract_folder(tmp_path / "ad", base="default", tuned=str(tmp_path / "missing"), **kwargs)
    assert message in str(err.value)
    assert list(tmp_path.iterdir()) == []
