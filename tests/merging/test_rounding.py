"""One rounding rule (issue 14) in merge_adapters: every merge that writes base weights computes in fp32
and casts once — the merged weight equals ``(W.float() + delta).to(W.dtype)`` bit for bit — in fp32,
bf16 and fp16; ``keep_sparsity`` and ``base_zeros_hit`` on pruned bases; every method on half-dtype
adapters and half bases.

The adapters have grid-valued factors (``tests.merging._helpers.make_dyadic_lora_dirs``) so that the
brute-force fp64 oracle of the merged delta is exact in fp32: bit-exact comparisons are well defined.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from adapterlab.merging import merge_adapters
from adapterlab.models import tiny_llama
from tests.merging._helpers import make_dyadic_lora_dirs, oracle_deltas
from tests.tolerances import TOL

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(scope="module")
def dyadic(tmp_path_factory: pytest.TempPathFactory) -> dict[torch.dtype, list[Path]]:
    """Per dtype two grid-valued LoRA folders saved from a ``dtype`` base (tensors stored in ``dtype``)."""
    root = tmp_path_factory.mktemp("dyadic")
    return {dt: make_dyadic_lora_dirs(root, 2, dtype=dt) for dt in DTYPES}


def _pruned(dtype: torch.dtype) -> torch.nn.Module:
    from adapterlab.pruning import prune_

    base = tiny_llama(dtype=dtype)
    prune_(base, "magnitude", 0.5)
    return base


# ---- item 1: output="full" rounds once ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_full_output_rounds_once(dyadic, dtype: torch.dtype) -> None:
    paths = dyadic[dtype]
    base = tiny_llama(dtype=dtype)
    res = merge_adapters(paths, "linear", output="full", base=base)
    applied = tiny_llama(dtype=dtype)
    merge_adapters(paths, "linear", output="sparse").apply_(applied)  # MergeResult.apply_ follows the same rule
    deltas = oracle_deltas(paths, [0.5, 0.5])  # linear: w = 1/T
    twice = 0
    for name, d in deltas.items():
        assert torch.equal(d.float().double(), d)  # the oracle is exact in fp32 (grid values)
        w0 = base.get_submodule(name).weight.detach()  # the base itself is not modified (a copy is merged)
        want = (w0.float() + d.float()).to(dtype)  # one rounding
        got = res.model.get_submodule(name).weight.detach()
        assert got.dtype == dtype
        assert torch.equal(got, want), name
        assert torch.equal(applied.get_submodule(name).weight, want), name
        twice += int((w0 + d.to(dtype) != want).sum())  # the old rule: round the delta, then the sum
    if dtype != torch.float32:
        assert twice > 0  # rounding twice differs on these inputs, so this test can tell the two rules apart
    assert res.base_zeros_hit == 0  # a dense base has no zeros to fill


# ---- item 3: keep_sparsity and base_zeros_hit -----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_full_output_into_pruned_base_reports_and_keeps_zeros(dyadic, dtype: torch.dtype) -> None:
    paths = dyadic[dtype]
    base = _pruned(dtype)
    filled = merge_adapters(paths, "task_arithmetic", output="full", base=base)
    kept = merge_adapters(paths, "task_arithmetic", output="full", base=base, keep_sparsity=True)
    deltas = oracle_deltas(paths, [1.0, 1.0])
    total = 0
    for name, d in deltas.items():
        w0 = base.get_submodule(name).weight.detach()
        zero = w0 == 0
        want_filled = (w0.float() + d.float()).to(dtype)
        want_kept = (w0.float() + torch.where(zero, 0.0, d).float()).to(dtype)  # W + Δ ⊙ 1[W != 0], one cast
        assert torch.equal(filled.model.get_submodule(name).weight, want_filled), name
        assert torch.equal(kept.model.get_submodule(name).weight, want_kept), name
        hit = int((zero & (want_filled != 0)).sum())  # zeros of the base the plain merge made non-zero
        assert hit > 0
        total += hit
        assert next(m for m in filled.modules if m.name == name).base_zeros_hit == hit
        assert next(m for m in kept.modules if m.name == name).base_zeros_hit == 0
    assert filled.base_zeros_hit == total and kept.base_zeros_hit == 0
    assert filled.report()["base_zeros_hit"] == total and kept.report()["base_zeros_hit"] == 0
    assert kept.params["keep_sparsity"] is True and filled.params["keep_sparsity"] is False
    assert any("base weight is 0" in w for w in filled.warnings) and not kept.warnings


def test_keep_sparsity_bad_input(dyadic) -> None:
    paths = dyadic[torch.float32]
    with pytest.raises(ValueError, match=r"^keep_sparsity must be True or False, got 'yes'$"):
        merge_adapters(paths, "linear", output="full", base=_pruned(torch.float32), keep_sparsity="yes")
    with pytest.raises(ValueError, match=r"^keep_sparsity applies to output='full' only.*not 'lora'"):
        merge_adapters(paths, "linear", keep_sparsity=True)
    with pytest.raises(ValueError, match=r"^keep_sparsity=True but the base is dense"):
        merge_adapters(paths, "linear", output="full", base=tiny_llama(), keep_sparsity=True)


# ---- item 7: every method on half adapters and half bases ----------------------------------------

METHODS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.3},
    "dare_linear": {"density": 0.5, "seed": 3},
    "dare_ties": {"density": 0.5, "seed": 3},
    "rmm": {"K": 1},
}


def _upcast_copy(paths: list[Path], root: Path) -> list[Path]:
    """The same adapters with every tensor upcast to fp32 (the reference inputs)."""
    from safetensors.torch import load_file, save_file

    out = []
    for p in paths:
        q = root / f"fp32_{p.name}"
        shutil.copytree(p, q)
        tensors = load_file(str(p / "adapter_model.safetensors"))
        save_file(
            {k: v.float() for k, v in tensors.items()}, str(q / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        out.append(q)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_half_adapters_and_bases(dyadic, dtype: torch.dtype, method: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    paths = dyadic[dtype]
    ref_paths = _upcast_copy(paths, tmp_path)
    params = METHODS[method]
    got = merge_adapters(paths, method, **params)
    ref = merge_adapters(ref_paths, method, **params)
    assert got.dtype == dtype and ref.dtype == torch.float32  # the output dtype follows the inputs
    for name in ref.shapes:
        assert torch.equal(got.delta(name), ref.delta(name)), name  # fp32 compute: identical to the upcast inputs
    # the saved checkpoint keeps the inputs' dtype, and equals the fp32 result up to that dtype's rounding
    got.save(tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {dtype}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            torch.testing.assert_close(b.float() @ a.float(), ref.delta(name), **TOL[dtype])
    if method == "rmm":  # the bundle's basis is stored in the inputs' dtype too (coefficients stay fp32)
        bundle = load_file(str(tmp_path / "out" / "rmm_bundle.safetensors"))
        assert {v.dtype for k, v in bundle.items() if k.startswith("basis.")} == {dtype}
        return
    # a half base: the merged weights follow the one rounding rule against the fp32 reference delta
    dense = merge_adapters(ref_paths, method, output="sparse", **params)
    base = tiny_llama(dtype=dtype)
    full = merge_adapters(paths, method, output="full", base=base, **params)
    for name in ref.shapes:
        w0 = base.get_submodule(name).weight.detach()
        want = (w0.float() + dense.delta(name)).to(dtype)
        assert torch.equal(full.model.get_submodule(name).weight, want), name
