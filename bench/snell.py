"""Benchmark: SNELL peak training memory vs dense sparse tuning, and sentiment accuracy vs LoRA.

Embedded SmolLM2-135M-Instruct, packaged data; nothing downloads.

Memory (each arm in its own fresh process, arms interleaved, ``--mem-repeats`` rounds, median):
peak resident memory during ``--mem-steps`` AdamW steps minus the resident memory just before
training (model loaded and wrapped), with glibc's mmap threshold pinned so freed tensors go back to
the OS. The Linux peak counter is reset through ``/proc/self/clear_refs`` right before training.

* ``snell``: SNELL r=``--rank`` (sparsity ``--sparsity``) on every linear of every block
  (q, k, v, o, gate, up, down), kernel recomputed in backward (the default).
* ``dense_sparse`` (the anchor): the same layers tuned with a full trainable ``d_out x d_in`` delta
  whose gradient is masked by a fixed top-k mask (keep ``1 - sparsity`` of the entries, by |W0|):
  ``y = base(x) + x (M * Delta)^T``; AdamW keeps moments for the whole delta.
* ``lora``: peft LoRA at the same rank and layers (context).
Time per step is recorded too (same interleaving; ratios only, the machine is shared).

Accuracy (``sentiment``, the same short budget as ``bench/lowrank.py``: ``--steps`` AdamW steps of
``--batch-size``, q/v targets, first ``--eval-n`` test examples): ``lora_r8`` (alpha 16, lr
``--lr``) vs ``snell_r8`` (same trainable parameter count: ``r (d_in + d_out)`` per layer, lr
``--snell-lr``) and ``snella_r8`` (softmax kernel + ``SnellCallback`` importance schedule from dense
to ``--sparsity``, driven step by step).

Run: ``python bench/snell.py`` (writes ``bench/results/snell.json`` and ``.md``);
``python bench/snell.py --quick`` is a smoke run on a tiny random Llama (writes ``snell_quick.*``);
``--parts memory`` / ``--parts accuracy`` run one part and keep the other from the existing JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import RESULTS, machine_info, write_json, write_markdown  # noqa: E402

logger = logging.getLogger("bench.snell")
ALL_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ACC_TARGETS = ["q_proj", "v_proj"]
MEM_ARMS = ("snell", "dense_sparse", "lora")
ACC_ARMS = ("zero_shot", "lora_r8", "snell_r8", "snella_r8")


# ---------------------------------------------------------------------------------------------
# the anchor: dense sparse tuning (full delta, gradient-masked by a fixed top-k mask)


class MaskedDeltaLinear(torch.nn.Module):
    """``y = base(x) + x (M * Delta)^T``: a full trainable delta, only the top-k (by |W0|) entries move."""

    def __init__(self, base: torch.nn.Linear, sparsity: float) -> None:
        super().__init__()
        from adapterlab.tuners.snell import keep_count, keep_mask

        self.base = base
        w = base.weight.detach()
        self.delta = torch.nn.Parameter(torch.zeros_like(w))  # (d_out, d_in)
        self.register_buffer("mask", keep_mask(w.abs(), keep_count(w.numel(), sparsity)))  # (d_out, d_in) bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ (self.delta * self.mask).T  # (..., d_in) -> (..., d_out)


def wrap_dense_sparse(model: torch.nn.Module, targets: list[str], sparsity: float) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                setattr(module, child_name, MaskedDeltaLinear(child, sparsity))
    return model


def base_model(args: argparse.Namespace, vocab_size: int = 1024) -> torch.nn.Module:
    """The embedded model, or (``--quick``) a tiny random Llama with the same layer names."""
    from adapterlab.models import load_model, tiny_llama

    if args.quick:
        return tiny_llama(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    return load_model(None)


# ---------------------------------------------------------------------------------------------
# memory: one arm per fresh process


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_arm(args: argparse.Namespace) -> dict[str, Any]:
    """Run one memory arm in this process and return its numbers."""
    from peft import LoraConfig, get_peft_model

    from adapterlab.tuners import SnellConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = base_model(args)
    targets = ALL_LINEARS
    if args.memory_arm == "snell":
        model = get_peft_model(model, SnellConfig(r=args.rank, sparsity=args.sparsity, target_modules=targets))
    elif args.memory_arm == "lora":
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=16, target_modules=targets))
    else:
        model = wrap_dense_sparse(model, targets, args.sparsity)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(10, 1000, (args.mem_batch, args.mem_seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # page in the (memory-mapped) weights before the baseline
        model(input_ids=ids)
    model.train()
    gc.collect()
    baseline = _status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        reset = True
    except OSError:
        reset = False
    step_s = []
    for _ in range(args.mem_steps):
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
    peak = _status("VmHWM")
    n_train = sum(p.numel() for p in params)
    mask_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith(".mask"))
    return {
        "arm": args.memory_arm,
        "peak_minus_baseline_bytes": peak - baseline,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_reset": reset,
        "trainable": n_train,
        # params + grads + 2 AdamW moments (fp32), plus the fixed mask of the anchor
        "optimizer_state_bytes": 4 * 4 * n_train + mask_bytes,
        "mask_bytes": mask_bytes,
        "step_s": step_s,
        "targets": targets,
    }


def run_memory(args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536", HF_HUB_OFFLINE="1")
    raw: dict[str, list[dict[str, Any]]] = {a: [] for a in MEM_ARMS}
    for rep in range(args.mem_repeats):
        for arm in MEM_ARMS:  # interleaved, so load changes hit every arm alike
            cmd = [
                sys.executable,
                __file__,
                "--memory-arm",
                arm,
                "--rank",
                str(args.rank),
                "--sparsity",
                str(args.sparsity),
                "--mem-steps",
                str(args.mem_steps),
                "--mem-batch",
                str(args.mem_batch),
                "--mem-seq",
                str(args.mem_seq),
                "--threads",
                str(args.threads),
            ] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"memory arm {arm} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            raw[arm].append(out)
            logger.info(
                "memory rep %d %s: peak +%.1f MiB, steps %s",
                rep,
                arm,
                out["peak_minus_baseline_bytes"] / 2**20,
                [round(s, 2) for s in out["step_s"]],
            )
    return summarize_memory(raw)


def summarize_memory(raw: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over the fresh-process runs of each arm, and the SNELL / anchor ratios."""
    med = {}
    for arm, runs in raw.items():
        med[arm] = {
            "peak_minus_baseline_MiB": statistics.median(r["peak_minus_baseline_bytes"] for r in runs) / 2**20,
            "optimizer_state_MiB": runs[0]["optimizer_state_bytes"] / 2**20,
            # the adapter's own tensors (trainable params + the anchor's mask) exist before the baseline
            "adapter_tensors_MiB": (4 * runs[0]["trainable"] + runs[0].get("mask_bytes", 0)) / 2**20,
            "trainable": runs[0]["trainable"],
            # the first step allocates the AdamW moments; later steps are the steady state
            "step_s": statistics.median(s for r in runs for s in r["step_s"][1:] or r["step_s"]),
        }
    for x in med.values():
        x["training_memory_MiB"] = x["peak_minus_baseline_MiB"] + x["adapter_tensors_MiB"]
    ratio = med["snell"]["training_memory_MiB"] / med["dense_sparse"]["training_memory_MiB"]
    return {
        "raw": raw,
        "median": med,
        "snell_over_dense_peak": ratio,
        "snell_over_dense_step_time": med["snell"]["step_s"] / med["dense_sparse"]["step_s"],
    }


# ---------------------------------------------------------------------------------------------
# accuracy


def run_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from adapterlab.callbacks import SnellCallback
    from adapterlab.data import get_task, tokenize_for_training
    from adapterlab.models import load_tokenizer
    from adapterlab.tuners import SnellConfig
    from bench.lowrank import FastScorer, batches, train, trainable

    torch.set_num_threads(args.threads)
    task = get_task("sentiment")
    tok = load_tokenizer(None)

    def load_model(_: Any) -> torch.nn.Module:
        return base_model(args, vocab_size=len(tok))

    model = load_model(None)
    data = tokenize_for_training(tok, task, n=args.train_n, seed=0, max_length=args.max_length, return_tensors="pt")
    train_batches = batches(data, args.batch_size, args.steps, seed=0)
    scorer = FastScorer(tok, task, args.eval_n)
    arms = [a for a in args.acc_arms.split(",") if a]
    bad = [a for a in arms if a not in ACC_ARMS]
    if bad:
        raise SystemExit(f"unknown accuracy arm(s) {bad}; choose from: {', '.join(ACC_ARMS)}")
    out: dict[str, Any] = {}
    if "zero_shot" in arms:
        out["zero_shot"] = {"accuracy": scorer.accuracy(model)}
    del model
    if "lora_r8" in arms:
        torch.manual_seed(args.seed)
        pm = get_peft_model(
            load_model(None), LoraConfig(r=8, lora_alpha=16, target_modules=ACC_TARGETS, lora_dropout=0.0)
        )
        secs = train(pm, train_batches, args.lr)
        out["lora_r8"] = {"accuracy": scorer.accuracy(pm), "trainable": trainable(pm), "train_s": secs, "lr": args.lr}
        logger.info("lora_r8: %s", out["lora_r8"])
        del pm
    if "snell_r8" in arms:
        torch.manual_seed(args.seed)
        pm = get_peft_model(load_model(None), SnellConfig(r=8, sparsity=args.sparsity, target_modules=ACC_TARGETS))
        secs = train(pm, train_batches, args.snell_lr)
        out["snell_r8"] = {
            "accuracy": scorer.accuracy(pm),
            "trainable": trainable(pm),
            "train_s": secs,
            "lr": args.snell_lr,
            "sparsity": args.sparsity,
        }
        logger.info("snell_r8: %s", out["snell_r8"])
        del pm
    if "snella_r8" in arms:
        torch.manual_seed(args.seed)
        pm = get_peft_model(
            load_model(None), SnellConfig(r=8, kernel="snella", sparsity=args.sparsity, target_modules=ACC_TARGETS)
        )
        cb = SnellCallback(args.sparsity, init_sparsity=0.0, total_steps=args.steps)
        fake_args, fake_state = SimpleNamespace(output_dir=None), SimpleNamespace(max_steps=args.steps)
        cb.on_train_begin(fake_args, fake_state, None, model=pm)

        params = [p for p in pm.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.snell_lr, weight_decay=0.0)
        pm.train()
        t0 = time.perf_counter()
        for step, batch in enumerate(train_batches):
            cb.allocate_(pm.base_model, step)  # SnellCallback.on_step_begin
            pm(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            cb.on_optimizer_step(fake_args, fake_state, None, model=pm)  # importance, before zero_grad
            opt.zero_grad(set_to_none=True)
        cb.allocate_(pm.base_model, args.steps)
        secs = time.perf_counter() - t0
        out["snella_r8"] = {
            "accuracy": scorer.accuracy(pm),
            "trainable": trainable(pm),
            "train_s": secs,
            "lr": args.snell_lr,
            "final_sparsity": cb.overall_sparsity(pm.base_model),
            "layer_sparsity": cb.layer_sparsity,
        }
        logger.info("snella_r8: accuracy %.3f", out["snella_r8"]["accuracy"])
        del pm
    return out


# ---------------------------------------------------------------------------------------------
# report


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = ["# SNELL benchmark", "", f"command: `{res['command']}`", ""]
    mem = res.get("memory")
    if mem:
        m = mem["median"]
        lines += [
            f"## Peak training memory (rank {s['rank']}, sparsity {s['sparsity']}, batch {s['mem_batch']} x {s['mem_seq']} tokens, "
            f"{s['mem_steps']} AdamW steps, median of {s['mem_repeats']} fresh processes)",
            "",
            "| arm | trainable | params+grads+AdamW (+mask) MiB | peak RSS over baseline MiB | + adapter tensors = training memory MiB | step s (median) |",
            "|---|---|---|---|---|---|",
        ]
        for arm, label in (
            ("snell", "SNELL"),
            ("dense_sparse", "dense sparse tuning (anchor)"),
            ("lora", "LoRA (context)"),
        ):
            x = m[arm]
            total = x.get("training_memory_MiB", x["peak_minus_baseline_MiB"])
            lines.append(
                f"| {label} | {x['trainable']:,} | {x['optimizer_state_MiB']:.1f} | {x['peak_minus_baseline_MiB']:.1f} | "
                f"{total:.1f} | {x['step_s']:.2f} |"
            )
        lines += [
            "",
            "Baseline: resident memory after the model is loaded, wrapped and paged in (the adapter's own "
            "parameters and the anchor's mask already exist then, so they are added back).",
            "",
            f"SNELL / dense sparse training memory: **{mem['snell_over_dense_peak']:.3f}**; step time ratio "
            f"{mem['snell_over_dense_step_time']:.2f} (shared machine: indicative only)",
            "",
        ]
    acc = res.get("accuracy")
    if acc:
        lines += [
            f"## Sentiment accuracy ({s['steps']} steps x {s['batch_size']}, q/v, n={s['eval_n']})",
            "",
            "| arm | accuracy | trainable | lr |",
            "|---|---|---|---|",
        ]
        for arm in ACC_ARMS:
            if arm in acc:
                x = acc[arm]
                lines.append(f"| {arm} | {x['accuracy']:.3f} | {x.get('trainable', 0):,} | {x.get('lr', '-')} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run on tiny budgets")
    p.add_argument("--parts", default="memory,accuracy")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--mem-seq", type=int, default=64)
    p.add_argument("--mem-repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-n", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--snell-lr", type=float, default=1e-2)
    p.add_argument("--acc-arms", default=",".join(ACC_ARMS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-arm", choices=MEM_ARMS, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--rewrite-md", action="store_true", help="recompute the summary and markdown from the existing JSON"
    )
    args = p.parse_args(argv)
    if args.memory_arm:
        print(json.dumps(memory_arm(args)))  # noqa: T201  (child-process protocol)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.mem_steps, args.mem_batch, args.mem_seq, args.mem_repeats = 2, 2, 16, 1
        args.steps, args.train_n, args.eval_n, args.batch_size = 3, 16, 16, 4
    name = "snell_quick" if args.quick else "snell"
    if args.rewrite_md:
        res = json.loads((RESULTS / f"{name}.json").read_text())
        if "memory" in res:
            res["memory"] = summarize_memory(res["memory"]["raw"])
        (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
        write_markdown(name, markdown(res))
        return
    res: dict[str, Any] = {
        "benchmark": "snell",
        "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "memory_arm"}
        | {
            "model": "SmolLM2-135M-Instruct (embedded)",
            "task": "sentiment",
            "acc_targets": ACC_TARGETS,
            "mem_targets": ALL_LINEARS,
        }
        | ({"model": "tiny random Llama (smoke run; accuracy meaningless)"} if args.quick else {}),
        "machine_info": machine_info(),
    }
    t0 = time.perf_counter()
    parts = args.parts.split(",")
    previous = RESULTS / f"{name}.json"
    if previous.is_file() and set(parts) != {"memory", "accuracy"}:
        old = json.loads(previous.read_text())
        for part in ("memory", "accuracy"):
            if part not in parts and part in old:
                res[part] = old[part]
                res.setdefault("kept_from_previous_run", []).append({part: old.get("command")})
    if "memory" in parts:
        res["memory"] = run_memory(args)
        write_json(name, res)
    if "accuracy" in parts:
        res["accuracy"] = run_accuracy(args)
    res["total_s"] = time.perf_counter() - t0
    write_json(name, res)
    write_markdown(name, markdown(res))
    logger.info("wrote bench/results/%s.json and .md", name)


if __name__ == "__main__":
    main()
