"""A pipeline end to end on a tiny model: prune -> train x2 -> merge -> evaluate -> put."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from adapterlab.recipe import check_pipeline, load_pipeline, plan, run_pipeline, training
from tests.recipe._helpers import FakeRegistry, tiny_base, train_dict, write_yaml

pytestmark = pytest.mark.assets  # the packaged tasks and corpora


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("runner-base") / "tiny")


@pytest.fixture
def hub(monkeypatch) -> FakeRegistry:
    reg = FakeRegistry()
    monkeypatch.setattr(training, "registry_or_none", lambda root=None: reg)
    return reg


def _has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def test_pipeline_end_to_end_on_a_tiny_model(base, tmp_path, hub, monkeypatch):
    from peft import PeftModel

    from adapterlab.evaluate import task_accuracy
    from adapterlab.models import load_model, load_tokenizer

    out = tmp_path / "out"
    steps = [
        {"prune": {"model": str(base), "method": "magnitude", "sparsity": 0.5, "output": str(out / "pruned")}},
        {
            "name": "sent",
            "train": train_dict("${steps.prune.output}", out / "sent", eval=None, put={"name": "tiny-sent"}),
        },
        {"name": "dom", "train": train_dict("${prune}", out / "dom", eval=None, data__task="domain", put=None)},
        {
            "merge": {
                "method": "linear",
                "adapters": [
                    {"path": "${steps.sent.output}", "weight": 0.5},
                    {"path": "${steps.dom.output}", "weight": 0.5},
                ],
                "output": {"format": "lora", "rank": 8},
                "output_dir": str(out / "merged"),
            }
        },
        {
            "name": "ev",
            "evaluate": {"model": "${steps.prune.output}", "adapter": "${merge}", "task": "sentiment", "n": 8},
        },
        {"put": {"src": "${steps.merge.output}", "name": "tiny-merged", "tags": ["merged"]}},
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"description": "tiny", "steps": steps})
    pipeline = load_pipeline(path)
    assert [r["name"] for r in plan(pipeline)] == ["prune", "sent", "dom", "merge", "ev", "put"]
    result = run_pipeline(pipeline, source=path)
    o = result.outputs
    assert o["prune"]["output"] == str(out / "pruned") and o["prune"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert o["sent"]["digest"] == f"{1:064x}" and o["sent"]["ref"] == "hub:tiny-sent" and o["dom"]["digest"] is None
    assert o["merge"]["output"] == str(out / "merged")
    # the evaluate step scored the pruned base + merged adapter: recompute it by hand
    tok = load_tokenizer(out / "pruned")
    merged = PeftModel.from_pretrained(load_model(out / "pruned"), str(out / "merged"))
    assert o["ev"]["accuracy"] == task_accuracy(merged, tok, "sentiment", n=8).accuracy
    # the merge of the two trained adapters is their weighted sum of deltas (linear, rank 8 = 4 + 4: exact)
    sent = PeftModel.from_pretrained(load_model(out / "pruned"), str(out / "sent"))
    dom = PeftModel.from_pretrained(load_model(out / "pruned"), str(out / "dom"))
    key = "model.layers.0.self_attn.q_proj"

    def delta(pm) -> torch.Tensor:
        layer = pm.get_base_model().get_submodule(key)
        return layer.get_delta_weight("default").float()

    torch.testing.assert_close(delta(merged), 0.5 * delta(sent) + 0.5 * delta(dom), rtol=1e-4, atol=1e-6)
    assert [p["name"] for p in hub.puts] == ["tiny-sent", "tiny-merged"]
    assert hub.puts[1]["tags"] == ("merged",) and hub.puts[1]["provenance"]["pipeline"] == str(path)
    assert set(result.seconds) == set(o)


def test_no_put_skips_every_registry_write(base, tmp_path, hub):
    steps = [
        {"train": train_dict(base, tmp_path / "a", eval=None, put={"name": "x"})},
        {"put": {"src": "${train}", "name": "y"}},
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    result = run_pipeline(load_pipeline(path), source=path, put=False)
    assert hub.puts == [] and result.outputs["put"]["digest"] is None
    assert (tmp_path / "a" / "adapter_config.json").is_file()


def test_a_late_bad_step_stops_the_pipeline_before_the_first_step_runs(base, tmp_path, hub):
    steps = [
        {"prune": {"model": str(base), "method": "magnitude", "output": str(tmp_path / "pruned")}},
        {"train": train_dict("${prune}", tmp_path / "a", adapter__callbacks={"LoriCallback": {"switch_step": 1}})},
        {"evaluate": {"model": str(base), "task": "sentimnt"}},
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    with pytest.raises(ValueError, match=r"steps\.2\.evaluate\.task: unknown task 'sentimnt'"):
        run_pipeline(load_pipeline(path), source=path)
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "a").exists()


@pytest.mark.skipif(_has("adapterlab.retrain", "perp_"), reason="adapterlab.retrain.perp_ is installed")
def test_perp_step_without_perp_fails_before_work(base, tmp_path):
    steps = [
        {"prune": {"model": str(base), "method": "magnitude", "output": str(tmp_path / "p")}},
        {"perp": {"model": "${prune}", "output": str(tmp_path / "perp")}},
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    with pytest.raises(ValueError, match=r"steps\.1\.perp: needs adapterlab\.retrain\.perp_"):
        check_pipeline(load_pipeline(path), path)
    assert not (tmp_path / "p").exists()


@pytest.mark.skipif(not _has("adapterlab.retrain", "perp_"), reason="adapterlab.retrain.perp_ not installed yet")
def test_perp_step_runs_and_keeps_sparsity(base, tmp_path):
    steps = [
        {"prune": {"model": str(base), "method": "magnitude", "output": str(tmp_path / "p")}},
        {
            "perp": {
                "model": "${prune}",
                "scope": "mask_lora",
                "r": 2,
                "corpus": "lee",
                "nsamples": 4,
                "seqlen": 32,
                "eval_windows": 2,
                "steps": 2,
                "lr": 1e-3,
                "output": str(tmp_path / "perp"),
            }
        },
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    result = run_pipeline(load_pipeline(path), source=path)
    report = json.loads((tmp_path / "perp" / "perp_report.json").read_text())
    assert report["steps"] == 2 and report["sparsity"] >= 0.5 - 1e-6 and report["merge"] is not None
    from adapterlab.models import load_model

    load_model(tmp_path / "perp")  # a plain model folder again (PERP layers merged)
    assert result.outputs["perp"]["perplexity"] == report["perplexity_after"]


@pytest.mark.skipif(
    not _has("adapterlab.compression", "compress_adapters"), reason="compress_adapters not installed yet"
)
def test_compress_step_runs(tmp_path):
    from tests.merging._helpers import make_lora_dirs

    a, b = make_lora_dirs(tmp_path / "adapters", 2)
    steps = [
        {"compress": {"adapters": {"a": str(a), "b": str(b)}, "rank": 2, "seed": 1, "output": str(tmp_path / "bundle")}}
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    result = run_pipeline(load_pipeline(path), source=path)
    from adapterlab.compression import SharedBasisBundle

    bundle = SharedBasisBundle.load(tmp_path / "bundle")
    assert sorted(bundle.names) == ["a", "b"] and bundle.rank == 2
    assert result.outputs["compress"] == {"output": str(tmp_path / "bundle"), "digest": None}


def test_pipeline_with_the_real_registry(base, tmp_path, monkeypatch):
    registry = pytest.importorskip("adapterlab.registry")
    if not hasattr(registry, "AdapterRegistry"):
        pytest.skip("adapterlab.registry has no AdapterRegistry yet")
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "hub"))
    steps = [
        {"train": train_dict(base, tmp_path / "a", eval=None, put={"name": "tiny-a", "tags": ["v1"]})},
        {"evaluate": {"model": str(base), "adapter": "${steps.train.ref}", "task": "sentiment", "n": 4}},
        {"put": {"src": "${train}", "name": "tiny-a-copy", "base": str(base)}},
    ]
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    result = run_pipeline(load_pipeline(path), source=path)
    reg = registry.AdapterRegistry(tmp_path / "hub")
    digest = result.outputs["train"]["digest"]
    assert reg.resolve("tiny-a") == reg.resolve("v1") == digest == result.outputs["put"]["digest"]
    assert reg.show("tiny-a")["provenance"]["kind"] == "trained"
    assert 0.0 <= result.outputs["evaluate"]["accuracy"] <= 1.0
    # a hub: input that does not resolve fails before any work
    bad = [{"evaluate": {"model": str(base), "adapter": "hub:nope", "task": "sentiment"}}]
    path = write_yaml(tmp_path / "bad.yaml", {"steps": bad})
    with pytest.raises(ValueError, match=r"steps\.0\.evaluate\.adapter: 'hub:nope'"):
        check_pipeline(load_pipeline(path), path)
