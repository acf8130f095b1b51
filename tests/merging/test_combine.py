"""merge_adapters end to end: TIES oracles in both scopes, DARE == linear at density 1, LoRA output vs
dense merge, RMM reconstruction, peft round trips, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapterlab.merging import MERGERS, RMMBundle, merge_adapters, resolve_adapter
from tests.merging._helpers import delta_source, make_lora_dirs
from tests.tolerances import assert_close

M1, M2 = "m1", "m2"


def _hand_sources():
    # P = 6 entries per task (m1: 1x4, m2: 1x2); density 0.5 -> keep the 3 largest per task (model scope)
    return [
        delta_source("t1", {M1: [4.0, 2.5, 2.0, 0.5], M2: [-3.0, 0.1]}),  # κ1 = 2.5
        delta_source("t2", {M1: [-2.0, 1.5, -5.0, 0.2], M2: [1.0, 0.3]}),  # κ2 = 1.5 (all three in m1)
        delta_source("t3", {M1: [3.2, 2.0, 1.0, -6.0], M2: [3.0, 4.0]}),  # κ3 = 3.2
    ]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("adapters"), 3)


def test_every_method_is_registered() -> None:
    assert MERGERS.names() == ["dare_linear", "dare_ties", "linear", "rmm", "task_arithmetic", "ties"]


def test_ties_model_scope_by_hand() -> None:
    # trimmed: t1 m1 [4, 2.5, 0, 0] m2 [-3, 0]; t2 m1 [-2, 1.5, -5, 0] m2 [0, 0]; t3 m1 [3.2, 0, 0, -6] m2 [0, 4]
    # mass signs: m1 [+, +, -, -], m2 [-, +]; disjoint means:
    res = merge_adapters(_hand_sources(), "ties", density=0.5, output="sparse")
    assert_close(res.delta(M1), torch.tensor([[3.6, 2.0, -5.0, -6.0]]))  # (4+3.2)/2, (2.5+1.5)/2, -5, -6
    assert_close(res.delta(M2), torch.tensor([[-3.0, 4.0]]))
    assert res.params["kappa"] == [2.5, 1.5, pytest.approx(3.2)]


def test_ties_model_scope_counts_only_each_tasks_own_modules() -> None:
    # t1 targets m1 only (P1 = 4), t2 targets m1 and m2 (P2 = 8); density 0.5:
    # t1 keeps ceil(0.5*4) = 2 -> {4, -3}, κ1 = 3 (counting t2's m2 as zeros of t1, P1 = 8 would keep 4 ->
    # κ1 = 1 and t1 untrimmed); t2 keeps ceil(0.5*8) = 4 of |.| 5, 3, 2, 1, 0.9, 0.5, 0.2, 0.1 -> κ2 = 1
    # trimmed: t1 m1 [4, 0, -3, 0]; t2 m1 [-1, 2, 0, -5], m2 [3, 0, 0, 0]
    # m1 signs [+, +, -, -]: [4, 2, -3, -5]; m2 [3, 0, 0, 0]
    srcs = [
        delta_source("t1", {M1: [4.0, 1.0, -3.0, 2.0]}),
        delta_source("t2", {M1: [-1.0, 2.0, 0.5, -5.0], M2: [3.0, -0.2, 0.9, 0.1]}),
    ]
    res = merge_adapters(srcs, "ties", density=0.5, output="sparse")
    assert res.params["kappa"] == [3.0, 1.0]
    assert_close(res.delta(M1), torch.tensor([[4.0, 2.0, -3.0, -5.0]]))
    assert_close(res.delta(M2), torch.tensor([[3.0, 0.0, 0.0, 0.0]]))


def test_ties_model_scope_different_targets_brute_force(tmp_path: Path) -> None:
    """Two LoRA folders on different module sets: κ_t from the entries of the modules task t targets."""
    import math

    dirs = [
        make_lora_dirs(tmp_path / "a", 1, targets=("q_proj", "v_proj"))[0],
        make_lora_dirs(tmp_path / "b", 1, targets=("q_proj", "down_proj"), seed=5)[0],
    ]
    srcs = [resolve_adapter(p) for p in dirs]
    res = merge_adapters(dirs, "ties", density=0.2, output="sparse")
    names = sorted({n for s in srcs for n in s.modules})
    kappa = []
    for s in srcs:  # brute force: sort all of the task's own entries
        own = torch.cat([s.delta(n).reshape(-1) for n in names if n in s.modules])  # [P_t]
        kappa.append(float(own.abs().sort(descending=True).values[math.ceil(0.2 * own.numel()) - 1]))
    assert res.params["kappa"] == kappa
    for n in names:
        x = torch.stack([s.delta(n) if n in s.modules else torch.zeros(res.shapes[n]) for s in srcs])  # [2, *shape]
        trimmed = torch.stack([torch.where(x[t].abs() >= kappa[t], x[t], 0.0) for t in range(2)])
        sign = torch.sign(trimmed.sum(0))  # random values: no exact ties
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        want = (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)
        assert_close(res.delta(n), want)
        for t, s in enumerate(srcs):  # each task kept its top 20 % of its own entries in its own modules
            if n not in s.modules:
                assert not bool(trimmed[t].any())


def test_ties_tensor_scope_by_hand() -> None:
    # per tensor: keep floor(0.5*4) = 2 of m1 and floor(0.5*2) = 1 of m2 for each task
    # trimmed: t1 m1 [4, 2.5, 0, 0] m2 [-3, 0]; t2 m1 [-2, 0, -5, 0] m2 [1, 0]; t3 m1 [3.2, 0, 0, -6] m2 [0, 4]
    res = merge_adapters(_hand_sources(), "ties", density=0.5, trim_scope="tensor", output="sparse")
    assert_close(res.delta(M1), torch.tensor([[3.6, 2.5, -5.0, -6.0]]))  # m1[1]: only t1 kept 2.5
    assert_close(res.delta(M2), torch.tensor([[-3.0, 4.0]]))  # m2[0]: -3 + 1 -> "-", mean of {-3}


def test_ties_weights_after_election_and_lambda_by_hand() -> None:
    # w = [1, 0.5, 2], λ = 2 on the model-scope trim above:
    # m1[0] (4*1 + 3.2*2)/2 * 2 = 10.4; m1[1] (2.5 + 0.75)/2 * 2 = 3.25; m1[2] -5*0.5*2 = -5; m1[3] -6*2*2 = -24
    # m2[0] -3*1*2 = -6; m2[1] 4*2*2 = 16
    res = merge_adapters(_hand_sources(), "ties", weights=[1, 0.5, 2], density=0.5, output="sparse", **{"lambda": 2.0})
    assert_close(res.delta(M1), torch.tensor([[10.4, 3.25, -5.0, -24.0]]))
    assert_close(res.delta(M2), torch.tensor([[-6.0, 16.0]]))


def test_ties_zero_vote_takes_the_model_majority() -> None:
    # density 1: nothing trimmed. m[0]: 2 - 2 = 0 (a real tie); the other votes are + and +
    pos = [delta_source("a", {M1: [2.0, 1.0, 1.0]}), delta_source("b", {M1: [-2.0, 1.0, 3.0]})]
    neg = [delta_source("a", {M1: [-2.0, -1.0, -1.0]}), delta_source("b", {M1: [2.0, -1.0, -3.0]})]
    assert_close(merge_adapters(pos, "ties", density=1.0, output="sparse").delta(M1), torch.tensor([[2.0, 1.0, 2.0]]))
    # model majority is "-": the tie resolves to -2 (paper); per-tensor (peft) resolves ties to "+"
    assert_close(
        merge_adapters(neg, "ties", density=1.0, output="sparse").delta(M1), torch.tensor([[-2.0, -1.0, -2.0]])
    )
    got = merge_adapters(neg, "ties", density=1.0, trim_scope="tensor", output="sparse").delta(M1)
    assert_close(got, torch.tensor([[2.0, -1.0, -2.0]]))


def test_ties_matches_peft_utils_in_tensor_scope(lora_dirs: list[Path]) -> None:
    from peft.utils.merge_utils import ties

    srcs = [resolve_adapter(p) for p in lora_dirs]
    res = merge_adapters(lora_dirs, "ties", weights=[1.0, 0.7, 0.4], density=0.3, trim_scope="tensor", output="sparse")
    for name in list(srcs[0].modules)[:3]:
        ref = ties([s.delta(name) for s in srcs], torch.tensor([1.0, 0.7, 0.4]), 0.3, "total")
        assert_close(res.delta(name), ref)


def test_dare_linear_density_one_equals_linear(lora_dirs: list[Path]) -> None:
    w = [0.5, 1.5, -0.25]
    a = merge_adapters(lora_dirs, "linear", weights=w, output="sparse")
    b = merge_adapters(lora_dirs, "dare_linear", weights=w, density=1.0, output="sparse")
    for name in a.shapes:
        assert torch.equal(a.delta(name), b.delta(name))


def test_dare_is_seeded(lora_dirs: list[Path]) -> None:
    a = merge_adapters(lora_dirs, "dare_ties", density=0.3, seed=7, output="sparse")
    b = merge_adapters(lora_dirs, "dare_ties", density=0.3, seed=7, output="sparse")
    c = merge_adapters(lora_dirs, "dare_ties", density=0.3, seed=8, output="sparse")
    name = next(iter(a.shapes))
    assert torch.equal(a.delta(name), b.delta(name))
    assert not torch.equal(a.delta(name), c.delta(name))


def _dare_mask(seed: int, task: int, name: str, shape: tuple[int, ...], density: float) -> torch.Tensor:
    """DARE's seeded keep mask reproduced: one generator per (seed, task, module, part), fp32 uniforms < density."""
    from adapterlab.merging.functional import derive_seed

    g = torch.Generator().manual_seed(derive_seed(seed, task, name, "delta"))
    return torch.rand(shape, generator=g, dtype=torch.float32) < density


