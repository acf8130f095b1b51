"""Benchmark: SHiRA rapid switching, peak training memory and sentiment accuracy vs peft LoRA.

Parts (``--parts``, each runs in its own subprocess; results in ``--out-dir``, default bench/results):

* ``layers`` -> ``sparse_layers[_<device>].json/.md``: LLM-sized synthetic ``nn.Linear`` layers
  (default 4 layers alternating 4096x11008 / 11008x4096, fp32; ``--dtype bf16`` -> ``sparse_layers[_<device>]_bf16``,
  every method and the peft LoRA anchor on bf16 weights). Equal budget: LoRA r=32 vs SHiRA
  with K = 32 (m + n) per layer (~1.1 % density). Timed, interleaved in one process (order rotated
  every round, ``--warmup`` rounds dropped, median of ``--repeats``; speed-ups are the median of the
  per-round ratios to peft LoRA, with the ratio of medians also in the JSON):
  - ``switch``: adapters already in memory, switch the fused adapter a <-> b:
    adapterlab ``switch_adapter`` (restore a's cached entries + scatter b) vs peft LoRA
    ``unmerge_adapter()`` + ``merge_adapter([b])`` vs peft SHiRA (same peft calls).
  - ``load_fuse``: an adapter directory on disk -> ``load_adapter`` -> fused (untimed clean-up:
    switch back, ``delete_adapter``) for the same three.
  This part imports only torch, peft and safetensors (not adapterlab's package ``__init__``, so no
  bitsandbytes / pydantic / trl) and runs on a GPU with ``--device cuda``.
* ``model`` -> ``sparse_model.json/.md``: the same two timings on the embedded SmolLM2-135M
  (targets q,k,v,o,gate,up,down; LoRA r=8 vs SHiRA r=8-equivalent).
* ``memory`` -> ``sparse_memory.json/.md``: peak training memory (RSS high-water mark above the
  post-setup baseline, ``/proc/self/clear_refs``; model weights excluded) of LoRA vs SHiRA at equal
  trainable parameters on the embedded model, each arm in a fresh subprocess
  (``MALLOC_MMAP_THRESHOLD_=65536`` so freed large buffers leave RSS).
* ``accuracy`` -> ``sparse_accuracy.json/.md``: sentiment accuracy after the same short budget
  (bench/lowrank.py's data, loop and scorer: ``--steps`` AdamW steps, batch 8, q/v targets) of LoRA
  r=8 and SHiRA r=8-equivalent with each mask (random, struct, wm, grad, snip; grad/snip calibrated
  on ``--calib-batches`` training batches).

Goals (issue 4): switching >= 8x faster than the LoRA fuse on LLM-sized layers; load-from-disk + fuse
faster than peft's LoRA load + fuse; SHiRA peak training memory below LoRA's (paper: up to 16 %).

Run: ``python bench/sparse.py`` (all parts) or ``--parts layers --device cuda``; ``--quick`` for a
smoke run on tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
PARTS = ("layers", "model", "memory", "accuracy")
MODEL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ACC_TARGETS = ["q_proj", "v_proj"]
MASKS = ("random", "struct", "wm", "grad", "snip")
logger = logging.getLogger("bench.sparse")


# ---------------------------------------------------------------------------------------------
# shared helpers


def _light_shira() -> types.ModuleType:
    """Import adapterlab's SHiRA without running ``adapterlab/__init__`` (no bitsandbytes/pydantic/trl).

    When the full package is already imported it is used as is.
    """
    if "adapterlab" not in sys.modules:
        for name, path in (("adapterlab", ROOT / "adapterlab"), ("adapterlab.tuners", ROOT / "adapterlab" / "tuners")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]  # a bare package: its __init__ is not executed
            sys.modules[name] = mod
    os.environ.setdefault("ADAPTERLAB_SKIP_PEFT_VERSION_CHECK", "1" if _peft_version() < (0, 21, 2) else "0")
    import adapterlab.tuners.shira as shira

    return shira


def _peft_version() -> tuple[int, ...]:
    import peft

    return tuple(int(p) for p in peft.__version__.split(".")[:3] if p.isdigit())


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "peft", "safetensors", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except Exception:  # noqa: BLE001 - missing optional package
            out[pkg] = None
    return out


def _machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _write(out_dir: Path, name: str, payload: dict[str, Any], md: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**payload, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(md)
    logger.info("wrote %s/%s.json and .md", out_dir, name)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int,
    device: str,
    after: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, list[float]]:
    """Time each ``fns[name]()`` round-robin (order rotated each round); ``after[name]()`` runs untimed."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(warmup + repeats):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for n in order:
            _sync(device)
            t0 = time.perf_counter()
            fns[n]()
            _sync(device)
            dt = time.perf_counter() - t0
            if rnd >= warmup:
                times[n].append(dt)
            if after and n in after:
                after[n]()
    return times


