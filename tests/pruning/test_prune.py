"""prune_ on tiny models: exact sparsity, dense embeddings/head, sequential calibration, masks,
reports, registry completeness and input validation."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterlab.pruning as pruning
from adapterlab.models import block_linears, decoder_layers, tiny_llama, tiny_opt
from adapterlab.pruning import (
    PRUNERS,
    PruneReport,
    apply_masks_,
    check_nm,
    get_masks,
    load_masks,
    mask_hash,
    prune_,
    save_masks,
    sparsity_of,
)
from adapterlab.pruning.pruner import _capture_block0_inputs, _run_block

METHODS = ["magnitude", "wanda", "sparsegpt"]


def _calibration(n: int = 4, seqlen: int = 16, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), k


# ------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------


def test_registry_lists_methods() -> None:
    assert PRUNERS.names() == sorted(METHODS)


def test_every_method_file_is_registered() -> None:
    """Registry completeness: each module of adapterlab.pruning (except the infrastructure)
    registers a Pruner subclass defined in it."""
    infra = {"pruner", "functional"}
    registered = {PRUNERS.get(name).__module__ for name in PRUNERS.names()}
    for info in pkgutil.iter_modules(pruning.__path__):
        if info.name in infra or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"adapterlab.pruning.{info.name}")
        assert module.__name__ in registered, f"{module.__name__} defines no registered pruner"


# ------------------------------------------------------------------------------------------
# exact sparsity on tiny models
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_prune_tiny_llama_exact(method: str, pattern: str | None) -> None:
    model = tiny_llama()
    dense = _snapshot(model)
    report = prune_(model, method, 0.5, pattern=pattern, calibration=_calibration())
    assert isinstance(report, PruneReport)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    assert [row.name for row in report.layers] == list(linears)
    assert len(linears) == 2 * 7
    for name, lin in linears.items():
        w = lin.weight
        assert int((w == 0).sum()) == w.numel() // 2, name  # exactly 50.00 %
        if pattern is not None:
            n, m = map(int, pattern.split(":"))
            groups = (w != 0).reshape(w.shape[0], -1, m).sum(-1)  # (d_out, d_in/M)
            assert bool((groups == n).all()), name
    for row in report.layers:
        assert row.sparsity == 0.5
    assert report.global_sparsity == 0.5
    assert report.nm_valid is (None if pattern is None else True)
    assert report.target_sparsity == 0.5
    assert report.pattern == pattern
    # embeddings, lm_head and norms stay dense and unchanged
    state = model.state_dict()
    for key, value in dense.items():
        if ".layers." not in key or "norm" in key:
            assert torch.equal(state[key], value), key
    assert torch.equal(model.lm_head.weight, dense["lm_head.weight"])
    assert torch.equal(model.model.embed_tokens.weight, dense["model.embed_tokens.weight"])
    assert sparsity_of(model) == 0.5


@pytest.mark.parametrize("method", METHODS)
def test_prune_tiny_opt(method: str) -> None:
    model = tiny_opt()
    dense = _snapshot(model)
    report = prune_(model, method, 0.6, calibration=_calibration())
    assert len(report.layers) == 2 * 6  # q k v out_proj fc1 fc2
    for layer in report.layers:
        if method == "wanda":  # per-row groups: floor(0.6 * d_in) per row
            d_out, d_in = layer.shape
            assert layer.zeros == d_out * int(0.6 * d_in)
        else:
            assert layer.zeros == int(0.6 * layer.numel)
    state = model.state_dict()
    for key, value in dense.items():  # embeddings, (tied) head, norms, biases untouched
        if not (key.endswith(".weight") and any(p in key for p in ("_proj.", "fc1.", "fc2."))):
            assert torch.equal(state[key], value), key
    out = model(_calibration(1, 8)).logits
    assert torch.isfinite(out).all()


def test_magnitude_scopes_on_model() -> None:
    model = tiny_llama()
    report = prune_(model, "magnitude", 0.25, scope="row")
    assert report.params["scope"] == "row"
    for lin in (m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n):
        per_row = (lin.weight == 0).sum(1)
        assert bool((per_row == int(0.25 * lin.in_features)).all())


def test_calibration_methods_differ_from_magnitude() -> None:
    masks = {}
    for method in METHODS:
        model = tiny_llama()
        prune_(model, method, 0.5, calibration=_calibration(), scope="row" if method == "magnitude" else None)
        masks[method] = get_masks(model)
    name = "model.layers.1.mlp.down_proj"
    assert not torch.equal(masks["wanda"][name], masks["magnitude"][name])
    assert not torch.equal(masks["sparsegpt"][name], masks["wanda"][name])


def test_sparsegpt_zero_sparsity_keeps_model_output() -> None:
    model = tiny_llama()
    ids = _calibration(2, 16, seed=3)
    before = model(ids).logits
    prune_(model, "sparsegpt", 0.0, calibration=_calibration(8, 32))
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------
# sequential calibration
# ------------------------------------------------------------------------------------------


def test_captured_block_inputs_replay_the_dense_model() -> None:
    """Capturing block 0's inputs (with all kwargs: position embeddings, ...) and running the
    blocks standalone reproduces the model's own hidden states."""
    model = tiny_llama(num_hidden_layers=3)
    ids = _calibration(5, 16)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states  # embeddings + each block
        calls = _capture_block0_inputs(model, decoder_layers(model)[0], ids, batch_size=2)
        hidden = torch.cat([c[0] for c in calls])
        torch.testing.assert_close(hidden, expected[0])
        for i, block in enumerate(decoder_layers(model)[:-1]):  # the last has the final norm
            outs = _run_block(block, calls)
            calls = [(o, r, k) for o, (_, r, k) in zip(outs, calls)]
            torch.testing.assert_close(torch.cat(outs), expected[i + 1], atol=1e-5, rtol=1e-5)
    assert "position_embeddings" in calls[0][2]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_calibration_feeds_pruned_outputs(method: str) -> None:
    """Block 1's statistics are collected on the outputs of the *pruned* block 0."""
    calib = _calibration(4, 16)
    dense = tiny_llama()
    model = tiny_llama()
    seen: list[torch.Tensor] = []
    q1 = decoder_layers(model)[1].self_attn.q_proj
    handle = q1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    prune_(model, method, 0.5, calibration=calib, batch_size=4)
    handle.remove()
    assert len(seen) == 1  # one stats pass over block 1 (no re-run: it is the last block)
    expected_pruned: list[torch.Tensor] = []
    expected_dense: list[torch.Tensor] = []
    h1 = q1.register_forward_pre_hook(lambda mod, args: expected_pruned.append(args[0]))
    h2 = decoder_layers(dense)[1].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: expected_dense.append(args[0])
    )
    with torch.no_grad():
        model(calib)
        dense(calib)
    h1.remove()
    h2.remove()
    torch.testing.assert_close(seen[0], expected_pruned[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[0], expected_dense[0], atol=1e-3)


def test_wanda_block1_matches_manual_two_block_run() -> None:
    """Manual oracle: prune block 0 by hand with Wanda, then block 1 on its outputs."""
    from adapterlab.pruning.functional import accumulate_sq_norm, wanda_mask

    calib = _calibration(3, 16)
    model = tiny_llama()
    prune_(model, "wanda", 0.5, calibration=calib)

    manual = tiny_llama()
    blocks = decoder_layers(manual)
    with torch.no_grad():
        for i in range(2):
            stats: dict[str, torch.Tensor] = {}
            hooks = [
                lin.register_forward_pre_hook(
                    lambda mod, args, name=name, stats=stats: stats.__setitem__(
                        name, accumulate_sq_norm(torch.zeros(mod.in_features), 0, args[0])[0]
                    )
                )
                for name, lin in block_linears(blocks[i]).items()
            ]
            manual(calib)  # full-batch run: inputs of block i come from the pruned blocks < i
            for h in hooks:
                h.remove()
            for name, lin in block_linears(blocks[i]).items():
                lin.weight.mul_(wanda_mask(lin.weight, stats[name], 0.5))
    for (name, a), b in zip(get_masks(model).items(), get_masks(manual).values()):
        assert torch.equal(a, b), name


def test_progress_factory_steps_once_per_block() -> None:
    calls: list[tuple[str, int | None]] = []
    steps: list[int] = []

    def factory(description: str, total: int | None):
        calls.append((description, total))
        return lambda n=1: steps.append(n)

    prune_(tiny_llama(num_hidden_layers=3), "wanda", 0.5, calibration=_calibration(), progress=factory)
    assert calls == [("wanda: blocks", 3)]
    assert sum(steps) == 3


def test_training_flag_restored() -> None:
    model = tiny_llama()
    model.train()
    prune_(model, "wanda", 0.5, calibration=_calibration())
    assert model.training


# ------------------------------------------------------------------------------------------
# bad input: ValueError naming the value and the choices, model untouched
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("pruneit", 0.5), {}, r"'pruneit'.*magnitude, sparsegpt, wanda"),
        (("magnitude", 1.0), {}, r"\[0, 1\)"),
        (("magnitude", -0.1), {}, r"\[0, 1\)"),
        (("magnitude", None), {}, r"\[0, 1\)"),
        (("magnitude", 0.5), {"pattern": "5:4"}, r"'5:4'.*1 <= N <= M"),
        (("magnitude", 0.5), {"pattern": "2/4"}, r"'2/4'.*N:M"),
        (("wanda", None), {"pattern": "3:6"}, r"'3:6'.*d_in % M == 0.*d_in=64"),
        (("wanda", 0.5), {}, r"calibration"),
        (("sparsegpt", 0.5), {"calibration": torch.rand(2, 8)}, r"integer"),
        (("sparsegpt", 0.5), {"calibration": torch.arange(8)}, r"\(n_samples, seqlen\)"),
        (("sparsegpt", 0.5), {"calibration": torch.full((2, 8), 500)}, r"\[0, 128\)"),
        (("wanda", 0.5), {"scope": "matrix", "calibration": torch.zeros(1, 4, dtype=torch.long)}, r"'matrix'.*row"),
        (("magnitude", 0.5), {"scope": "global"}, r"'global'.*matrix, row"),
        (("sparsegpt", 0.5), {"percdamp": -1.0, "calibration": torch.zeros(1, 4, dtype=torch.long)}, r"percdamp"),
        (("sparsegpt", 0.5), {"damp": 0.1}, r"'damp'.*percdamp, blocksize"),
        (("magnitude", 0.5), {"blocksize": 8}, r"'blocksize'.*scope"),
    ],
)
def test_bad_input_raises_before_modifying(args: tuple, kwargs: dict, match: str) -> None:
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune_(model, *args, **kwargs)
    _assert_unchanged(model, snap)