def test_dare_ties_by_hand() -> None:
    srcs = [
        delta_source("t1", {M1: [1.0, 2.0, 3.0, -1.0, 0.5, 4.0]}),
        delta_source("t2", {M1: [-3.0, 1.0, 2.0, 2.0, -0.5, 1.0]}),
        delta_source("t3", {M1: [1.5, -2.0, 1.0, -1.0, 0.25, -3.0]}),
    ]
    masks = [_dare_mask(6, t, M1, (1, 6), 0.5).int().tolist()[0] for t in range(3)]
    assert masks == [[1, 0, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0], [1, 1, 0, 1, 0, 1]]  # seed 6, density 0.5
    # kept entries rescaled by 1/0.5: t1 [2, 0, 0, 0, 1, 0]; t2 [-6, 0, 0, 4, -1, 0]; t3 [3, -4, 0, -2, 0, -6]
    # mass: sums [-1, -4, 0, 2, 0, -6] -> signs [-, -, (none), +, + (tie -> +1, peft), -]
    # disjoint mean: [-6, -4, 0, 4, 1, -6]
    res = merge_adapters(srcs, "dare_ties", density=0.5, seed=6, output="sparse")
    assert_close(res.delta(M1), torch.tensor([[-6.0, -4.0, 0.0, 4.0, 1.0, -6.0]]))
    # weights [1, 0.5, 2] after the (unweighted) election, then λ = 0.5:
    # [-6*0.5, -4*2, 0, 4*0.5, 1*1, -6*2] * 0.5 = [-1.5, -4, 0, 1, 0.5, -6]
    res = merge_adapters(
        srcs, "dare_ties", weights=[1, 0.5, 2], density=0.5, seed=6, output="sparse", **{"lambda": 0.5}
    )
    assert_close(res.delta(M1), torch.tensor([[-1.5, -4.0, 0.0, 1.0, 0.5, -6.0]]))
    # frequency: sign counts [+1, -1, 0, 0, 0, -1] -> [+, -, (none), + (tie), + (tie), -]:
    # [(2+3)/2, -4, 0, 4, 1, -6]
    res = merge_adapters(srcs, "dare_ties", density=0.5, seed=6, elect="frequency", output="sparse")
    assert_close(res.delta(M1), torch.tensor([[2.5, -4.0, 0.0, 4.0, 1.0, -6.0]]))
    assert res.params["seed"] == 6


