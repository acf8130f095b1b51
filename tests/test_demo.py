"""The demo tour end to end on a tiny model (seconds), plus its config validation, the results file written
after every stage, the rows printed as they come, the --full preset and CLI errors."""

from __future__ import annotations

import json

import pytest
import torch

from adapterlab.demo import (
    FULL,
    STAGES,
    DemoConfig,
    ZeroMask,
    answer_loss,
    length_grouped_batches,
    run_tour,
    shared_copy,
    target_regex,
    zero_masks,
    zeros_kept,
)
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
        ({"lr_schedule": "cosine"}, "cosine"),
        ({"task_n": 0}, "task_n"),
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


def test_zeros_kept_takes_zero_masks_too():
    base = {"w.weight": torch.tensor([[0.0, 1.0], [2.0, 0.0]])}
    masks = {"w.weight": base["w.weight"] == 0}
    m = torch.nn.Module()
    m.w = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        m.w.weight.copy_(torch.tensor([[0.0, 3.0], [4.0, 0.0]]))
    assert zeros_kept(masks, m) and zeros_kept(base, m)
    with torch.no_grad():
        m.w.weight[1, 1] = -1e-9
    assert not zeros_kept(masks, m) and not zeros_kept(base, m)
    packed = zero_masks(m)
    assert set(packed) == {"w.weight"} and packed["w.weight"].dense().tolist() == [[True, False], [False, False]]
    assert zeros_kept(packed, m)
    with torch.no_grad():
        m.w.weight[0, 0] = 2.0
    assert not zeros_kept(packed, m)


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 1), (7, 13)])
def test_zero_mask_bits_round_trip(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    w[w.abs() < 0.7] = 0.0
    mask = ZeroMask.of(w)
    assert mask.bits.dtype == torch.uint8 and mask.bits.numel() == -(-w.numel() // 8)
    assert torch.equal(mask.dense(), w == 0)


def test_answer_loss_equals_the_model_loss():
    model = tiny_llama(num_hidden_layers=2)
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0  # right padding
    labels = ids.clone()
    labels[:, :6] = -100  # the prompt carries no label
    labels[attn == 0] = -100
    batch = {"input_ids": ids, "attention_mask": attn, "labels": labels}
    torch.testing.assert_close(answer_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_shared_copy_owns_only_the_named_tensors():
    model = tiny_llama(num_hidden_layers=2)
    own = {"model.layers.1.self_attn.q_proj.weight"}
    twin = shared_copy(model, own)
    mine, its = dict(model.named_parameters()), dict(twin.named_parameters())
    assert its[next(iter(own))] is not mine[next(iter(own))]
    torch.testing.assert_close(its[next(iter(own))], mine[next(iter(own))])
    assert all(its[k] is mine[k] for k in mine if k not in own)
    with torch.no_grad():
        mine[next(iter(own))].add_(1.0)  # writing the owned weight leaves the copy as it was
    assert not torch.equal(its[next(iter(own))], mine[next(iter(own))])
    with pytest.raises(ValueError, match="nope"):
        shared_copy(model, {"nope.weight"})


def test_results_json_holds_exactly_the_finished_stages(tmp_path):
    """The file is rewritten after every row: at each ``on_row`` it holds the rows so far, and a tour
    stopped early (a stage prefix) leaves exactly the stages it finished."""
    seen = []

    def on_row(row):
        data = json.loads((tmp_path / "results.json").read_text())
        seen.append(([r["stage"] for r in data["rows"]], data["complete"], row.stage))

    res = run_tour(
        DemoConfig(**TINY, stages=["dense", "prune", "adapt", "merge"]), output=tmp_path, load=_load, on_row=on_row
    )
    assert [s for _, _, s in seen] == ["dense", "prune", "adapt", "merge"]
    for i, (stages, complete, _) in enumerate(seen):
        assert stages == ["dense", "prune", "adapt", "merge"][: i + 1] and complete is False
    final = json.loads((tmp_path / "results.json").read_text())
    assert final["complete"] is True and final["stages_done"] == ["dense", "prune", "adapt", "merge"]
    assert [r["stage"] for r in final["rows"]] == [r.stage for r in res.rows]
    assert final["config"]["stages"] == ["dense", "prune", "adapt", "merge"]


def test_an_interrupted_tour_keeps_what_it_measured(tmp_path):
    class Stop(Exception):
        pass

    def on_row(row):
        if row.stage == "adapt":
            raise Stop

    with pytest.raises(Stop):
        run_tour(DemoConfig(**TINY), output=tmp_path, load=_load, on_row=on_row)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["stage"] for r in data["rows"]] == ["dense", "prune", "adapt"]
    assert data["complete"] is False and data["rows"][2]["accuracy"] is not None


def test_progress_lines_name_the_stage_and_model(tmp_path):
    lines = []

    def progress(description, total):
        lines.append(description)
        return lambda n=1: None

    run_tour(DemoConfig(**TINY, stages=["dense", "prune", "adapt"]), output=tmp_path, load=_load, progress=progress)
    assert "dense · dense: perplexity" in lines
    assert any(line.startswith("prune · magnitude 50%: ") for line in lines)
    assert any(line.startswith("adapt · + LORS r2 (2 steps): train lors") for line in lines)


def test_full_selects_the_three_way_comparison(tmp_path):
    fast, full = DemoConfig(), DemoConfig.full()
    assert fast.methods == ["sparsegpt"]
    assert full.methods == ["magnitude", "wanda", "sparsegpt"]
    assert full.eval_windows > fast.eval_windows and full.task_n > fast.task_n and full.steps > fast.steps
    assert full.extra_eval and not fast.extra_eval
    assert DemoConfig.full(steps=7).steps == 7  # options given with --full still apply
    res = run_tour(
        DemoConfig.full(**{**TINY, "methods": FULL["methods"]}, stages=["dense", "prune"]), output=tmp_path, load=_load
    )
    assert [r.name for r in res.rows] == ["dense", "magnitude 50%", "wanda 50%", "sparsegpt 50%"]
    best = min(res.rows[1:], key=lambda r: r.perplexity)
    assert res.details["base"]["method"] == best.name.split()[0]


def test_cli_help_states_the_preset_defaults():
    from adapterlab.cli.demo import PRESETS

    fast, full = DemoConfig(), DemoConfig.full()
    for key, (fast_text, full_text) in PRESETS.items():
        for cfg, text in ((fast, fast_text), (full, full_text)):
            value = getattr(cfg, key)
            assert (",".join(value) if isinstance(value, list) else str(value)) == text, key


def test_cli_help_fits_80_columns():
    from typer.testing import CliRunner

    from adapterlab.cli.app import app

    res = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert res.exit_code == 0
    assert max(len(line) for line in res.output.splitlines()) <= 80
    assert "…" not in res.output  # nothing cut short (the old --stages default was)
    text = " ".join(res.output.replace("│", " ").split())
    assert "--full" in text and "dense, prune, adapt, merge, extract, compress, serve" in text


def _cli_tiny(monkeypatch):
    """Run the CLI on the tiny model with the TINY settings (the CLI takes only some of them as options)."""
    import adapterlab.demo as demo_mod

    real = demo_mod.run_tour
    built = []  # the configs the CLI built

    def tiny_tour(cfg, **kw):
        built.append(cfg)
        cfg = DemoConfig(**{**cfg.__dict__, **{k: v for k, v in TINY.items() if k != "methods"}})
        return real(cfg, load=_load, **kw)

    monkeypatch.setattr(demo_mod, "run_tour", tiny_tour)
    monkeypatch.setattr("adapterlab.models.default_model_dir", lambda: None)
    return built


def test_cli_prints_rows_in_order_and_writes_results(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from adapterlab.cli.app import app

    _cli_tiny(monkeypatch)
    res = CliRunner().invoke(app, ["demo", "--methods", "magnitude", "-o", str(tmp_path)], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["complete"] is True and data["stages_done"] == list(STAGES)
    out = res.output
    # streamed: one line per stage in tour order, before the final table's title
    final = out.index("min)")
    marks = [out.index(f"\n{stage} ") for stage in STAGES]
    assert marks == sorted(marks) and marks[-1] < final
    assert "results written to" in out


def test_cli_full_flag_compares_three_methods(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from adapterlab.cli.app import app

    built = _cli_tiny(monkeypatch)
    res = CliRunner().invoke(app, ["demo", "--full", "--stages", "dense,prune", "--steps", "7", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["dense", "magnitude 50%", "wanda 50%", "sparsegpt 50%"]
    cfg = built[0]
    assert cfg.methods == FULL["methods"] and cfg.task_n == FULL["task_n"] and cfg.extra_eval is True
    assert cfg.steps == 7  # an option given with --full still applies


def test_length_grouped_batches_cover_each_epoch_once_with_little_padding():
    lengths = torch.randint(5, 60, (64,), generator=torch.Generator().manual_seed(0))
    batches = length_grouped_batches(lengths, batch_size=8, steps=8, seed=0, group=4)
    assert len(batches) == 8 and all(len(b) == 8 for b in batches)
    assert sorted(torch.cat(batches).tolist()) == list(range(64))  # one epoch: every example once
    padded = sum(8 * int(lengths[b].max()) for b in batches)
    random = sum(
        8 * int(lengths[b].max()) for b in torch.randperm(64, generator=torch.Generator().manual_seed(1)).split(8)
    )
    assert padded < random
    again = length_grouped_batches(lengths, batch_size=8, steps=8, seed=0, group=4)
    assert all(torch.equal(a, b) for a, b in zip(batches, again))  # seeded
    assert len(length_grouped_batches(lengths, batch_size=8, steps=20, seed=0)) == 20  # more than an epoch