def test_nm_ignores_sparsity_argument() -> None:
    model = tiny_llama()
    report = prune_(model, "magnitude", 0.9, pattern="1:4")
    assert report.target_sparsity == 0.75
    assert report.global_sparsity == 0.75
    assert report.nm_valid is True


# ------------------------------------------------------------------------------------------
# masks and reports
# ------------------------------------------------------------------------------------------


def test_masks_round_trip(tmp_path: Path) -> None:
    model = tiny_llama()
    prune_(model, "magnitude", 0.5, pattern="2:4")
    masks = get_masks(model)
    assert len(masks) == 14 and all(m.dtype == torch.bool for m in masks.values())
    assert "lm_head" not in masks and "model.embed_tokens" not in masks
    digest = save_masks(tmp_path / "masks.safetensors", masks, metadata={"method": "magnitude"})
    assert digest == mask_hash(masks) and len(digest) == 64
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)

    fresh = tiny_llama()
    assert sparsity_of(fresh) == 0.0
    assert apply_masks_(fresh, loaded) is None
    for name, mask in get_masks(fresh).items():
        assert torch.equal(mask, masks[name])
    assert all(check_nm(m.weight, 2, 4) for n, m in fresh.named_modules() if n in masks)


def test_mask_hash_changes_with_content() -> None:
    masks = get_masks(tiny_llama())
    h0 = mask_hash(masks)
    name = next(iter(masks))
    masks[name] = masks[name].clone()
    masks[name][0, 0] = False
    assert mask_hash(masks) != h0