def test_dare_ties_brute_force(lora_dirs: list[Path]) -> None:
    """LoRA folders: reproduced drop masks, rescale by 1/p, then TIES election and disjoint mean entry by entry."""
    srcs = [resolve_adapter(p) for p in lora_dirs]
    w, lam, p = [1.0, 0.7, 0.4], 1.3, 0.3
    res = merge_adapters(lora_dirs, "dare_ties", weights=w, density=p, seed=5, output="sparse", **{"lambda": lam})
    name = "model.layers.1.self_attn.q_proj"
    x = torch.stack([s.delta(name) for s in srcs]).reshape(3, -1)  # [T, P]
    dropped = torch.stack(
        [torch.where(_dare_mask(5, t, name, res.shapes[name], p).reshape(-1), x[t] / p, 0.0) for t in range(3)]
    )  # [T, P]
    assert 0.2 < float((dropped != 0).float().mean()) < 0.4
    want = torch.zeros(x.shape[1])
    for i in range(x.shape[1]):  # the plain loop: elect by mass (tie -> +1), mean of the agreeing weighted values
        col = dropped[:, i].tolist()
        sign = 1.0 if sum(col) >= 0 else -1.0
        agree = [w[t] * v for t, v in enumerate(col) if v != 0 and (v > 0) == (sign > 0)]
        want[i] = lam * sum(agree) / len(agree) if agree else 0.0
    assert_close(res.delta(name).reshape(-1), want)


