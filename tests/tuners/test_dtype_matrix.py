"""The tuner matrix over dtype {fp32, bf16, fp16} x base {dense, 50 % unstructured, 2:4} (issue 14).

Every adapterlab tuner runs through: adapter parameters in fp32 on any base (peft's
``autocast_adapter_dtype``), forward + backward, a training step changes the output,
``disable_adapter`` gives the base, merged ~= unmerged (``TOL[dtype]``), the merged weight is
``(W.float() + delta).to(dtype)`` bit for bit (one rounding rule), merge -> unmerge restores the
base **bit-exactly**, zeros of a pruned base stay zero where the method promises it, and
save -> load in-process and in a fresh interpreter.

For the low-rank tuners (DyLoRA, LoRI, LoRS, SPP) the delta of the rounding check is an oracle
computed here from the stored tensors and the config, not the layer's own ``delta_weight``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import adapterlab.tuners  # noqa: F401  (registers the tuners)
from adapterlab.io import load_tensors
from adapterlab.models import tiny_llama
from adapterlab.tuners import DyLoraConfig, LoriConfig, LorsConfig, ShiraConfig, SnellConfig, SppConfig
from tests.tolerances import TOL
from tests.tuners.matrix import REPO_ROOT, TARGETS, batch, logits, train_step

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASES = ("dense", "unstructured", "2:4")


# --------------------------------------------------------------------------------------------
# oracles: the delta of one layer, from its stored tensors and config (no layer method)


def _scale(layer: Any, adapter: str, r: int) -> float:
    alpha = layer.lora_alpha[adapter]
    return alpha / math.sqrt(r) if layer.use_rslora[adapter] else alpha / r


def _dylora_delta(layer: Any, adapter: str, w0: torch.Tensor) -> torch.Tensor:
    sd = layer.state_dict()
    a = sd[f"dylora_A.{adapter}.weight"].double()  # (r_max, d_in)
    b = sd[f"dylora_B.{adapter}.weight"].double()  # (d_out, r_max)
    k = layer.rank[adapter]
    return (b[:, :k] @ a[:k]) * _scale(layer, adapter, k)  # (d_out, d_in)


def _lori_delta(layer: Any, adapter: str, w0: torch.Tensor) -> torch.Tensor:
    from adapterlab.tuners.lori.functional import layer_seed, random_a

    cfg_seed = layer._oracle_a_seed
    a = random_a(layer.r[adapter], layer.in_features, layer_seed(cfg_seed, layer.key)).double()  # (r, d_in)
    lb = layer.lori_B[adapter]
    if lb.is_sparse:
        b = torch.zeros(lb.shape[0] * lb.shape[1], dtype=torch.float64)
        b[lb.indices.long()] = lb.values.detach().double()
        b = b.view(lb.shape)  # (d_out, r)
    else:
        b = lb.weight.detach().double()
    return (b @ a) * _scale(layer, adapter, layer.r[adapter])


def _lors_delta(layer: Any, adapter: str, w0: torch.Tensor) -> torch.Tensor:
    a, b = layer.lors_A[adapter].detach().double(), layer.lors_B[adapter].detach().double()
    return (b @ a) * _scale(layer, adapter, layer.r[adapter]) * (w0 != 0)


def _spp_delta(layer: Any, adapter: str, w0: torch.Tensor) -> torch.Tensor:
    alpha = layer.spp_alpha[adapter].detach().double()  # (g, d_in)
    beta = layer.spp_beta[adapter].detach().double()  # (d_out, 1)
    rows = alpha.repeat_interleave(w0.shape[0] // alpha.shape[0], dim=0)  # (d_out, d_in)
    return _scale(layer, adapter, layer.r[adapter]) * beta * rows * w0.double()


def _own_delta(layer: Any, adapter: str, w0: torch.Tensor) -> torch.Tensor:
    """SHiRA / SNELL: their per-method oracles live in test_shira.py / test_snell.py; here the
    layer's fp32 delta checks only the rounding of the merge."""
    return layer.delta_weight(adapter).double()


@dataclass
class Tuner:
    make_config: Callable[[str], Any]
    oracle: Callable[[Any, str, torch.Tensor], torch.Tensor]
    identity_at_init: bool = True
    #: a merge keeps every zero of a pruned base (the method's promise)
    keeps_zeros: bool = False