def test_apply_masks_validates() -> None:
    model = tiny_llama()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'nope'"):
        apply_masks_(
            model, {"model.layers.0.mlp.up_proj": torch.zeros(128, 64, dtype=torch.bool), "nope": torch.ones(2)}
        )
    with pytest.raises(ValueError, match="shape"):
        apply_masks_(model, {"model.layers.0.mlp.up_proj": torch.zeros(3, 3, dtype=torch.bool)})
    _assert_unchanged(model, snap)


def test_report_to_dict_save_and_str(tmp_path: Path) -> None:
    model = tiny_llama()
    report = prune_(model, "sparsegpt", None, pattern="2:4", calibration=_calibration())
    d = report.to_dict()
    assert d["method"] == "sparsegpt" and d["pattern"] == "2:4" and d["nm_valid"] is True
    assert d["params"] == {"scope": "block", "percdamp": 0.01, "blocksize": 128}
    assert d["n_calibration"] == 4
    assert d["zeros"] * 2 == d["numel"]
    damping = d["layers"][0].pop("damping")
    assert d["layers"][0] == {
        "name": "model.layers.0.self_attn.q_proj",
        "shape": [64, 64],
        "zeros": 2048,
        "numel": 4096,
        "sparsity": 0.5,
    }
    assert damping > 0 and all(row["damping"] > 0 for row in d["layers"][1:])  # SparseGPT records its dampening
    path = report.save(tmp_path / "sparsity_report.json")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report.to_dict()))
    text = str(report)
    assert "sparsegpt 2:4" in text and "model.layers.1.mlp.down_proj" in text and "50.00%" in text