def test_linear_is_the_weighted_sum_of_scaled_deltas(lora_dirs: list[Path]) -> None:
    srcs = [resolve_adapter(p) for p in lora_dirs]
    res = merge_adapters(lora_dirs, "task_arithmetic", weights=[1.0, 2.0, 3.0], **{"lambda": 0.5})
    for name, m in srcs[1].modules.items():
        assert srcs[1].config["use_rslora"] and m.scale == pytest.approx(srcs[1].config["lora_alpha"] / m.rank**0.5)
        ref = 0.5 * sum(w * s.delta(name) for w, s in zip([1.0, 2.0, 3.0], srcs))
        torch.testing.assert_close(res.delta(name), ref, atol=1e-5, rtol=1e-4)  # rank = sum of ranks: exact
        rep = next(r for r in res.modules if r.name == name)
        assert rep.rank == 12 and rep.energy == pytest.approx(1.0, abs=1e-5)


def test_lora_output_equals_dense_merge_up_to_reported_truncation(lora_dirs: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from adapterlab.models import tiny_llama

    dense = merge_adapters(lora_dirs, "ties", output="sparse")
    low = merge_adapters(lora_dirs, "ties", rank=6)
    for rep in low.modules:
        d = dense.delta(rep.name)
        err = float((d - low.delta(rep.name)).norm())
        assert err / float(d.norm()) == pytest.approx(rep.error, rel=1e-3, abs=1e-6)
        assert err**2 == pytest.approx((1 - rep.energy) * float(d.norm()) ** 2, rel=1e-2, abs=1e-8)
    # applied to the base == peft loading the saved folder and merging
    low.save(tmp_path / "merged")
    base = tiny_llama()
    merged = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "merged")).merge_and_unload()
    low.apply_(base)
    for name in low.shapes:
        assert_close(merged.get_submodule(name).weight, base.get_submodule(name).weight)
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["method"] == "ties" and len(report["modules"]) == len(low.shapes)


def test_energy_output_and_full_output(lora_dirs: list[Path], tmp_path: Path) -> None:
    from adapterlab.models import tiny_llama

    res = merge_adapters(lora_dirs, "ties", energy=0.8)
    assert all(r.energy >= 0.8 - 1e-6 for r in res.modules)
    base = tiny_llama()
    full = merge_adapters(lora_dirs, "task_arithmetic", output="full", base=base)
    lo = merge_adapters(lora_dirs, "task_arithmetic")
    name = next(iter(lo.shapes))
    torch.testing.assert_close(
        full.model.get_submodule(name).weight, base.get_submodule(name).weight + lo.delta(name), atol=1e-5, rtol=1e-4
    )
    assert not torch.equal(full.model.get_submodule(name).weight, base.get_submodule(name).weight)  # base untouched
    full.save(tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file()


def test_in_memory_peft_model_equals_its_folder(lora_dirs: list[Path]) -> None:
    from peft import PeftModel

    from adapterlab.models import tiny_llama

    pm = PeftModel.from_pretrained(tiny_llama(), str(lora_dirs[1]))
    a = merge_adapters([lora_dirs[0], pm], "linear", output="sparse")
    b = merge_adapters([lora_dirs[0], lora_dirs[1]], "linear", output="sparse")
    for name in a.shapes:
        assert_close(a.delta(name), b.delta(name))


def test_factorwise_warns(lora_dirs: list[Path]) -> None:
    with pytest.warns(UserWarning, match="cross terms"):
        res = merge_adapters(lora_dirs, "ties", factorwise=True)
    assert res.warnings


# ---- RMM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["layer", "position"])
def test_rmm_exact_at_k_equal_t_and_error_non_increasing(lora_dirs: list[Path], scope: str, tmp_path: Path) -> None:
    srcs = [resolve_adapter(p) for p in lora_dirs]
    errors = []
    for k in (1, 2, 3):
        res = merge_adapters({f"t{i}": p for i, p in enumerate(lora_dirs)}, "rmm", K=k, coeff_scope=scope)
        errors.append({n: (e["factor_B"], e["factor_A"]) for n, e in res.bundle.errors.items()})
    for n in errors[0]:
        for part in (0, 1):
            seq = [e[n][part] for e in errors]
            assert all(a >= b - 1e-6 for a, b in zip(seq, seq[1:])), (n, seq)
    bundle = res.bundle  # K = 3 = T
    for i, s in enumerate(srcs):
        for name in s.modules:
            torch.testing.assert_close(bundle.delta(f"t{i}", name), s.delta(name), atol=1e-5, rtol=1e-4)
    # save -> load round trip; the folder is also a PEFT adapter (task-average coefficients)
    res.save(tmp_path / "bundle")
    loaded = RMMBundle.load(tmp_path / "bundle")
    name = next(iter(srcs[2].modules))
    torch.testing.assert_close(loaded.delta("t2", name), srcs[2].delta(name), atol=1e-5, rtol=1e-4)
    assert (tmp_path / "bundle" / "adapter_config.json").is_file()


def test_rmm_reconstructed_task_loads_in_peft(lora_dirs: list[Path], tmp_path: Path) -> None:
    from peft import PeftModel

    from adapterlab.models import tiny_llama

    res = merge_adapters(lora_dirs, "rmm", K=3)
    rec = res.reconstruct(1)
    rec.save(tmp_path / "t1")
    ref = PeftModel.from_pretrained(tiny_llama(), str(lora_dirs[1])).merge_and_unload()
    got = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "t1")).merge_and_unload()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