TUNERS: dict[str, Tuner] = {
    "dylora": Tuner(
        lambda base: DyLoraConfig(r=4, eval_rank=3, use_rslora=True, target_modules=TARGETS), _dylora_delta
    ),
    "lori": Tuner(lambda base: LoriConfig(r=4, task="t", target_modules=TARGETS), _lori_delta),
    "lors": Tuner(lambda base: LorsConfig(r=4, target_modules=TARGETS), _lors_delta, keeps_zeros=True),
    "spp": Tuner(
        lambda base: SppConfig(r=4, groups=4, lora_dropout=0.0, target_modules=TARGETS), _spp_delta, keeps_zeros=True
    ),
    "shira": Tuner(
        lambda base: ShiraConfig(
            r=2, mask_type="random", respect_base_sparsity=base != "dense", target_modules=TARGETS
        ),
        _own_delta,
        keeps_zeros=True,
    ),
    "snell": Tuner(
        lambda base: SnellConfig(r=4, sparsity=0.3, target_modules=TARGETS), _own_delta, identity_at_init=False
    ),
}

CASES = [(t, d, b) for t in TUNERS for d in DTYPES for b in BASES]


def _ids(case: tuple[str, str, str]) -> str:
    return "-".join(case)


def make_base(dtype: torch.dtype, base: str) -> torch.nn.Module:
    """``tiny_llama`` in ``dtype``, magnitude-pruned in its own dtype for the sparse bases."""
    model = tiny_llama(dtype=dtype)
    if base != "dense":
        from adapterlab.pruning import prune_

        prune_(model, "magnitude", 0.5, pattern=None if base == "unstructured" else base)
    return model


def _layers(pm: Any) -> list[tuple[str, Any]]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [(n, m) for n, m in pm.named_modules() if isinstance(m, BaseTunerLayer)]


_TRAINED: dict[tuple[str, str, str], dict[str, Any]] = {}


def trained(case: tuple[str, str, str]) -> dict[str, Any]:
    """One training step per case, cached: model, base/init/after logits, base weights, grads seen."""
    if case not in _TRAINED:
        from peft import get_peft_model

        name, dname, bname = case
        dtype = DTYPES[dname]
        x = batch()
        base_logits = logits(make_base(dtype, bname), x)
        torch.manual_seed(0)
        pm = get_peft_model(make_base(dtype, bname), TUNERS[name].make_config(bname))
        for _, layer in _layers(pm):
            if name == "lori":
                layer._oracle_a_seed = pm.peft_config["default"].a_seed
        init = logits(pm, x)
        trainable = [p for p in pm.parameters() if p.requires_grad]
        pm.train()
        pm(x, labels=x).loss.backward()
        grads = [
            p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool(p.grad.abs().sum() > 0)
            for p in trainable
        ]
        pm.zero_grad(set_to_none=True)
        train_step(pm, x, lr=1e-2)
        weights = {n: p.detach().clone() for n, p in pm.get_base_model().named_parameters() if "base_layer" in n}
        _TRAINED[case] = dict(
            pm=pm,
            base=base_logits,
            init=init,
            after=logits(pm, x),
            weights=weights,
            trainable_dtypes={p.dtype for p in trainable},
            grads=grads,
        )
    return _TRAINED[case]


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_adapters_fp32_and_backward(case):
    t = trained(case)
    assert t["trainable_dtypes"] == {torch.float32}  # peft's autocast_adapter_dtype convention
    assert t["grads"] and any(t["grads"])  # every layer's adapter is reached by the loss
    for n, p in t["pm"].get_base_model().named_parameters():
        if "base_layer" in n:
            assert p.dtype == DTYPES[case[1]]  # the base keeps its dtype


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_identity_then_step_changes_output(case):
    t = trained(case)
    if TUNERS[case[0]].identity_at_init:
        torch.testing.assert_close(t["init"], t["base"], rtol=0, atol=0)
    assert (t["after"].float() - t["base"].float()).abs().max() > 1e-3


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_disable_adapter_gives_base(case):
    t = trained(case)
    pm, x = t["pm"], batch()
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm, x), t["base"], rtol=0, atol=0)
    torch.testing.assert_close(logits(pm, x), t["after"], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_merge_rounds_once_and_unmerge_is_bit_exact(case):
    name, dname, _ = case
    dtype = DTYPES[dname]
    t = trained(case)
    pm, x = t["pm"], batch()
    layers = _layers(pm)
    w0 = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers}
    expected = {}
    for n, layer in layers:
        delta = layer.delta_weight("default")  # fp32, what merge adds
        assert delta.dtype == torch.float32
        oracle = TUNERS[name].oracle(layer, "default", w0[n])  # fp64, from the stored tensors
        torch.testing.assert_close(delta.double(), oracle, rtol=1e-5, atol=1e-6 * float(oracle.abs().max()) + 1e-12)
        expected[n] = (w0[n].float() + delta).to(dtype)  # the one rounding rule
    pm.base_model.merge_adapter()
    try:
        merged_logits = logits(pm, x)
        for n, layer in layers:
            w = layer.get_base_layer().weight
            assert torch.equal(w, expected[n]), (
                f"{n}: {(w != expected[n]).sum().item()} entries differ from one rounding"
            )
            if TUNERS[name].keeps_zeros:
                assert bool((w[w0[n] == 0] == 0).all()), f"{n}: a zero of the pruned base was filled"
        torch.testing.assert_close(merged_logits.float(), t["after"].float(), **TOL[dtype])
    finally:
        pm.base_model.unmerge_adapter()
    for n, p in pm.get_base_model().named_parameters():
        if n in t["weights"]:
            assert torch.equal(p, t["weights"][n]), f"{n} changed after merge -> unmerge"
    torch.testing.assert_close(logits(pm, x), t["after"], rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_disable_on_merged_model_restores_base_bits(case):
    """``disable_adapter()`` on a merged model unmerges: repeated cycles must not drift the base."""
    t = trained(case)
    pm = t["pm"]
    for _ in range(3):
        pm.base_model.merge_adapter()
        with pm.disable_adapter():
            logits(pm, batch())
        for n, p in pm.get_base_model().named_parameters():
            if n in t["weights"]:
                assert torch.equal(p, t["weights"][n]), n


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_save_load_roundtrip(case, tmp_path):
    from peft import PeftModel

    t = trained(case)
    t["pm"].save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(make_base(DTYPES[case[1]], case[2]), str(tmp_path / "a"))
    for _, layer in _layers(loaded):
        own = [p for n, p in layer.named_parameters() if not n.startswith("base_layer")]
        assert own and {p.dtype for p in own} == {torch.float32}
    torch.testing.assert_close(logits(loaded, batch()), t["after"], rtol=0, atol=0)


def test_fresh_process_load_every_tuner_in_half(tmp_path):
    """One fresh interpreter (after ``import adapterlab``) loads each tuner's bf16 and fp16 adapters
    (2:4 base) and reproduces the trained logits bit for bit."""
    jobs = []
    for name in TUNERS:
        for dname in ("bf16", "fp16"):
            case = (name, dname, "2:4")
            out = tmp_path / "-".join(case)
            trained(case)["pm"].save_pretrained(out)
            jobs.append((str(out), dname))
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        import adapterlab
        from peft import PeftModel
        from adapterlab.io import save_tensors
        from adapterlab.models import tiny_llama
        from adapterlab.pruning import prune_
        x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        dt = {{"bf16": torch.bfloat16, "fp16": torch.float16}}
        out = {{}}
        for path, dname in {jobs!r}:
            base = tiny_llama(dtype=dt[dname])
            prune_(base, "magnitude", 0.5, pattern="2:4")
            model = PeftModel.from_pretrained(base, path).eval()
            with torch.no_grad():
                out[path.rsplit("/", 1)[-1]] = model(x).logits
        save_tensors({str(tmp_path / "fresh.safetensors")!r}, out)
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_tensors(tmp_path / "fresh.safetensors")
    for path, _dname in jobs:
        key = path.rsplit("/", 1)[-1]
        case = tuple(key.split("-", 2))
        torch.testing.assert_close(got[key], trained(case)["after"], rtol=0, atol=0)
