"""Each plot function writes a non-empty PNG from a hand-made input; bad input names what is missing."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("matplotlib")

from adapterlab import plots  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG


def _module(layer: int, proj: str, energy: float) -> dict:
    return {
        "name": f"model.layers.{layer}.self_attn.{proj}",
        "stored_as": "lora",
        "rank": 2,
        "energy": energy,
        "delta_norm": 5.0,
        "spectrum_head": [4.0, 2.0, 1.0, 0.5],
    }


def test_extraction_energy_from_report_dict(tmp_path):
    report = {
        "global_energy": 0.8,
        "modules": [_module(i, p, 0.8) for i in range(3) for p in ("q_proj", "v_proj")]
        + [{"name": "model.layers.0.mlp.up_proj", "stored_as": "unchanged"}],
    }
    assert _is_png(plots.plot_extraction_energy(report, tmp_path / "e.png"))


def test_extraction_energy_from_extract_result(tmp_path):
    import torch

    from adapterlab import extract_lora
    from adapterlab.models import tiny_llama

    base, tuned = tiny_llama(), tiny_llama()
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight.add_(0.1 * torch.randn(64, 64))
    res = extract_lora(base, tuned, rank=2, extras="skip")
    assert _is_png(plots.plot_extraction_energy(res, tmp_path / "e.png"))


def test_dylora_accuracy_from_json_file(tmp_path):
    data = {
        "arms": {
            "dylora_full": {"accuracy_at_rank": {"1": 0.7, "2": 0.8, "4": 0.85}},
            "lora_r1": {"accuracy": 0.75},
            "lora_r4": {"accuracy": 0.86},
            "zero_shot": {"accuracy": 0.6},
        },
        "settings": {"task": "sentiment", "steps": 25},
    }
    src = tmp_path / "lowrank.json"
    src.write_text(json.dumps(data))
    assert _is_png(plots.plot_dylora_accuracy(src, tmp_path / "d.png"))


def test_layer_sparsity_single_and_compared(tmp_path):
    from adapterlab.pruning.pruner import LayerSparsity, PruneReport

    rows = [
        LayerSparsity(f"model.layers.{i}.mlp.{p}", (4, 4), 8 + i, 16)
        for i in range(3)
        for p in ("up_proj", "down_proj")
    ]
    rep = PruneReport("magnitude", None, 0.5, layers=rows)
    assert _is_png(plots.plot_layer_sparsity(rep, tmp_path / "one.png"))
    other = [{"name": r.name, "sparsity": 0.5} for r in rows]
    assert _is_png(plots.plot_layer_sparsity({"magnitude": rep, "wanda": other}, tmp_path / "two.png"))


def test_serving_throughput_several_results(tmp_path):
    def result(device):
        return {
            "settings": {"device": device, "requests": 64, "rank": 16, "dtype": "float32"},
            "machine": {"cpu_count": 2},
            "rows": [
                {"pool": p, "tokens_per_s": {"merged": 100.0, "peft": 100.0 / p, "grouped": 90.0}} for p in (1, 10, 100)
            ],
        }

    assert _is_png(plots.plot_serving_throughput([result("cpu"), result("cuda")], tmp_path / "s.png"))


@pytest.mark.parametrize(
    "fn, arg, word",
    [
        (plots.plot_extraction_energy, {"modules": []}, "no LoRA modules"),
        (plots.plot_dylora_accuracy, {"arms": {}}, "dylora"),
        (plots.plot_layer_sparsity, [{"name": "lm_head", "sparsity": 0.1}], "decoder-layer"),
        (plots.plot_serving_throughput, {"rows": []}, "rows"),
    ],
)
def test_bad_input_names_what_is_missing(tmp_path, fn, arg, word):
    with pytest.raises(ValueError, match=word):
        fn(arg, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_path_must_be_png(tmp_path):
    with pytest.raises(ValueError, match=r"\.png"):
        plots.plot_layer_sparsity([{"name": "model.layers.0.q_proj", "sparsity": 0.5}], tmp_path / "x.jpg")