# ---- bad input --------------------------------------------------------------------------------


def test_bad_input_errors(lora_dirs: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^adapters: the adapter list is empty"):
        merge_adapters([], "ties")
    with pytest.raises(ValueError, match=r"unknown merge method 'tie'; choose one of: dare_linear"):
        merge_adapters(lora_dirs, "tie")
    with pytest.raises(
        ValueError, match=r"^params\.densty: unknown parameter for merge method 'ties'; allowed: density"
    ):
        merge_adapters(lora_dirs, "ties", densty=0.2)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"^params\.density must be"):
            merge_adapters(lora_dirs, "ties", density=bad)
    with pytest.raises(ValueError, match=r"^params\.density must be in \(0, 1\]"):
        merge_adapters(lora_dirs, "dare_linear", density=0.0)
    with pytest.raises(ValueError, match=r"^weights: expected 3 numbers"):
        merge_adapters(lora_dirs, "ties", weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"^params\.K = 4 exceeds"):
        merge_adapters(lora_dirs, "rmm", K=4)
    from adapterlab.registry import AdapterRegistry, RefNotFoundError

    empty_hub = AdapterRegistry(lora_dirs[0].parent / "empty_hub")
    with pytest.raises(RefNotFoundError, match=r"adapters\[1\]: 'hub:math': registry .* has no adapter 'math'"):
        merge_adapters([lora_dirs[0], "hub:math"], "ties", registry=empty_hub)
    with pytest.raises(FileNotFoundError, match=r"^adapters\[0\]: adapter folder"):
        merge_adapters([tmp_path / "nope"], "ties")
    with pytest.raises(ValueError, match=r"^output is 'dense'; choose one of: lora, sparse, full"):
        merge_adapters(lora_dirs, "ties", output="dense")
    with pytest.raises(ValueError, match=r"^base: output='full' needs"):
        merge_adapters(lora_dirs, "ties", output="full")


def test_adapters_of_different_bases_are_refused(lora_dirs: list[Path], tmp_path: Path) -> None:
    from adapterlab.models import tiny_llama

    other = make_lora_dirs(tmp_path, 1, hidden_size=128)[0]
    with pytest.raises(
        ValueError, match=r"^adapters\[1\] \('task0_1'\): module 'model.layers.0.mlp.down_proj' has shape"
    ):
        merge_adapters([lora_dirs[0], other], "ties")
    with pytest.raises(ValueError, match=r"^base: module .* has weight shape"):
        merge_adapters(lora_dirs, "ties", base=tiny_llama(hidden_size=128))
    a, b = _renamed(lora_dirs[0], tmp_path, "org/base-a"), _renamed(lora_dirs[1], tmp_path, "org/base-b")
    with pytest.raises(
        ValueError, match=r"^adapters\[1\] \('renamed-org_base-b'\)\.base_model_name_or_path is 'org/base-b'"
    ):
        merge_adapters([a, b], "ties")
    merge_adapters([a, b], "ties", check_base=False)  # the escape hatch named in the message


def _renamed(src: Path, tmp_path: Path, base_name: str) -> Path:
    import shutil

    dst = tmp_path / f"renamed-{base_name.replace('/', '_')}"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst
