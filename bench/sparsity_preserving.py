"""Benchmark: peak training memory, step time and sparsity after merge of sparsity-preserving
adapters on a pruned base: LoRS (exact and low-rank straight-through gradients) vs SPP vs a naive
masked LoRA vs plain peft LoRA.

Embedded SmolLM2-135M-Instruct, pruned 50 % unstructured (magnitude by default; ``--prune wanda``
uses 32 calibration windows), the same rank / targets (q,k,v,o,gate,up,down) / batch for every arm,
AdamW, dropout 0, fp32, windows of the packaged ``wiki`` train split.

Arms:
* ``lora``: plain peft ``LoraConfig`` (rsLoRA scale alpha/sqrt(r), the same scale as LoRS) — the
  memory anchor; it does not preserve sparsity.
* ``naive_masked``: LoRA whose delta is materialised and masked, ``y = base(x) + x (s (B A) ⊙ M)^T``
  with a stored bool mask (SQFT SparsePEFT's form); autograd keeps the dense ``BA ⊙ M`` of every layer.
* ``lors``: ``LorsConfig(lors_grad="exact")`` (adapterlab's default); ``lors_ste``: ``lors_grad="low_rank_ste"``.
* ``spp``: ``SppConfig`` (groups 16, scale 1; materialized forward at these sizes).

Memory: each arm runs in its own subprocess with ``MALLOC_MMAP_THRESHOLD_=65536`` (large buffers
are mmap'ed and returned to the OS when freed, so RSS tracks live tensors). After the model is
loaded, pruned and wrapped, the process resets its peak RSS (``/proc/self/clear_refs`` = 5) and
records its RSS as the baseline; the figure is ``VmHWM`` after warm-up + measured steps minus that
baseline: activations, gradients, optimizer state and transients of training (model weights
excluded). Where ``clear_refs`` is not writable it falls back to ``ru_maxrss`` minus the baseline
(noted in the JSON).

Step time: all arms live in one process (default glibc malloc) on shared (identical) base weights and are timed
interleaved (round-robin, order rotated each round, one warm-up round), median of ``--repeats``;
reported as a ratio to plain LoRA (the machine may be busy; ratios are what to read).

Sparsity: after the memory arm's steps the adapter is merged (``merge_and_unload``; the naive arm
adds its masked delta) and every adapted weight's zeros are compared with the pruned base's
(``(W_merged == 0) ⊇ (W_base == 0)``) along with the global sparsity of the decoder linears.

Goal (issue 5): LoRS peak training memory <= 1.15 x plain LoRA while preserving sparsity exactly.

Run: ``python bench/sparsity_preserving.py`` (``--quick`` for a smoke run on tiny sizes); writes
``bench/results/sparsity_preserving.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import write_json, write_markdown  # noqa: E402

logger = logging.getLogger("bench.sparsity_preserving")
NAME = "sparsity_preserving"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ["lora", "naive_masked", "lors", "lors_ste", "spp"]
SPARSITY_PRESERVING = {"naive_masked", "lors", "lors_ste", "spp"}


# ---------------------------------------------------------------------------------------------
# process memory


def _status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(m.group(1)) if m else None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak() -> str:
    """Reset the peak RSS to the current RSS; returns the method used for the peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM after /proc/self/clear_refs reset"
    except OSError:
        return "ru_maxrss (peak could not be reset; includes model loading)"


def peak_kb(method: str) -> int:
    if method.startswith("VmHWM"):
        return int(_status_kb("VmHWM") or 0)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


# ---------------------------------------------------------------------------------------------
# model / arms


