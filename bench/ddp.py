"""DDP benchmark: ``adapterlab train``'s training loop on 1 process vs 2 processes (torchrun, gloo, CPU).

The embedded SmolLM2-135M-Instruct, a LoRA (r 8, q_proj + v_proj) on the packaged sentiment task, the same
recipe for both arms and the same global batch (``--global-batch`` sequences per optimizer step: one
process takes all of them, each of two processes half). Every arm is one launch of
``python -m torch.distributed.run --standalone --nproc_per_node W bench/ddp.py --worker ...`` with
``OMP_NUM_THREADS=1`` per process; the worker runs :func:`adapterlab.recipe.train_adapter` (what
``adapterlab train`` runs) with one extra callback that times every optimizer step. Steps/s of an arm =
1 / median step time after ``--warmup`` steps; the launches alternate (1, 2, 2, 1, 1, 2, ...) over
``--rounds`` rounds; the speed-up is the median of the per-round ratios. The adapter's task accuracy
after training (rank 0 evaluates, ``--eval-n`` test examples) is measured in the last round of each arm;
the two must agree within noise (the same global batches; only the reduction order of the gradients
differs). The load average is recorded before and after each launch: this machine is shared.

The defaults keep the whole run near 12 minutes on a busy 2-core machine (4 launches, mostly start-up);
on free cores raise ``--global-batch`` and ``--max-length`` to see DDP's scaling.

Run:  python bench/ddp.py                 (writes bench/results/ddp.json and bench/results/ddp.md)
      python bench/ddp.py --steps 3 --warmup 1 --rounds 1 --eval-n 8 --name ddp_quick    (a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _recipe(args: argparse.Namespace, world: int, output: Path, evaluate: bool) -> dict[str, Any]:
    return {
        "base": "default",
        "adapter": {
            "method": "lora",
            "params": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        },
        "data": {"task": "sentiment", "max_examples": args.examples, "max_length": args.max_length},
        "trainer": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.global_batch // world,
            "learning_rate": args.lr,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "ddp_find_unused_parameters": False,  # LoRA on q/v: every adapter parameter gets a gradient
        },
        "eval": {"n": args.eval_n, "zero_shot": False, "batch_size": 16} if evaluate else None,
        "output": str(output),
        "put": None,
    }


# ---------------------------------------------------------------------------------------------
# worker (one launch)


def worker(recipe_path: str, result_path: str) -> None:
    import torch
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    from adapterlab import distributed
    from adapterlab.recipe import check_train_recipe, load_train_recipe, train_adapter

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    class StepTimer(TrainerCallback):
        """Wall time of every optimizer step (forward, backward, all-reduce, AdamW), on this rank."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.t = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.t)

    cfg = load_train_recipe(recipe_path)
    config, callbacks = check_train_recipe(cfg, put=False)
    timer = StepTimer()
    t0 = time.perf_counter()
    result = train_adapter(cfg, put=False, checked=(config, [*callbacks, timer]))
    wall = time.perf_counter() - t0
    times = distributed.all_gather_object(timer.times)
    if distributed.is_rank0():
        losses = [h["loss"] for h in result.log_history if "loss" in h]
        payload = {
            "world": distributed.world_size(),
            "threads": torch.get_num_threads(),
            "step_times": times,
            "losses": losses,
            "accuracy": result.accuracy,
            "train_adapter_s": wall,
        }
        Path(result_path).write_text(json.dumps(payload), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# driver


def _launch(args: argparse.Namespace, world: int, scratch: Path, tag: str, evaluate: bool) -> dict[str, Any]:
    import yaml

    recipe = scratch / f"{tag}.yaml"
    out = scratch / f"{tag}-adapter"
    recipe.write_text(yaml.safe_dump(_recipe(args, world, out, evaluate), sort_keys=False), encoding="utf-8")
    result = scratch / f"{tag}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd += [str(Path(__file__).resolve()), "--worker", str(recipe), str(result)]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=1800)
    launch_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"launch {tag} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    res = json.loads(result.read_text())
    per_step = [max(ts) for ts in zip(*res["step_times"])]  # a step ends when the slowest rank ends it
    timed = per_step[args.warmup :]
    res.update(
        {
            "tag": tag,
            "launch_s": launch_s,
            "step_s_median": statistics.median(timed),
            "steps_per_s": 1.0 / statistics.median(timed),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }
    )
    print(
        f"{tag}: {res['steps_per_s']:.3f} steps/s (median step {res['step_s_median']:.2f} s), "
        f"accuracy {res['accuracy']}, launch {launch_s:.0f} s, load {load_before[0]:.1f}",
        flush=True,
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("RECIPE", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per launch")
    ap.add_argument("--warmup", type=int, default=2, help="steps not timed at the start of each launch")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (1-process, 2-process) launches")
    ap.add_argument("--global-batch", type=int, default=2, help="sequences per optimizer step over all processes")
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--examples", type=int, default=64, help="training examples of the sentiment task")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-n", type=int, default=32, help="test examples scored after training (last round)")
    ap.add_argument("--note", default="", help="a sentence about the run's conditions, kept in the JSON and .md")
    ap.add_argument("--name", default=None, help="result name (default: ddp)")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    if args.global_batch % 2:
        raise SystemExit("--global-batch must be even (two processes take half each)")
    if args.warmup >= args.steps:
        raise SystemExit("--warmup must be smaller than --steps")
    name = args.name or "ddp"
    from bench._common import machine_info, write_json, write_markdown

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        scratch = Path(tmp)
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for world in order:
                last = r == args.rounds - 1
                runs.append(_launch(args, world, scratch, f"r{r}-w{world}", evaluate=last and args.eval_n > 0))
                runs[-1]["round"] = r
    ratios = []
    for r in range(args.rounds):
        one = next(x for x in runs if x["round"] == r and x["world"] == 1)
        two = next(x for x in runs if x["round"] == r and x["world"] == 2)
        ratios.append(two["steps_per_s"] / one["steps_per_s"])
    acc = {
        w: next((x["accuracy"] for x in reversed(runs) if x["world"] == w and x["accuracy"] is not None), None)
        for w in (1, 2)
    }
    losses = {w: next(x["losses"] for x in runs if x["world"] == w) for w in (1, 2)}
    max_loss_diff = max(abs(a - b) for a, b in zip(losses[1], losses[2]))
    sps = {w: statistics.median(x["steps_per_s"] for x in runs if x["world"] == w) for w in (1, 2)}
    load_end = os.getloadavg()
    info = machine_info()
    payload = {
        "benchmark": "ddp",
        "headline": {
            "speedup_2_vs_1_process": statistics.median(ratios),
            "accuracy_1_process": acc[1],
            "accuracy_2_processes": acc[2],
            "max_loadavg_1min": max(x["loadavg_before"][0] for x in runs),
        },
        "command": "python bench/ddp.py " + " ".join(sys.argv[1:]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "name", "note")},
        "model": "embedded SmolLM2-135M-Instruct (fp32), LoRA r 8 on q_proj/v_proj, task sentiment",
        "threads_per_process": 1,
        "backend": "gloo (CPU)",
        "steps_per_s": {"1_process": sps[1], "2_processes": sps[2]},
        "speedup_per_round": ratios,
        "speedup_median": statistics.median(ratios),
        "accuracy_after": {"1_process": acc[1], "2_processes": acc[2]},
        "eval_n": args.eval_n,
        "losses": {"1_process": losses[1], "2_processes": losses[2]},
        "max_abs_loss_diff": max_loss_diff,
        "loadavg": {"start": load_start, "end": load_end},
        "note": args.note,
        "total_s": time.perf_counter() - t_start,
        "runs": runs,
    }
    path = write_json(name, payload)
    busy = max(x["loadavg_before"][0] for x in runs)
    cores = info["cpu_count"] or 0
    note = (
        f"**The machine was busy**: the 1-minute load average reached {busy:.1f} on {cores} cores during the run "
        f"(other jobs share it), so the processes competed for cores and these times are noisy and pessimistic "
        f"for the 2-process arm (it needs two free cores)."
        if busy > 0.75 * cores
        else f"Load average stayed at or below {busy:.1f} on {cores} cores."
    )
    md = [
        "# DDP: adapterlab train on 1 vs 2 processes (CPU, gloo)",
        "",
        f"command: `{payload['command']}`",
        "",
        f"{payload['model']}; global batch {args.global_batch} x {args.max_length} tokens max, {args.steps} steps "
        f"({args.warmup} warm-up), lr {args.lr} constant; 1 thread per process; {args.rounds} interleaved rounds; "
        f"torch {info['versions']['torch']}, transformers {info['versions']['transformers']}, "
        f"peft {info['versions']['peft']}.",
        "",
        f"| processes | steps/s (median over launches) | median step (s) | accuracy after (n={args.eval_n}) |",
        "|---|---|---|---|",
    ]
    for w in (1, 2):
        step = statistics.median(x["step_s_median"] for x in runs if x["world"] == w)
        md.append(f"| {w} | {sps[w]:.3f} | {step:.2f} | {acc[w]} |")
    md += [
        "",
        f"speed-up, median of per-round ratios: **{payload['speedup_median']:.2f}x** "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); largest per-step loss difference between the arms "
        f"{max_loss_diff:.2e}.",
        "",
        f"{note} Load average at start {load_start[0]:.1f}, at end {load_end[0]:.1f}.",
        *([f"\n{args.note}"] if args.note else []),
        "",
    ]
    write_markdown(name, "\n".join(md))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
