"""Sparse adapters in merge_adapters: SHiRA in sparse form (linear / TIES / DARE oracles against brute-force
dense references on the union support), the merged SHiRA folder reloaded by peft, LoRI by exact concatenation,
the mixed-type fallback and bad input."""

from __future__ import annotations

import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from adapterlab.adapters import ShiraSource
from adapterlab.merging import merge_adapters, resolve_adapter
from tests.merging._helpers import delta_source, make_lora_dirs
from tests.tolerances import assert_close

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"


# ---- builders -----------------------------------------------------------------------------------


def _shira_model(hidden_size: int = 64, targets: tuple[str, ...] = ("q_proj", "v_proj"), density: float = 0.05):
    from peft import get_peft_model

    from adapterlab import ShiraConfig
    from adapterlab.models import tiny_llama

    cfg = ShiraConfig(density=density, target_modules=list(targets))
    return get_peft_model(tiny_llama(hidden_size=hidden_size), cfg)


def _set_entries(pm, how: str, seed: int) -> dict[str, torch.Tensor]:
    """Give every SHiRA layer a mask (``even`` / ``odd`` positions of the first 2K, or ``random``) and
    N(0, 1) values; returns module -> dense delta (the brute-force reference, built by the tuner)."""
    from adapterlab.tuners.shira import shira_layers

    g = torch.Generator().manual_seed(seed)
    for _, layer in shira_layers(pm, "default"):
        k = layer.adapterlab_shira_values["default"].numel()
        m, n = layer.shape
        if how == "random":
            idx = torch.randperm(m * n, generator=g)[:k].sort().values
        else:
            idx = torch.arange(k) * 2 + (1 if how == "odd" else 0)  # disjoint between even and odd
        layer.set_indices_("default", idx)
        with torch.no_grad():
            layer.adapterlab_shira_values["default"].copy_(torch.randn(k, generator=g))
    return {k: layer.delta_weight("default") for k, layer in shira_layers(pm, "default")}