class NaiveMaskedLoRA(nn.Module):
    """The naive sparsity-preserving LoRA: ``base(x) + x (s (B A) ⊙ M)^T``, mask stored, delta materialised."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / math.sqrt(r)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))  # (r, d_in)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))  # (d_out, r)
        self.register_buffer("mask", base.weight.detach() != 0, persistent=False)  # (d_out, d_in) bool

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale * self.mask  # (d_out, d_in), kept by autograd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.delta().T


def wrap_naive(model: nn.Module, r: int, alpha: float) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in TARGETS and isinstance(child, nn.Linear):
                setattr(module, child_name, NaiveMaskedLoRA(child, r, alpha))
    return model


def make_arm(arm: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from adapterlab.tuners.lors import LorsConfig
    from adapterlab.tuners.spp import SppConfig

    r, alpha = args.rank, float(args.alpha)
    if arm == "lora":
        return get_peft_model(
            model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0, target_modules=TARGETS)
        )
    if arm == "naive_masked":
        return wrap_naive(model, r, alpha)
    if arm in ("lors", "lors_ste"):
        grad = "exact" if arm == "lors" else "low_rank_ste"
        return get_peft_model(
            model, LorsConfig(r=r, lora_alpha=alpha, use_rslora=True, lors_grad=grad, target_modules=TARGETS)
        )
    if arm == "spp":
        return get_peft_model(
            model, SppConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, groups=16, target_modules=TARGETS)
        )
    raise ValueError(f"unknown arm {arm!r}; choose one of: {', '.join(ARMS)}")


def pruned_base(args: argparse.Namespace) -> tuple[nn.Module, Any]:
    from adapterlab import prune_
    from adapterlab.data import calibration_ids
    from adapterlab.models import load_default_model

    model, tok = load_default_model()
    calib = calibration_ids(tok, n_samples=32, seqlen=128) if args.prune == "wanda" else None
    prune_(model, args.prune, args.sparsity, calibration=calib)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def train_batches(tok: Any, args: argparse.Namespace, n: int) -> list[torch.Tensor]:
    from adapterlab.data import calibration_ids

    ids = calibration_ids(tok, n_samples=n * args.batch_size, seqlen=args.seqlen, seed=1)  # (n*bs, seqlen)
    return list(ids.split(args.batch_size))


def step(model: nn.Module, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_sparsity(arm: str, model: nn.Module, base_masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Merge the adapter and compare every decoder linear's zeros with the pruned base's."""
    from adapterlab.pruning import get_masks

    if arm == "naive_masked":
        with torch.no_grad():
            for module in list(model.modules()):
                if isinstance(module, NaiveMaskedLoRA):
                    w = module.base.weight
                    w.copy_((w.float() + module.delta().float()).to(w.dtype))
        for _name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, NaiveMaskedLoRA):
                    setattr(module, child_name, child.base)
        merged = model
    else:
        merged = model.merge_and_unload()
    after = get_masks(merged)
    violations = sum(int((after[k] & ~m).sum()) for k, m in base_masks.items())  # zeros of the base now nonzero
    zeros_base = sum(int((~m).sum()) for m in base_masks.values())
    zeros_after = sum(int((~m).sum()) for m in after.values())
    numel = sum(m.numel() for m in base_masks.values())
    return {
        "zeros_preserved": violations == 0,
        "filled_zeros": violations,
        "sparsity_base": zeros_base / numel,
        "sparsity_merged": zeros_after / numel,
    }


# ---------------------------------------------------------------------------------------------
# workers