# ---------------------------------------------------------------------------------------------
# switching: adapterlab SHiRA vs peft LoRA vs peft SHiRA


class _Stack(nn.Module):
    """Synthetic LLM-sized linear layers (no transformer around them)."""

    def __init__(self, shapes: list[tuple[int, int]], dtype: torch.dtype, device: str, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator(device=device).manual_seed(seed)
        self.proj = nn.ModuleDict()
        for i, (m, n) in enumerate(shapes):
            lin = nn.Linear(n, m, bias=False, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(m, n, generator=g, device=device, dtype=torch.float32).mul_(0.02))
            self.proj[f"l{i}"] = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not used by the timings
        return x


def _randomize_(pm: nn.Module, needle: str, seed: int) -> None:
    """Non-zero adapter tensors (a fused zero adapter would be trivially cheap for nobody, but be fair)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if needle in name and p.is_floating_point():
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))


def switching_bench(
    make_base: Callable[[], nn.Module],
    targets: list[str],
    r: int,
    *,
    device: str,
    repeats: int,
    warmup: int,
    load_repeats: int,
    shira: types.ModuleType,
) -> dict[str, Any]:
    """Switch and load+fuse timings of adapterlab SHiRA, peft LoRA and peft SHiRA on one base."""
    from peft import LoraConfig, get_peft_model
    from peft import ShiraConfig as PeftShiraConfig

    res: dict[str, Any] = {"r": r, "targets": targets}
    models: dict[str, Any] = {}
    t0 = time.perf_counter()
    ours = get_peft_model(
        make_base(),
        shira.ShiraConfig(r=r, mask_type="random", target_modules=targets, random_seed=1),
        adapter_name="one",
    )
    ours.add_adapter("two", shira.ShiraConfig(r=r, mask_type="random", target_modules=targets, random_seed=2))
    models["adapterlab_shira"] = ours
    lora = get_peft_model(
        make_base(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0), adapter_name="one"
    )
    lora.add_adapter("two", LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
    models["peft_lora"] = lora
    pshira = get_peft_model(
        make_base(), PeftShiraConfig(r=r, target_modules=targets, random_seed=1), adapter_name="one"
    )
    pshira.add_adapter("two", PeftShiraConfig(r=r, target_modules=targets, random_seed=2))
    models["peft_shira"] = pshira
    for key, pm in models.items():
        _randomize_(
            pm,
            {"adapterlab_shira": "adapterlab_shira_values", "peft_lora": "lora_", "peft_shira": "shira_weight"}[key],
            0,
        )
        pm.eval()
    res["setup_s"] = time.perf_counter() - t0
    suffixes = {
        "adapterlab_shira": (".adapterlab_shira_values.one",),
        "peft_lora": (".lora_A.one.weight", ".lora_B.one.weight"),
        "peft_shira": (".shira_weight.one",),
    }
    res["trainable_per_adapter"] = {
        k: sum(p.numel() for n, p in pm.named_parameters() if n.endswith(suffixes[k])) for k, pm in models.items()
    }
    state = {k: "one" for k in models}

    def peft_switch(pm: Any, key: str) -> Callable[[], None]:
        def fn() -> None:
            new = "two" if state[key] == "one" else "one"
            pm.base_model.unmerge_adapter()
            pm.base_model.merge_adapter([new])
            state[key] = new

        return fn

    def ours_switch() -> None:
        new = "two" if state["adapterlab_shira"] == "one" else "one"
        shira.switch_adapter(ours, new)
        state["adapterlab_shira"] = new

    shira.switch_adapter(ours, "one")
    lora.base_model.merge_adapter(["one"])
    pshira.base_model.merge_adapter(["one"])
    sw = interleaved(
        {
            "adapterlab_shira": ours_switch,
            "peft_lora": peft_switch(lora, "peft_lora"),
            "peft_shira": peft_switch(pshira, "peft_shira"),
        },
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
    res["switch_s"] = sw

    # load from disk + fuse (an adapter "new" saved beforehand), then untimed clean-up
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for key, pm in models.items():
            pm.save_pretrained(os.path.join(tmp, key), selected_adapters=["two"])
            dirs[key] = os.path.join(tmp, key, "two")
        for key in models:  # back to "one" fused
            if state[key] != "one":
                (ours_switch if key == "adapterlab_shira" else peft_switch(models[key], key))()

        def load_ours() -> None:
            ours.load_adapter(dirs["adapterlab_shira"], "new")
            shira.switch_adapter(ours, "new")

        def clean_ours() -> None:
            shira.switch_adapter(ours, "one")
            ours.delete_adapter("new")

        def load_peft(pm: Any, key: str) -> Callable[[], None]:
            def fn() -> None:
                pm.load_adapter(dirs[key], "new")
                pm.base_model.unmerge_adapter()
                pm.base_model.merge_adapter(["new"])

            return fn

        def clean_peft(pm: Any) -> Callable[[], None]:
            def fn() -> None:
                pm.base_model.unmerge_adapter()
                pm.set_adapter("one")
                pm.base_model.merge_adapter(["one"])
                pm.delete_adapter("new")

            return fn

        lf = interleaved(
            {
                "adapterlab_shira": load_ours,
                "peft_lora": load_peft(lora, "peft_lora"),
                "peft_shira": load_peft(pshira, "peft_shira"),
            },
            after={"adapterlab_shira": clean_ours, "peft_lora": clean_peft(lora), "peft_shira": clean_peft(pshira)},
            repeats=load_repeats,
            warmup=1,
            device=device,
        )
        res["load_fuse_s"] = lf
        res["adapter_file_bytes"] = {
            k: os.path.getsize(os.path.join(d, "adapter_model.safetensors")) for k, d in dirs.items()
        }
    med = {kind: {k: statistics.median(v) for k, v in res[kind].items()} for kind in ("switch_s", "load_fuse_s")}
    res["median_s"] = med
    res["speedup_vs_peft_lora"] = {kind: {k: med[kind]["peft_lora"] / v for k, v in med[kind].items()} for kind in med}
    # paired: round i of every method ran back to back, so the ratio of round i cancels slow drifts of the machine
    res["speedup_vs_peft_lora_paired"] = {
        kind: {k: statistics.median(a / b for a, b in zip(res[kind]["peft_lora"], v)) for k, v in res[kind].items()}
        for kind in med
    }
    return res


def _switch_md(title: str, res: dict[str, Any], goal: bool) -> str:
    med = res["median_s"]
    sp = res.get("speedup_vs_peft_lora_paired", res["speedup_vs_peft_lora"])
    lines = [
        f"## {title}",
        "",
        f"budget: LoRA r={res['r']} vs SHiRA K = {res['r']} (m + n) per layer; targets {res['targets']}; "
        "x vs LoRA = median of the per-round ratios (paired rounds)",
        "",
        "| method | switch (ms) | x vs LoRA | load+fuse (ms) | x vs LoRA | adapter file (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("adapterlab_shira", "peft_lora", "peft_shira"):
        lines.append(
            f"| {k} | {med['switch_s'][k] * 1e3:.2f} | {sp['switch_s'][k]:.1f} | {med['load_fuse_s'][k] * 1e3:.1f} | "
            f"{sp['load_fuse_s'][k]:.2f} | {res['adapter_file_bytes'][k] / 2**20:.2f} |"
        )
    if goal:
        lines += [
            "",
            f"goal switch >= 8x vs LoRA: {'met' if sp['switch_s']['adapterlab_shira'] >= 8 else 'NOT met'} "
            f"({sp['switch_s']['adapterlab_shira']:.1f}x); load+fuse faster than LoRA: "
            f"{'met' if sp['load_fuse_s']['adapterlab_shira'] > 1 else 'NOT met'} ({sp['load_fuse_s']['adapterlab_shira']:.2f}x)",
        ]
    return "\n".join(lines) + "\n"


def part_layers(args: argparse.Namespace) -> None:
    shira = _light_shira()
    if args.quick:
        shapes = [(256, 688), (688, 256)]
        r = 4
    else:
        shapes = [(4096, 11008), (11008, 4096)] * (args.layers // 2) + [(4096, 11008)] * (args.layers % 2)
        r = 32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    targets = [f"l{i}" for i in range(len(shapes))]
    machine = _machine(args.device)  # load average before the run
    res = switching_bench(
        lambda: _Stack(shapes, dtype, args.device),
        targets,
        r,
        device=args.device,
        repeats=args.repeats,
        warmup=args.warmup,
        load_repeats=args.load_repeats,
        shira=shira,
    )
    res["shapes"] = shapes
    name = (
        "sparse_layers"
        + ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}")
        + ("" if args.dtype == "fp32" else f"_{args.dtype}")
        + (f"_{args.tag}" if args.tag else "")
        + ("_quick" if args.quick else "")
    )
    payload = {
        "benchmark": "sparse.layers",
        "command": "python " + " ".join(sys.argv),
        "settings": vars(args) | {"dtype": args.dtype},
        "machine": machine | {"loadavg_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None},
        "versions": _versions(),
        "results": res,
    }
    md = (
        f"# SHiRA switching on LLM-sized layers ({args.device}, {args.dtype})\n\n"
        f"{len(shapes)} layers {sorted(set(shapes))}; median of {args.repeats} interleaved rounds\n\n"
        + _switch_md("switching", res, True)
    )
    _write(Path(args.out_dir), name, payload, md)


def part_model(args: argparse.Namespace) -> None:
    import adapterlab  # noqa: F401  (full package: the embedded model)
    import adapterlab.tuners.shira as shira
    from adapterlab.models import load_model, tiny_llama

    make = (lambda: tiny_llama(hidden_size=128, intermediate_size=256)) if args.quick else (lambda: load_model(None))
    res = switching_bench(
        make,
        MODEL_TARGETS,
        8,
        device="cpu",
        repeats=args.repeats,
        warmup=args.warmup,
        load_repeats=args.load_repeats,
        shira=shira,
    )
    payload = {
        "benchmark": "sparse.model",
        "command": "python " + " ".join(sys.argv),
        "settings": vars(args),
        "model": "tiny_llama" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        "machine": _machine("cpu"),
        "versions": _versions(),
        "results": res,
    }
    md = "# SHiRA switching on the embedded model (CPU)\n\n" + _switch_md(payload["model"], res, False)
    _write(Path(args.out_dir), "sparse_model" + ("_quick" if args.quick else ""), payload, md)


# ---------------------------------------------------------------------------------------------
# peak training memory


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_arm(args: argparse.Namespace) -> dict[str, Any]:
    """One arm in this (fresh) process: build, reset the RSS peak, train, read the peak."""
    from peft import LoraConfig, get_peft_model

    import adapterlab  # noqa: F401
    from adapterlab.data import get_task, tokenize_for_training
    from adapterlab.models import load_default_model, tiny_llama, tiny_tokenizer

    torch.manual_seed(0)
    if args.quick:
        model, tok = tiny_llama(hidden_size=128, intermediate_size=256), tiny_tokenizer()
    else:
        model, tok = load_default_model()
    targets = MODEL_TARGETS
    if args.arm == "lora":
        cfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets, lora_dropout=0.0)
    else:
        cfg = adapterlab.ShiraConfig(r=args.rank, mask_type="random", target_modules=targets)
    pm = get_peft_model(model, cfg)
    data = tokenize_for_training(
        tok,
        get_task("sentiment"),
        n=args.batch_size * args.mem_steps,
        seed=0,
        max_length=args.max_length,
        return_tensors="pt",
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    pm.train()

    def step(i: int) -> None:
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        loss = pm(**{k: v[sl] for k, v in data.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up (optimizer state allocated)
    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after clear_refs=5"
    except OSError:
        method = "ru_maxrss (clear_refs not writable)"
    base_kib = _vm_kib("VmRSS")
    t0 = time.perf_counter()
    for i in range(1, args.mem_steps):
        step(i)
    secs = time.perf_counter() - t0
    if method.startswith("VmHWM"):
        peak_kib = _vm_kib("VmHWM")
    else:
        import resource

        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    return {
        "arm": args.arm,
        "peak_above_baseline_mib": (peak_kib - base_kib) / 1024,
        "baseline_rss_mib": base_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "trainable": trainable,
        "steps_measured": args.mem_steps - 1,
        "s_per_step": secs / max(1, args.mem_steps - 1),
        "method": method,
    }


def part_memory(args: argparse.Namespace) -> None:
    arms: dict[str, list[dict[str, Any]]] = {"lora": [], "shira": []}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    for rep in range(args.mem_repeats):
        for arm in ("lora", "shira") if rep % 2 == 0 else ("shira", "lora"):
            cmd = [
                sys.executable,
                __file__,
                "--memory-arm",
                arm,
                "--rank",
                str(args.rank),
                "--mem-steps",
                str(args.mem_steps),
                "--batch-size",
                str(args.batch_size),
                "--max-length",
                str(args.max_length),
                "--threads",
                str(args.threads),
            ]
            if args.quick:
                cmd.append("--quick")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise SystemExit(f"memory arm {arm} failed:\n{out.stderr[-3000:]}")
            arms[arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
            logger.info("memory %s: %.1f MiB", arm, arms[arm][-1]["peak_above_baseline_mib"])
    med = {a: statistics.median(x["peak_above_baseline_mib"] for x in v) for a, v in arms.items()}
    res = {
        "raw": arms,
        "median_peak_above_baseline_mib": med,
        "shira_vs_lora": med["shira"] / med["lora"],
        "trainable": {a: v[0]["trainable"] for a, v in arms.items()},
    }
    payload = {
        "benchmark": "sparse.memory",
        "command": "python " + " ".join(sys.argv),
        "settings": vars(args),
        "model": "tiny_llama" if args.quick else "SmolLM2-135M-Instruct (embedded)",
        "targets": MODEL_TARGETS,
        "machine": _machine("cpu"),
        "versions": _versions(),
        "results": res,
    }
    md = [
        "# Peak training memory: SHiRA vs LoRA at equal trainable parameters",
        "",
        f"{payload['model']}, targets {MODEL_TARGETS}, LoRA r={args.rank} vs SHiRA r={args.rank}-equivalent, batch "
        f"{args.batch_size} x <= {args.max_length} tokens, AdamW, fp32, {args.mem_steps - 1} measured steps, "
        f"median of {args.mem_repeats} fresh processes; peak RSS above the post-setup baseline (weights excluded)",
        "",
        "| arm | trainable | peak above baseline (MiB) | s/step |",
        "|---|---|---|---|",
    ]
    for a in ("lora", "shira"):
        md.append(
            f"| {a} | {res['trainable'][a]:,} | {med[a]:.1f} | {statistics.median(x['s_per_step'] for x in arms[a]):.2f} |"
        )
    md += ["", f"SHiRA / LoRA peak: {res['shira_vs_lora']:.3f}"]
    _write(Path(args.out_dir), "sparse_memory" + ("_quick" if args.quick else ""), payload, "\n".join(md) + "\n")


# ---------------------------------------------------------------------------------------------
# accuracy


def part_accuracy(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT))
    from peft import LoraConfig, get_peft_model

    import adapterlab  # noqa: F401
    from adapterlab.data import get_task, tokenize_for_training
    from adapterlab.models import load_default_model, load_model
    from bench.lowrank import FastScorer, batches, train, trainable

    torch.set_num_threads(args.threads)
    task = get_task("sentiment")
    model, tok = load_default_model()
    n_train, eval_n, steps = (16, 8, 1) if args.quick else (args.train_n, args.eval_n, args.steps)
    data = tokenize_for_training(tok, task, n=n_train, seed=0, max_length=args.max_length, return_tensors="pt")
    train_batches = batches(data, args.batch_size, steps, seed=0)
    calib = batches(data, args.batch_size, min(args.calib_batches, len(train_batches)), seed=1)
    scorer = FastScorer(tok, task, eval_n)
    out_name = "sparse_accuracy" + ("_quick" if args.quick else "")
    res: dict[str, Any] = {"arms": {}}
    arms = ["lora", "shira_wm", "shira_snip"] if args.quick else [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ("zero_shot", "lora", *(f"shira_{m}" for m in MASKS))]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}")

    def save() -> None:
        payload = {
            "benchmark": "sparse.accuracy",
            "command": "python " + " ".join(sys.argv),
            "settings": vars(args) | {"targets": ACC_TARGETS},
            "model": "SmolLM2-135M-Instruct (embedded)",
            "task": "sentiment",
            "machine": _machine("cpu"),
            "versions": _versions(),
            "results": res,
        }
        md = [
            "# Sentiment accuracy: SHiRA mask strategies vs LoRA at equal trainable parameters",
            "",
            f"SmolLM2-135M, targets {ACC_TARGETS}, {steps} AdamW steps x batch {args.batch_size}, LoRA r={args.rank} "
            f"(alpha {2 * args.rank}, lr {args.lr}) vs SHiRA r={args.rank}-equivalent (lr {args.shira_lr}); "
            f"eval n={eval_n}; grad/snip calibrated on {len(calib)} training batches",
            "",
            "| arm | accuracy | trainable | train s |",
            "|---|---|---|---|",
        ]
        for k, v in res["arms"].items():
            md.append(f"| {k} | {v['accuracy']:.3f} | {v.get('trainable', 0):,} | {v.get('train_s', 0):.0f} |")
        _write(Path(args.out_dir), out_name, payload, "\n".join(md) + "\n")

    if "zero_shot" in arms:
        res["arms"]["zero_shot"] = {"accuracy": scorer.accuracy(model)}
        save()
    del model
    for arm in arms:
        if arm == "zero_shot":
            continue
        torch.manual_seed(args.seed)
        if arm == "lora":
            pm = get_peft_model(
                load_model(None),
                LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=ACC_TARGETS, lora_dropout=0.0),
            )
            lr = args.lr
        else:
            mask = arm.removeprefix("shira_")
            pm = get_peft_model(
                load_model(None),
                adapterlab.ShiraConfig(r=args.rank, mask_type=mask, target_modules=ACC_TARGETS, random_seed=args.seed),
            )
            if mask in ("grad", "snip"):
                pm.calibrate_masks_(calib)
            lr = args.shira_lr
        secs = train(pm, train_batches, lr)
        res["arms"][arm] = {
            "accuracy": scorer.accuracy(pm),
            "trainable": trainable(pm),
            "train_s": secs,
            "lr": lr,
            "steps": steps,
        }
        logger.info("%s: %s", arm, res["arms"][arm])
        save()
        del pm


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of: " + ", ".join(PARTS))
    p.add_argument("--quick", action="store_true", help="smoke run on tiny sizes")
    p.add_argument("--device", default="cpu", help="layers part only: cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="layers part: weight dtype")
    p.add_argument("--layers", type=int, default=4, help="layers part: number of LLM-sized layers")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--load-repeats", type=int, default=3)
    p.add_argument("--rank", type=int, default=8, help="memory/accuracy: LoRA r and SHiRA r-equivalent")
    p.add_argument("--mem-steps", type=int, default=6)
    p.add_argument("--mem-repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--train-n", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="LoRA learning rate (bench/lowrank.py's)")
    p.add_argument(
        "--shira-lr",
        type=float,
        default=3e-3,
        help="SHiRA learning rate (3x LoRA's, the ratio of peft's method comparison)",
    )
    p.add_argument("--arms", default="zero_shot,lora," + ",".join(f"shira_{m}" for m in MASKS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--tag", default="", help="layers part: suffix of the result name (e.g. the machine)")
    p.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.memory_arm:
        args.arm = args.memory_arm
        print(json.dumps(memory_arm(args)))
        return
    parts = [x for x in args.parts.split(",") if x]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise SystemExit(f"unknown part(s) {bad}; choose from: {', '.join(PARTS)}")
    if len(parts) > 1:  # each part in its own process (the layers part must not import the full package)
        for part in parts:
            rest = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--parts")]
            rest = [a for i, a in enumerate(rest) if not (i > 0 and rest[i - 1] == "--parts")]
            subprocess.run(
                [sys.executable, __file__, "--parts", part, *rest],
                check=True,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )
        return
    {"layers": part_layers, "model": part_model, "memory": part_memory, "accuracy": part_accuracy}[parts[0]](args)


if __name__ == "__main__":
    main()
