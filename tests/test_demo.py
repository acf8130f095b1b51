"""The demo tour end to end on a tiny model (seconds), plus its config validation and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from adapterlab.demo import STAGES, DemoConfig, run_tour, target_regex, zeros_kept
from adapterlab.models import tiny_llama, tiny_tokenizer

TINY = dict(
    methods=["magnitude"],
    train_n=16,
    nsamples=2,
    calib_seqlen=32,
    eval_seqlen=64,
    eval_windows=2,
    task_n=8,
    rank=2,
    adapt_layers=1,
    steps=2,
    extra_steps=1,
    batch_size=2,
    max_length=48,
    compress_rank=3,
    serve_requests=3,
    serve_tokens=2,
    extra_tasks=["domain"],
)


def _load():
    return tiny_llama(max_position_embeddings=512), tiny_tokenizer()


@pytest.mark.parametrize("adapter", ["lors", "spp"])
def test_tour_runs_every_stage_on_a_tiny_model(tmp_path, adapter):
    res = run_tour(DemoConfig(**TINY, adapter=adapter), output=tmp_path, load=_load)
    stages = [r.stage for r in res.rows]
    assert stages == ["dense", "prune", "adapt", "merge", "extract", "compress", "serve"]
    dense, mag = res.rows[:2]
    assert dense.sparsity < 0.05 and mag.sparsity == pytest.approx(0.5, abs=0.01)
    assert res.details["merge"]["zeros_kept"] is True
    merge_row = res.rows[3]
    assert merge_row.sparsity >= mag.sparsity - 1e-9  # merging kept the zeros
    assert res.details["compress"]["storage"]["adapters"] == 2
    assert res.rows[-1].tokens_per_s > 0 and res.details["serve"]["generated_tokens"] > 0
    assert (tmp_path / "bundle").is_dir() and (tmp_path / f"{adapter}-sentiment" / "adapter_config.json").is_file()
    json.dumps(res.to_dict())  # JSON-ready


def test_prefix_of_the_tour_stops_early(tmp_path):
    res = run_tour(
        DemoConfig(**{**TINY, "methods": ["magnitude"]}, stages=["dense", "prune"]), output=tmp_path, load=_load
    )
    assert [r.stage for r in res.rows] == ["dense", "prune"]


def test_zeros_kept_oracle():
    base = {"w.weight": torch.tensor([[0.0, 1.0], [2.0, 0.0]])}
    good = torch.nn.Module()
    good.w = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        good.w.weight.copy_(torch.tensor([[0.0, 5.0], [0.0, 0.0]]))  # extra zeros are fine
    assert zeros_kept(base, good)
    with torch.no_grad():
        good.w.weight[0, 0] = 1e-8
    assert not zeros_kept(base, good)


def test_target_regex_picks_the_last_layers():
    import re

    rx = target_regex(tiny_llama(num_hidden_layers=3), ["q_proj", "v_proj"], 2)
    assert re.fullmatch(rx, "model.layers.2.self_attn.q_proj")
    assert re.fullmatch(rx, "model.layers.1.self_attn.v_proj")
    assert not re.fullmatch(rx, "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(rx, "model.layers.2.self_attn.k_proj")


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"adapter": "lora"}, "adapter"),
        ({"stages": ["dense", "fly"]}, "fly"),
        ({"rank": 0}, "rank"),
        ({"methods": ["nope"]}, "nope"),
        ({"extra_tasks": ["nope"]}, "nope"),
        ({"targets": []}, "targets"),
    ],
)
def test_config_errors_name_the_bad_value(bad, word):
    with pytest.raises((ValueError, KeyError), match=word):
        DemoConfig(**bad)


def test_cli_bad_option_exits_2_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from adapterlab.cli.app import app

    res = CliRunner().invoke(app, ["demo", "--adapter", "nope", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "adapter" in res.output
    assert not (tmp_path / "o").exists()


def test_stage_names_are_the_documented_tour():
    assert STAGES == ("dense", "prune", "adapt", "merge", "extract", "compress", "serve")
