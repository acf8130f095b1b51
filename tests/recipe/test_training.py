"""``train_adapter``: a recipe trains, evaluates, saves a loadable PEFT folder and puts it in the registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterlab.recipe import training
from adapterlab.recipe.schema import TrainRecipe, validate
from adapterlab.recipe.training import train_adapter
from tests.recipe._helpers import FakeRegistry, tiny_base, train_dict

pytestmark = pytest.mark.assets  # the packaged tasks


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("train-base") / "tiny")


@pytest.fixture
def hub(monkeypatch) -> FakeRegistry:
    reg = FakeRegistry()
    monkeypatch.setattr(training, "registry_or_none", lambda root=None: reg)
    return reg


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trainer_backend_prune_train_eval_save_put(base, tmp_path, hub):
    from peft import PeftModel

    from adapterlab.io import base_fingerprint
    from adapterlab.models import load_model

    recipe = validate(
        TrainRecipe,
        train_dict(
            base,
            tmp_path / "adapter",
            prune={"method": "magnitude", "sparsity": 0.5, "output": str(tmp_path / "pruned")},
            put={"name": "tiny-sentiment", "tags": ["t"]},
        ),
        "r",
    )
    res = train_adapter(recipe)
    out = tmp_path / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_report.json"} <= {p.name for p in out.iterdir()}
    assert res.steps == 3 and 0.0 <= res.accuracy <= 1.0 and 0.0 <= res.zero_shot <= 1.0
    assert res.trainable_params == 2 * (
        4 * 64 + 64 * 4 + 4 * 64 + 32 * 4
    )  # r=4 LoRA on q (64x64) and v (32x64), 2 blocks
    assert res.prune["global_sparsity"] == pytest.approx(0.5, abs=1e-3)
    # the pruned base was saved; the adapter reloads on it and gives the trained model's outputs
    pruned = load_model(tmp_path / "pruned")
    assert (tmp_path / "pruned" / "masks.safetensors").is_file()
    logged = [h for h in res.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["base_sparsity"] == pytest.approx(0.5, abs=1e-3) for h in logged)
    reloaded = PeftModel.from_pretrained(pruned, str(out))
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    base_out = _logits(load_model(tmp_path / "pruned"), ids)
    adapted = _logits(reloaded, ids)
    assert not torch.allclose(adapted, base_out)  # the adapter trained
    report = json.loads((out / "train_report.json").read_text())
    assert report["recipe"]["adapter"]["method"] == "lora" and report["accuracy"] == res.accuracy
    # registry: put with the base fingerprint of the pruned base and the recipe as provenance
    (put,) = hub.puts
    assert put["name"] == "tiny-sentiment" and put["tags"] == ("t",) and put["src"] == out
    assert put["base"] == base_fingerprint(pruned)
    assert put["provenance"]["recipe"]["data"]["task"] == "sentiment" and put["provenance"]["accuracy"] == res.accuracy
    assert res.digest == f"{1:064x}" and res.ref == "hub:tiny-sentiment"


def test_sft_backend_dylora_and_no_put(base, tmp_path, hub):
    from peft import PeftModel

    from adapterlab.models import load_model
    from adapterlab.tuners.dylora import sample_rank

    recipe = validate(
        TrainRecipe,
        train_dict(
            base,
            tmp_path / "dy",
            backend="sft",
            adapter={"method": "dylora", "params": {"r": 4, "seed": 3, "target_modules": ["q_proj", "v_proj"]}},
            trainer={
                "max_steps": 3,
                "per_device_train_batch_size": 4,
                "gradient_accumulation_steps": 2,
                "logging_steps": 1,
            },
            eval=None,
        ),
        "r",
    )
    res = train_adapter(recipe, put=False)
    assert hub.puts == [] and res.digest is None and res.accuracy is None
    ranks = [h["dylora_rank"] for h in res.log_history if "loss" in h]
    assert ranks == [sample_rank(3, s, 1, 4) for s in range(3)]  # DyLoraCallback was added automatically
    reloaded = PeftModel.from_pretrained(load_model(base), str(tmp_path / "dy"))
    assert reloaded.peft_config["default"].r == 4


def test_sft_on_4bit_base_keeps_adapter_parameters_fp32(base, tmp_path, hub):
    recipe = validate(
        TrainRecipe,
        train_dict(
            base,
            tmp_path / "q",
            backend="sft",
            quantize=4,
            eval=None,
            put=None,
            adapter={
                "method": "lori",
                "params": {"r": 4, "task": "q", "sparsity": 0.5, "target_modules": ["q_proj", "v_proj"]},
                "callbacks": {"LoriCallback": {"switch_step": 1}},
            },
            trainer={"max_steps": 2, "per_device_train_batch_size": 4, "logging_steps": 1},
        ),
        "r",
    )
    seen: dict[str, torch.dtype] = {}
    orig = training._make_trainer

    def spy(*args, **kwargs):
        trainer = orig(*args, **kwargs)
        seen.update({n: p.dtype for n, p in trainer.model.named_parameters() if p.requires_grad})
        return trainer

    training._make_trainer, saved = spy, training._make_trainer
    try:
        res = train_adapter(recipe)
    finally:
        training._make_trainer = saved
    assert seen and set(seen.values()) == {torch.float32}  # SFTTrainer's bf16 cast undone before training
    assert res.steps == 2 and hub.puts == []
    cfg = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert cfg["variant"] == "S"  # switched at step 1


def test_real_registry_when_installed(base, tmp_path, monkeypatch):
    registry = pytest.importorskip("adapterlab.registry")
    if not hasattr(registry, "AdapterRegistry"):
        pytest.skip("adapterlab.registry has no AdapterRegistry yet")
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "hub"))
    recipe = validate(TrainRecipe, train_dict(base, tmp_path / "a", eval=None, put={"name": "tiny-a"}), "r")
    res = train_adapter(recipe)
    reg = registry.AdapterRegistry(tmp_path / "hub")
    assert reg.resolve("tiny-a") == res.digest
    assert (reg.get("tiny-a") / "adapter_config.json").is_file()