@pytest.fixture(scope="module")
def shira(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """Three SHiRA folders: s0 (even positions) and s1 (odd) are disjoint, s2 (random, q_proj only) overlaps both."""
    root = tmp_path_factory.mktemp("shira")
    paths, deltas = [], []
    for i, (how, targets) in enumerate(
        [("even", ("q_proj", "v_proj")), ("odd", ("q_proj", "v_proj")), ("random", ("q_proj",))]
    ):
        pm = _shira_model(targets=targets)
        deltas.append(_set_entries(pm, how, seed=10 + i))
        pm.save_pretrained(str(root / f"s{i}"))
        paths.append(root / f"s{i}")
    return paths, deltas


def _modules(deltas: list[dict[str, torch.Tensor]]) -> list[str]:
    return sorted({n for d in deltas for n in d})


def _weighted(deltas: list[dict[str, torch.Tensor]], weights: list[float], name: str) -> torch.Tensor:
    shape = next(d[name].shape for d in deltas if name in d)
    return sum((w * d.get(name, torch.zeros(shape)) for w, d in zip(weights, deltas)), torch.zeros(shape))


def _no_densify(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: ShiraSource, name: str) -> torch.Tensor:
        raise AssertionError(f"sparse form densified {self.name}:{name}")

    monkeypatch.setattr(ShiraSource, "delta", boom)


# ---- brute-force TIES on the union support ------------------------------------------------------


def _ref_ties(
    deltas: list[dict[str, torch.Tensor]],
    weights: list[float],
    density: float,
    scope: str,
    lam: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Dense TIES with density relative to stored entries (stored = nonzero here: the values are N(0, 1))."""
    names = _modules(deltas)
    shape = {n: next(d[n].shape for d in deltas if n in d) for n in names}
    dense = [{n: d.get(n, torch.zeros(shape[n])) for n in names} for d in deltas]
    trimmed: list[dict[str, torch.Tensor]] = []
    for d in dense:
        out = {}
        if scope == "model":  # κ_t = ⌈k·P_t⌉-th largest stored |v| over all modules of task t
            stored = torch.cat([d[n][d[n] != 0].abs() for n in names])
            k = math.ceil(Fraction(repr(density)) * stored.numel())
            kappa = torch.sort(stored, descending=True).values[k - 1]
            out = {n: torch.where(d[n].abs() >= kappa, d[n], torch.zeros(())) for n in names}
        else:  # per tensor: top ⌊k·K⌋ of the K stored values
            for n in names:
                flat = d[n].reshape(-1)
                pos = torch.nonzero(flat).reshape(-1)
                k = int(density * pos.numel())
                keep = pos[torch.argsort(flat[pos].abs(), descending=True)[:k]]
                t = torch.zeros_like(flat)
                t[keep] = flat[keep]
                out[n] = t.reshape(shape[n])
        trimmed.append(out)
    signs = {n: torch.sign(sum(t[n] for t in trimmed)) for n in names}
    majority = 1.0
    if scope == "model":
        vote = sum(int((s > 0).sum()) - int((s < 0).sum()) for s in signs.values())
        majority = 1.0 if vote >= 0 else -1.0
    result = {}
    for n in names:
        any_kept = sum((t[n] != 0).int() for t in trimmed) > 0
        sign = torch.where((signs[n] == 0) & any_kept, torch.full_like(signs[n], majority), signs[n])
        total, count = torch.zeros(shape[n]), torch.zeros(shape[n])
        for t, w in zip(trimmed, weights):
            agree = (torch.sign(t[n]) == sign) & (t[n] != 0)
            total += torch.where(agree, w * t[n], torch.zeros(()))
            count += agree.float()
        result[n] = lam * total / count.clamp_min(1)
    return result


# ---- SHiRA: sparse form --------------------------------------------------------------------------


def test_union_support_by_hand() -> None:
    from adapterlab.merging.functional import union_support

    union, x, stored = union_support(
        [torch.tensor([5, 1]), torch.tensor([], dtype=torch.int64), torch.tensor([1, 7, 1])],
        [torch.tensor([2.0, -1.0]), torch.tensor([]), torch.tensor([0.5, 0.0, 0.25])],
    )
    assert union.tolist() == [1, 5, 7]
    assert x.tolist() == [[-1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.75, 0.0, 0.0]]  # repeated index 1 sums
    assert stored.tolist() == [[True, True, False], [False, False, False], [True, False, True]]  # a stored 0 counts


def test_sparse_linear_equals_weighted_sum_on_the_union(shira, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, deltas = shira
    _no_densify(monkeypatch)
    w = [0.5, -1.0, 2.0]
    res = merge_adapters(paths, "linear", weights=w)
    assert res.output == "shira" and res.params["form"] == "sparse"
    for name in _modules(deltas):
        assert_close(res.delta(name), _weighted(deltas, w, name))
        idx, _ = res.sparse[name]
        union = torch.unique(torch.cat([torch.nonzero(d[name].reshape(-1)).reshape(-1) for d in deltas if name in d]))
        assert torch.equal(idx, union)  # the union support, sorted
    kv = int(torch.count_nonzero(deltas[0][V]))
    assert res.sparse[V][0].numel() == 2 * kv  # v_proj: s0 and s1 only, disjoint supports -> K0 + K1
    ta = merge_adapters(paths[:2], "task_arithmetic", weights=[1.0, 3.0], **{"lambda": 0.5})
    assert_close(ta.delta(Q), 0.5 * _weighted(deltas[:2], [1.0, 3.0], Q))
    assert merge_adapters(paths, "linear").weights == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("scope", ["tensor", "model"])
def test_sparse_ties_equals_brute_force_on_stored_entries(shira, scope: str, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, deltas = shira
    _no_densify(monkeypatch)
    w = [1.0, 0.5, 2.0]
    res = merge_adapters(paths, "ties", weights=w, density=0.3, trim_scope=scope, output="sparse", **{"lambda": 1.5})
    ref = _ref_ties(deltas, w, 0.3, scope, lam=1.5)
    for name in _modules(deltas):
        assert_close(res.delta(name), ref[name])
    # density is relative to the K stored entries: a 5 %-dense adapter still loses ~70 % of its entries
    solo = merge_adapters(paths[:1], "ties", density=0.3, trim_scope=scope, drop_zeros=True)
    kept = sum(int(idx.numel()) for idx, _ in solo.sparse.values())
    per_module = [int(torch.count_nonzero(d)) for d in deltas[0].values()]
    assert kept == (sum(int(0.3 * k) for k in per_module) if scope == "tensor" else math.ceil(0.3 * sum(per_module)))


def test_sparse_dare(shira) -> None:
    paths, deltas = shira
    w = [0.5, 1.5, -0.25]
    lin = merge_adapters(paths, "linear", weights=w)
    for name in lin.shapes:
        assert torch.equal(merge_adapters(paths, "dare_linear", weights=w, density=1.0).delta(name), lin.delta(name))
    # drops happen among the stored entries only: kept values are rescaled by 1/density, the rest are 0
    one = merge_adapters(paths[:1], "dare_linear", density=0.5, seed=3, weights=[1.0])
    got, full = one.delta(Q), deltas[0][Q]
    kept = got != 0
    assert_close(got[kept], 2.0 * full[kept])
    assert 0.3 < kept.sum() / torch.count_nonzero(full) < 0.7
    # the drop pattern of adapter 0 does not depend on the others (seeded per task and stored entry)
    pair = merge_adapters(paths[:2], "dare_linear", density=0.5, seed=3, weights=[1.0, 0.0])
    assert torch.equal(pair.delta(Q), got)
    ties_like = merge_adapters(paths, "dare_ties", density=0.4, seed=1, output="sparse")
    assert ties_like.params["form"] == "sparse" and ties_like.delta(Q).shape == (64, 64)


def test_merged_shira_reloads_in_peft(shira, tmp_path: Path) -> None:
    from peft import PeftModel

    from adapterlab.models import tiny_llama
    from adapterlab.tuners.shira import load_shira

    paths, deltas = shira
    w = [1.0, -0.5, 0.75]
    res = merge_adapters(paths, "linear", weights=w)
    res.save(tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADAPTERLAB_SHIRA"
    ref = tiny_llama()
    with torch.no_grad():
        for name in _modules(deltas):
            ref.get_submodule(name).weight += _weighted(deltas, w, name)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        want = ref(x).logits
        for pm in (
            PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "merged")),
            load_shira(tiny_llama(), tmp_path / "merged"),
        ):
            assert_close(pm(x).logits, want)
    # the merged folder is itself a merge input, and drop_zeros leaves TIES-trimmed entries out
    again = merge_adapters([tmp_path / "merged"], "linear", weights=[2.0])
    assert_close(again.delta(Q), 2.0 * _weighted(deltas, w, Q))
    trimmed = merge_adapters(paths, "ties", density=0.2, drop_zeros=True)
    assert all(bool((v != 0).all()) for _, v in trimmed.sparse.values())
    assert trimmed.sparse[Q][0].numel() < res.sparse[Q][0].numel()


def test_full_and_lora_outputs_of_shira(shira) -> None:
    from adapterlab.models import tiny_llama

    paths, deltas = shira
    base = tiny_llama()
    full = merge_adapters(paths, "linear", output="full", base=base)
    want = base.get_submodule(Q).weight + _weighted(deltas, [1 / 3] * 3, Q)
    assert_close(full.model.get_submodule(Q).weight, want)
    assert full.params["form"] == "sparse" and not full.warnings
    # a pruned base: entries the adapters store where W = 0 are reported
    pruned = tiny_llama()
    with torch.no_grad():
        pruned.get_submodule(Q).weight[:, :32] = 0.0
    got = merge_adapters(paths, "linear", output="full", base=pruned)
    assert got.warnings and "base weight is 0" in got.warnings[0]
    # output="lora": dense deltas + truncated SVD (default rank: full, so exact)
    lo = merge_adapters(paths, "linear", output="lora")
    assert lo.output == "lora" and "form" not in lo.params
    torch.testing.assert_close(lo.delta(Q), _weighted(deltas, [1 / 3] * 3, Q), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_shira_full_output_into_pruned_base_reports_and_keeps_zeros(shira, dtype: torch.dtype) -> None:
    from adapterlab.models import tiny_llama
    from adapterlab.pruning import prune_

    paths, deltas = shira
    base = tiny_llama(dtype=dtype)
    prune_(base, "magnitude", 0.5)
    filled = merge_adapters(paths[:2], "linear", output="full", base=base)
    kept = merge_adapters(paths[:2], "linear", output="full", base=base, keep_sparsity=True)
    total = 0
    for name in _modules(deltas[:2]):
        w0 = base.get_submodule(name).weight.detach()
        zero = w0 == 0
        d = _weighted(deltas[:2], [0.5, 0.5], name)  # s0, s1 are disjoint: exact in fp32
        want_filled = (w0.float() + d).to(dtype)  # fp32 add, one cast
        want_kept = (w0.float() + torch.where(zero, 0.0, d)).to(dtype)
        assert torch.equal(filled.model.get_submodule(name).weight, want_filled), name
        assert torch.equal(kept.model.get_submodule(name).weight, want_kept), name
        hit = int((zero & (want_filled != 0)).sum())  # stored entries that land on a pruned zero
        assert hit > 0
        total += hit
        assert next(m for m in filled.modules if m.name == name).base_zeros_hit == hit
        assert next(m for m in kept.modules if m.name == name).base_zeros_hit == 0
    assert filled.params["form"] == kept.params["form"] == "sparse"
    assert filled.base_zeros_hit == total and filled.report()["base_zeros_hit"] == total
    assert kept.base_zeros_hit == 0 and kept.params["keep_sparsity"] is True and not kept.warnings
    assert f"{total} zero weight(s) of the base" in filled.warnings[0]


def test_in_memory_and_registry_shira(shira, tmp_path: Path) -> None:
    from adapterlab.models import tiny_llama
    from adapterlab.registry import AdapterRegistry
    from adapterlab.tuners.shira import load_shira, shira_layers

    paths, deltas = shira
    pm = load_shira(tiny_llama(), paths[0])
    for _, layer in shira_layers(pm, "default"):
        layer.set_scale("default", 0.5)  # the inference knob alpha is folded in
    hub = AdapterRegistry(tmp_path / "hub")
    hub.put(paths[1], "odd")
    res = merge_adapters([pm, "hub:odd"], "linear", weights=[1.0, 1.0], registry=hub)
    assert_close(res.delta(Q), 0.5 * deltas[0][Q] + deltas[1][Q])


# ---- LoRI: exact concatenation -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lori(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[dict[str, torch.Tensor]], list[int]]:
    """LoRI-S (r=4), LoRI-D (r=2, A stored) and LoRI-S (r=3, q_proj only): folders, dense deltas, nnz of B."""
    from peft import get_peft_model

    from adapterlab import LoriConfig
    from adapterlab.models import tiny_llama
    from adapterlab.tuners.lori import LoriLayer

    root = tmp_path_factory.mktemp("lori")
    paths, deltas, nnz = [], [], []
    for i, (r, sparse, store_a, targets) in enumerate(
        [(4, True, False, ["q_proj", "v_proj"]), (2, False, True, ["q_proj", "v_proj"]), (3, True, False, ["q_proj"])]
    ):
        cfg = LoriConfig(
            r=r,
            lora_alpha=2 * r + i,
            target_modules=targets,
            init_weights=False,
            task=f"t{i}",
            store_a=store_a,
            use_rslora=(i == 2),
        )
        pm = get_peft_model(tiny_llama(), cfg)
        if sparse:
            pm.base_model.sparsify_(0.75)
        layers = [m for m in pm.modules() if isinstance(m, LoriLayer)]
        deltas.append({m.key: m.delta_weight("default") for m in layers})
        nnz.append(sum(int(torch.count_nonzero(m.lori_B["default"].dense())) for m in layers))
        pm.save_pretrained(str(root / f"l{i}"))
        paths.append(root / f"l{i}")
    return paths, deltas, nnz


def test_lori_concat_is_exact_and_keeps_b_sparse(lori, tmp_path: Path) -> None:
    from peft import PeftModel

    from adapterlab.models import tiny_llama

    paths, deltas, nnz = lori
    w = [0.5, -1.25, 2.0]
    res = merge_adapters(paths, "task_arithmetic", weights=w, **{"lambda": 0.8})
    assert res.output == "lori" and res.params["rank"] == 4 + 2 + 3
    for name in _modules(deltas):
        torch.testing.assert_close(res.delta(name), 0.8 * _weighted(deltas, w, name), atol=1e-6, rtol=1e-5)
    assert sum(int(torch.count_nonzero(B)) for B, _ in res.factors.values()) == sum(nnz)
    res.save(tmp_path / "cat")
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADAPTERLAB_LORI" and cfg["r"] == 9 and cfg["lora_alpha"] == 9 and cfg["store_a"]
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cat" / "adapter_model.safetensors"), "pt") as fh:
        stored = sum(fh.get_slice(k).get_shape()[0] for k in fh.keys() if k.endswith("lori_B.values"))
    b_total = sum(m.numel() for m in res.b_masks.values())
    assert stored == int(sum(int(m.sum()) for m in res.b_masks.values())) < b_total  # compact B, LoRI-D block dense
    ref = tiny_llama()
    with torch.no_grad():
        for name in _modules(deltas):
            ref.get_submodule(name).weight += 0.8 * _weighted(deltas, w, name)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "cat"))(x).logits
        torch.testing.assert_close(got, ref(x).logits, atol=1e-5, rtol=1e-4)
    # output="lora": the same factors as a plain peft LoRA folder
    plain = merge_adapters(paths, "linear", weights=w, output="lora")
    assert plain.params["form"] == "concat"
    plain.save(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.testing.assert_close(plain.delta(Q), _weighted(deltas, w, Q), atol=1e-6, rtol=1e-5)


def test_lori_ties_goes_through_dense_deltas(lori) -> None:
    paths, deltas, _ = lori
    res = merge_adapters(paths, "ties", density=0.4, output="sparse")
    assert res.output == "sparse" and "form" not in res.params
    same = [delta_source(f"d{i}", d) for i, d in enumerate(deltas)]
    ref = merge_adapters(same, "ties", density=0.4, output="sparse")
    for name in _modules(deltas):
        assert_close(res.delta(name), ref.delta(name))


# ---- mixed inputs and bad input ------------------------------------------------------------------


def test_mixed_shira_and_lora_fall_back_with_a_warning(shira, tmp_path: Path) -> None:
    paths, deltas = shira
    lora = make_lora_dirs(tmp_path, 1, targets=("q_proj",))[0]
    with pytest.warns(UserWarning, match=r"is SHiRA but adapters\[1\].* sparse-form merging needs every adapter"):
        res = merge_adapters([paths[0], lora], "linear", weights=[1.0, 2.0], output="sparse")
    assert res.warnings and "form" not in res.params
    assert_close(res.delta(Q), deltas[0][Q] + 2.0 * resolve_adapter(lora).delta(Q))


def test_sparse_merge_errors(shira, lori, tmp_path: Path) -> None:
    paths, _ = shira
    lori_paths = lori[0]
    other = _shira_model(hidden_size=128)
    other.save_pretrained(str(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"^adapters\[1\] \('big'\): module '.*q_proj' has shape \[128, 128\]"):
        merge_adapters([paths[0], tmp_path / "big"], "linear")
    odd = tmp_path / "odd"
    shutil.copytree(paths[1], odd)
    cfg = json.loads((odd / "adapter_config.json").read_text())
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ValueError, match=r"^adapters\[1\]: peft_type 'IA3' is not supported .* ADAPTERLAB_SHIRA"):
        merge_adapters([paths[0], odd], "ties")
    (odd / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other"}))
    with pytest.raises(ValueError, match=r"^adapters\[1\] \('odd'\)\.base_model_name_or_path is 'org/other'"):
        merge_adapters([_with_base(paths[0], tmp_path, "org/one"), odd], "linear")
    with pytest.raises(ValueError, match=r"^adapters\[0\] \('s0', ADAPTERLAB_SHIRA\): merge method 'rmm' needs"):
        merge_adapters(paths, "rmm", K=2)
    with pytest.raises(ValueError, match=r"factorwise=True needs low-rank factors"):
        merge_adapters(paths, "ties", factorwise=True)
    with pytest.raises(ValueError, match=r"^output='shira' needs every adapter to be a SHiRA adapter; adapters\[0\]"):
        merge_adapters(lori_paths, "linear", output="shira")
    with pytest.raises(ValueError, match=r"^output='lori' needs every adapter to be a LoRI adapter; adapters\[0\]"):
        merge_adapters(paths, "linear", output="lori")
    with pytest.raises(ValueError, match=r"^output='lori' is the exact concatenation of linear"):
        merge_adapters(lori_paths, "ties", output="lori")
    with pytest.raises(ValueError, match=r"^rank/energy apply to output='lora' only, not 'shira'"):
        merge_adapters(paths, "ties", rank=4)


def _with_base(src: Path, tmp_path: Path, base_name: str) -> Path:
    dst = tmp_path / f"based-{base_name.replace('/', '_')}"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_name}))
    return dst