def worker_memory(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.pruning import get_masks

    torch.manual_seed(0)
    model, tok = pruned_base(args)
    base_masks = get_masks(model)
    model = make_arm(args.arm, model, args)
    data = train_batches(tok, args, args.warmup + args.repeats)
    opt = optimizer(model, args.lr)
    model.train()
    _trim()
    method = reset_peak()
    baseline = int(_status_kb("VmRSS") or 0)
    times, losses = [], []
    for ids in data:
        t0 = time.perf_counter()
        losses.append(step(model, opt, ids))
        times.append(time.perf_counter() - t0)
    peak = peak_kb(method)
    model.eval()
    return {
        "arm": args.arm,
        "peak_train_mib": (peak - baseline) / 1024,
        "baseline_rss_mib": baseline / 1024,
        "peak_rss_mib": peak / 1024,
        "memory_method": method,
        "step_s_isolated": times[args.warmup :],
        "losses": losses,
        "trainable": trainable(model),
        "sparsity": merged_sparsity(args.arm, model, base_masks),
    }


def worker_timing(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    base, tok = pruned_base(args)
    arms = args.arms.split(",")
    models, opts = {}, {}
    for arm in arms:
        memo = {id(p): p for p in base.parameters()}  # share the (frozen) base weights
        models[arm] = make_arm(arm, copy.deepcopy(base, memo), args)
        models[arm].train()
        opts[arm] = optimizer(models[arm], args.lr)
    rounds = args.warmup + args.repeats
    data = train_batches(tok, args, rounds)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for rnd in range(rounds):
        order = arms[rnd % len(arms) :] + arms[: rnd % len(arms)]
        for arm in order:
            t0 = time.perf_counter()
            step(models[arm], opts[arm], data[rnd])
            if rnd >= args.warmup:
                times[arm].append(time.perf_counter() - t0)
    return {"step_s": times, "order": "round-robin, rotated each round"}


def run_worker(kind: str, args: argparse.Namespace, **extra: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-out", str(out)]
        for key in ("rank", "alpha", "batch_size", "seqlen", "repeats", "warmup", "sparsity", "prune", "lr", "threads"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        for key, value in extra.items():
            cmd += [f"--{key}", value]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
        if kind == "memory":  # return freed buffers to the OS so RSS tracks live tensors (slows allocation)
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {kind} {extra} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        res["worker_wall_s"] = time.perf_counter() - t0
        return res


# ---------------------------------------------------------------------------------------------
# driver


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        "# Sparsity-preserving adapters: peak training memory, step time, sparsity after merge",
        "",
        f"Embedded SmolLM2-135M, {s['prune']} {s['sparsity']:.0%} unstructured, r={s['rank']}, alpha={s['alpha']}, "
        f"targets q,k,v,o,gate,up,down, batch {s['batch_size']} x {s['seqlen']} tokens, AdamW, fp32, "
        f"{s['repeats']} measured steps after {s['warmup']} warm-up. Command: `{res['command']}`",
        "",
        "| arm | trainable | peak train memory (MiB) | vs LoRA | step time (s, median) | vs LoRA | zeros preserved after merge | sparsity base -> merged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in res["arms_run"]:
        a = res["arms"][arm]
        sp = a["sparsity"]
        lines.append(
            f"| {arm} | {a['trainable']:,} | {a['peak_train_mib']:.1f} | {a['memory_ratio_vs_lora']:.3f} | "
            f"{a['step_s_median']:.3f} | {a['time_ratio_vs_lora']:.2f} | {'yes' if sp['zeros_preserved'] else 'NO (' + str(sp['filled_zeros']) + ' filled)'} | "
            f"{sp['sparsity_base']:.4f} -> {sp['sparsity_merged']:.4f} |"
        )
    g = res["goal"]
    lines += [
        "",
        f"Goal: LoRS (exact) peak memory <= 1.15 x plain LoRA and zeros preserved exactly: "
        f"ratio {g['lors_memory_ratio']:.3f}, zeros preserved {g['lors_zeros_preserved']} -> **{'met' if g['met'] else 'not met'}**.",
        "",
        f"Memory: {res['memory_method']} minus the RSS after load + prune + wrap, one subprocess per arm, "
        "MALLOC_MMAP_THRESHOLD_=65536. Step time: arms interleaved in one process on shared base weights "
        "(ratios are what to read on a busy machine).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: tiny batch, one measured step, r=4")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--prune", default="magnitude", choices=["magnitude", "wanda"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (1: least sensitive to a busy machine)"
    )
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--worker", choices=["memory", "timing"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--arm", help=argparse.SUPPRESS)
    p.add_argument("--name", default=NAME, help="result file stem under bench/results")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    if args.worker:
        res = worker_memory(args) if args.worker == "memory" else worker_timing(args)
        Path(args.worker_out).write_text(json.dumps(res))
        return
    if args.quick:
        args.rank, args.batch_size, args.seqlen, args.repeats, args.warmup = 4, 1, 32, 1, 1
    arms = args.arms.split(",")
    bad = [a for a in arms if a not in ARMS]
    if bad or "lora" not in arms:
        p.error(f"--arms: unknown {bad} or missing 'lora' (the anchor); choose from {', '.join(ARMS)}")
    start = time.perf_counter()
    res: dict[str, Any] = {"arms": {}, "arms_run": arms}
    for arm in arms:
        logger.info("memory: %s", arm)
        res["arms"][arm] = run_worker("memory", args, arm=arm)
        logger.info("  peak %.1f MiB, sparsity %s", res["arms"][arm]["peak_train_mib"], res["arms"][arm]["sparsity"])
    logger.info("timing: %s (interleaved)", ",".join(arms))
    timing = run_worker("timing", args, arms=",".join(arms))
    lora_mem = res["arms"]["lora"]["peak_train_mib"]
    lora_time = statistics.median(timing["step_s"]["lora"])
    for arm in arms:
        a = res["arms"][arm]
        a["step_s"] = timing["step_s"][arm]
        a["step_s_median"] = statistics.median(a["step_s"])
        a["time_ratio_vs_lora"] = a["step_s_median"] / lora_time
        a["memory_ratio_vs_lora"] = a["peak_train_mib"] / lora_mem
    lors = res["arms"].get("lors")
    res["goal"] = {
        "lors_memory_ratio": lors["memory_ratio_vs_lora"] if lors else None,
        "lors_zeros_preserved": lors["sparsity"]["zeros_preserved"] if lors else None,
        "met": bool(lors and lors["memory_ratio_vs_lora"] <= 1.15 and lors["sparsity"]["zeros_preserved"]),
        "target": "LoRS peak training memory <= 1.15 x plain LoRA, zeros preserved exactly after merge",
    }
    res["memory_method"] = res["arms"]["lora"]["memory_method"]
    res["command"] = "python bench/sparsity_preserving.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out", "arm")} | {
        "targets": TARGETS,
        "model": "SmolLM2-135M-Instruct (embedded)",
        "data": "wiki train windows",
        "memory_note": "peak RSS during training minus RSS after load+prune+wrap, separate subprocess per arm",
        "timing_note": "interleaved in one process on shared base weights; median of repeats",
    }
    res["wall_s"] = time.perf_counter() - start
    write_json(args.name, res)
    write_markdown(args.name, markdown(res))
    logger.info("%s", markdown(res))


if __name__ == "__main__":
    main()