def test_sparsegpt_dampening_retry_is_logged_once_and_recorded(monkeypatch, caplog) -> None:
    """An indefinite Hessian for one layer forces three retries: one warning naming the layer and the
    dampening used, and the report row records percdamp * mean(diag H) * 10^3."""
    import logging

    from adapterlab.pruning.sparsegpt import SparseGPTPruner

    model = tiny_llama()
    target = model.model.layers[0].mlp.down_proj  # d_in = 128
    bad = torch.block_diag(*[torch.tensor([[1.0, 3.0], [3.0, 1.0]])] * 64)  # mean(diag) 1, eigenvalues 4, -2
    init, add = SparseGPTPruner.init_stats, SparseGPTPruner.add_batch
    monkeypatch.setattr(
        SparseGPTPruner, "init_stats", lambda self, layer: (bad.clone(), -1) if layer is target else init(self, layer)
    )
    monkeypatch.setattr(
        SparseGPTPruner, "add_batch", lambda self, stats, x: stats if stats[1] == -1 else add(self, stats, x)
    )
    with caplog.at_level(logging.WARNING, logger="adapterlab.pruning"):
        report = prune_(model, "sparsegpt", 0.5, calibration=_calibration())  # percdamp 0.01
    messages = [r for r in caplog.records if "dampening" in r.getMessage()]
    assert len(messages) == 1 and messages[0].levelno == logging.WARNING
    # damp 0.01, 0.1, 1 leave the eigenvalue -2 + damp < 0; 10 = 0.01 * mean(diag) 1.0 * 10^3 is the first that works
    expected = 0.01 * 1.0 * 10**3
    rows = {row.name: row for row in report.layers}
    got = rows["model.layers.0.mlp.down_proj"].damping
    assert got == pytest.approx(expected, rel=1e-12)
    assert "'model.layers.0.mlp.down_proj'" in messages[0].getMessage() and f"{got:.6g}" in messages[0].getMessage()
    assert (
        report.to_dict()["layers"][[r.name for r in report.layers].index("model.layers.0.mlp.down_proj")]["damping"]
        == got
    )
    assert all(
        row.damping is not None and row.damping < 1
        for name, row in rows.items()
        if name != "model.layers.0.mlp.down_proj"
    )
