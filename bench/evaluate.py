"""Evaluation speed: batched task scoring and perplexity vs a naive per-example loop (issue 16).

Embedded SmolLM2-135M, CPU, ``--threads`` torch threads (default 1), same examples and model for
every arm:

* ``accuracy``: :func:`adapterlab.evaluate.task_accuracy` on the first ``--n`` (200) examples of
  the ``--task`` (sentiment) test split, ``--batch-size`` 16 (the recipe's default) against
  ``naive``: one unpadded forward per (example, label word), fp32 log-softmax, a loop over the
  label's tokens (the ``Semantics:`` of ``choice_logprobs``);
* ``perplexity``: :func:`adapterlab.evaluate.perplexity` in the demo's setting (wiki test split,
  ``--eval-windows`` 10 windows of ``--seqlen`` 512, ``--ppl-batch-size`` 4 = the default) against
  ``naive``: one forward per window, fp32 log-softmax, a loop over the predicted tokens;
* ``previous`` (optional, ``--previous REV``): ``adapterlab/evaluate.py`` as it was at git
  revision REV, loaded from ``git show`` (the code before issue 16; skipped when git is missing).

A warm-up call of every arm on a small subset, then ``--repeats`` interleaved rounds (the order
rotates each round); times are medians, speed-ups are the median of the per-round ratios
``naive / arm`` (paired rounds cancel slow drifts of a shared machine), the ratio of medians is in
the JSON too. Results are checked: same predictions and accuracy, largest score difference,
perplexity relative difference.

Run:  python bench/evaluate.py                 (writes bench/results/evaluate.json and .md)
      python bench/evaluate.py --threads 2 --name evaluate_2t
      python bench/evaluate.py --quick         (tiny random Llama + char tokenizer; evaluate_quick.*)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterlab import data, evaluate, models  # noqa: E402
from bench._common import RESULTS, machine_info, write_markdown  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# --- the anchors: plain per-example loops -------------------------------------------------------


@torch.no_grad()
def naive_scores(model: torch.nn.Module, tok: Any, prompts: list[str], choices: list[str]) -> torch.Tensor:
    """(P, C) summed label log-probabilities, one unpadded forward per (prompt, choice)."""
    out = torch.zeros(len(prompts), len(choices))
    choice_ids = [tok(c, add_special_tokens=False).input_ids for c in choices]
    for i, p in enumerate(prompts):
        p_ids = tok(p).input_ids
        for c, c_ids in enumerate(choice_ids):
            x = torch.tensor([p_ids + c_ids])  # (1, T)
            logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)  # (T, V)
            for k, t in enumerate(c_ids):
                out[i, c] += logp[len(p_ids) + k - 1, t]
    return out


def naive_accuracy(model: torch.nn.Module, tok: Any, task: Any, n: int) -> tuple[float, list[int], torch.Tensor]:
    examples = task.examples("test", n=n)
    scores = naive_scores(model, tok, [task.prompt(e.text) for e in examples], list(task.choices))
    preds = scores.argmax(-1).tolist()
    return sum(int(p == e.label) for p, e in zip(preds, examples)) / len(examples), preds, scores


@torch.no_grad()
def naive_perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    nll, count = 0.0, 0
    for w in range(windows):
        x = ids[w * seqlen : (w + 1) * seqlen]
        logp = torch.log_softmax(model(input_ids=x[None]).logits[0].float(), -1)  # (seqlen, V)
        for t in range(1, seqlen):
            nll -= float(logp[t - 1, x[t]])
            count += 1
    return math.exp(nll / count)


@torch.no_grad()
def fp64_perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """The untimed reference: the model's logits, log-softmax and sum in fp64."""
    nll = 0.0
    for w in range(windows):
        x = ids[w * seqlen : (w + 1) * seqlen]
        logp = torch.log_softmax(model(input_ids=x[None]).logits[0, :-1].double(), -1)  # (seqlen-1, V)
        nll -= float(logp.gather(-1, x[1:, None]).sum())
    return math.exp(nll / (windows * (seqlen - 1)))


def previous_module(rev: str) -> ModuleType | None:
    """``adapterlab/evaluate.py`` at git revision ``rev`` as a module, or None without git."""
    try:
        src = subprocess.run(
            ["git", "show", f"{rev}:adapterlab/evaluate.py"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"adapterlab_evaluate_{rev.replace('~', '_').replace('^', '_')}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("adapterlab_evaluate_previous", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


# --- timing -------------------------------------------------------------------------------------


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time each ``fns[name]()`` round-robin, the order rotated each round; return times and last results."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    results: dict[str, Any] = {}
    for rnd in range(repeats):
        for k in names[rnd % len(names) :] + names[: rnd % len(names)]:
            t0 = time.perf_counter()
            results[k] = fns[k]()
            times[k].append(time.perf_counter() - t0)
    return times, results


def summarise(times: dict[str, list[float]], anchor: str = "naive") -> dict[str, dict[str, Any]]:
    out = {}
    for k, ts in times.items():
        ratios = [a / t for a, t in zip(times[anchor], ts)]
        out[k] = {
            "seconds": ts,
            "median_s": statistics.median(ts),
            "speedup_vs_naive": statistics.median(ratios),  # median of per-round ratios
            "speedup_vs_naive_ratio_of_medians": statistics.median(times[anchor]) / statistics.median(ts),
        }
    return out


# --- parts --------------------------------------------------------------------------------------


def part_accuracy(
    args: argparse.Namespace, model: torch.nn.Module, tok: Any, prev: ModuleType | None
) -> dict[str, Any]:
    task = data.get_task(args.task) if not args.quick else _QuickTask()
    prompts = [task.prompt(e.text) for e in task.examples("test", n=args.n)]
    fns: dict[str, Callable[[], Any]] = {
        "batched": lambda: evaluate.task_accuracy(model, tok, task, n=args.n, batch_size=args.batch_size),
        "naive": lambda: naive_accuracy(model, tok, task, args.n),
    }
    if prev is not None:
        fns["previous"] = lambda: prev.task_accuracy(model, tok, task, n=args.n, batch_size=args.batch_size)
    # warm-up on a small subset
    evaluate.task_accuracy(model, tok, task, n=8, batch_size=args.batch_size)
    naive_accuracy(model, tok, task, 4)
    if prev is not None:
        prev.task_accuracy(model, tok, task, n=8, batch_size=args.batch_size)
    times, res = interleaved(fns, args.repeats)
    batched, (naive_acc, naive_preds, naive_sc) = res["batched"], res["naive"]
    batched_sc = evaluate.choice_logprobs(model, tok, prompts, list(task.choices), batch_size=args.batch_size)
    out: dict[str, Any] = {
        "setting": {
            "task": task.name,
            "split": "test",
            "n": args.n,
            "batch_size": args.batch_size,
            "choices": list(task.choices),
        },
        "timing": summarise(times),
        "accuracy": {"batched": batched.accuracy, "naive": naive_acc},
        "same_predictions_as_naive": batched.predictions == naive_preds,
        "max_abs_score_diff_vs_naive": float((batched_sc - naive_sc).abs().max()),
    }
    if prev is not None:
        out["accuracy"]["previous"] = res["previous"].accuracy
        out["same_predictions_as_previous"] = batched.predictions == res["previous"].predictions
    return out


def part_perplexity(
    args: argparse.Namespace, model: torch.nn.Module, tok: Any, prev: ModuleType | None
) -> dict[str, Any]:
    ids = data.eval_ids(tok, corpus="wiki" if not args.quick else "lee", split="test")
    windows = min(ids.numel() // args.seqlen, args.eval_windows)
    fns: dict[str, Callable[[], Any]] = {
        "batched": lambda: evaluate.perplexity(
            model, ids, seqlen=args.seqlen, batch_size=args.ppl_batch_size, max_windows=windows
        ),
        "naive": lambda: naive_perplexity(model, ids, args.seqlen, windows),
    }
    if prev is not None:
        fns["previous"] = lambda: prev.perplexity(
            model, ids, seqlen=args.seqlen, batch_size=args.ppl_batch_size, max_windows=windows
        )
    for fn in (
        lambda: evaluate.perplexity(model, ids, seqlen=args.seqlen, max_windows=1),
        lambda: naive_perplexity(model, ids, args.seqlen, 1),
    ):
        fn()  # warm-up on one window
    times, res = interleaved(fns, args.repeats)
    ref = fp64_perplexity(model, ids, args.seqlen, windows)
    out: dict[str, Any] = {
        "setting": {
            "corpus": "wiki" if not args.quick else "lee",
            "split": "test",
            "seqlen": args.seqlen,
            "windows": windows,
            "batch_size": args.ppl_batch_size,
            "tokens": windows * args.seqlen,
        },
        "timing": summarise(times),
        "perplexity": {k: float(v) for k, v in res.items()},
        "rel_diff_vs_naive": abs(res["batched"] - res["naive"]) / res["naive"],
        "fp64_reference": ref,
        "rel_diff_vs_fp64_reference": {k: abs(float(v) - ref) / ref for k, v in res.items()},
    }
    if prev is not None:
        out["rel_diff_vs_previous"] = abs(res["batched"] - res["previous"]) / res["previous"]
    return out


class _QuickTask:
    """A tiny sentiment-like task for ``--quick`` (char tokenizer: multi-token label words)."""

    name = "quick"
    choices = [" no", " yes"]

    def prompt(self, text: str) -> str:
        return f"Review: {text}\nPositive? Answer:"

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Any]:
        from dataclasses import make_dataclass

        ex = make_dataclass("Ex", [("text", str), ("label", int)])
        rows = [ex("good " * (i % 7) + "film", i % 2) for i in range(40)]
        return rows[:n] if n else rows


def _load(avg: Any) -> str:
    return "/".join(f"{x:.2f}" for x in avg) if avg else "n/a"


def _md(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        "# Evaluation speed: batched scoring and perplexity vs a naive per-example loop",
        "",
        f"Model `{payload['model']}`, CPU, {payload['threads']} torch thread(s); median of "
        f"{payload['repeats']} interleaved rounds after a warm-up; x = median of the per-round ratios naive / arm. "
        f"Load average {_load(m['loadavg_at_start'])} at start, {_load(payload['loadavg_at_end'])} at end "
        f"(1/5/15 min; {m['cpu_count']} cores, shared). torch {m['versions']['torch']}, "
        f"transformers {m['versions']['transformers']}. Command: `{payload['command']}`.",
        "",
        "| work | arm | median s | x vs naive | result |",
        "|---|---|---|---|---|",
    ]
    if "accuracy" in payload:
        a = payload["accuracy"]
        s = a["setting"]
        for k, t in a["timing"].items():
            lines.append(
                f"| task_accuracy({s['task']}, n={s['n']}, batch {s['batch_size']}) | {k} | "
                f"{t['median_s']:.2f} | {t['speedup_vs_naive']:.2f} | acc {a['accuracy'][k]:.3f} |"
            )
    if "perplexity" in payload:
        p = payload["perplexity"]
        s = p["setting"]
        for k, t in p["timing"].items():
            work = f"perplexity({s['corpus']}, {s['windows']} x {s['seqlen']}, batch {s['batch_size']})"
            lines.append(
                f"| {work} | {k} | {t['median_s']:.2f} | {t['speedup_vs_naive']:.2f} | ppl {p['perplexity'][k]:.4f} |"
            )
    lines.append("")
    if "accuracy" in payload:
        a = payload["accuracy"]
        same = ""
        if "same_predictions_as_previous" in a:
            same = f"; same predictions as previous: {a['same_predictions_as_previous']}"
        lines.append(
            f"Accuracy: same predictions as naive: {a['same_predictions_as_naive']}{same}; largest "
            f"|score - naive score| {a['max_abs_score_diff_vs_naive']:.2e} nats."
        )
    if "perplexity" in payload:
        p = payload["perplexity"]
        prev = f", vs previous {p['rel_diff_vs_previous']:.1e}" if "rel_diff_vs_previous" in p else ""
        vs_ref = ", ".join(f"{k} {v:.1e}" for k, v in p["rel_diff_vs_fp64_reference"].items())
        lines.append(
            f"Perplexity: relative difference vs naive {p['rel_diff_vs_naive']:.1e}{prev}; vs an fp64 "
            f"log-softmax of the same logits ({p['fp64_reference']:.5f}): {vs_ref}."
        )
    if payload.get("previous"):
        lines.append(f"`previous` = adapterlab/evaluate.py at git `{payload['previous']}` (before issue 16).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="accuracy,perplexity", help="comma-separated subset of: accuracy, perplexity")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--task", default="sentiment")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=10)
    ap.add_argument("--ppl-batch-size", type=int, default=4)
    ap.add_argument("--previous", default="", help="git revision whose evaluate.py is timed too ('' = skip)")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama + char tokenizer")
    ap.add_argument("--name", default="", help="results file stem (default evaluate / evaluate_quick)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quick:
        model, tok = models.tiny_llama(vocab_size=100), models.tiny_tokenizer()
        model_name = "tiny_llama (random)"
        args.n, args.seqlen, args.eval_windows = min(args.n, 40), min(args.seqlen, 64), min(args.eval_windows, 4)
    else:
        model, tok = models.load_default_model()
        model_name = "SmolLM2-135M (embedded, fp32)"
    model.eval()
    prev = previous_module(args.previous) if args.previous else None
    machine = machine_info()
    payload: dict[str, Any] = {
        "model": model_name,
        "threads": args.threads,
        "repeats": args.repeats,
        "previous": args.previous if prev is not None else None,
        "command": "python bench/evaluate.py " + " ".join(sys.argv[1:]),
    }
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for p in parts:
        if p not in ("accuracy", "perplexity"):
            raise SystemExit(f"unknown part {p!r}; choose from: accuracy, perplexity")
    if "accuracy" in parts:
        payload["accuracy"] = part_accuracy(args, model, tok, prev)
    if "perplexity" in parts:
        payload["perplexity"] = part_perplexity(args, model, tok, prev)
    payload["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    name = args.name or ("evaluate_quick" if args.quick else "evaluate")
    payload["machine"] = machine  # versions, threads, load average at start
    payload["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(name, _md(payload))
    sys.stdout.write(f"wrote {path} and {RESULTS / (name + '.md')}\n")


if __name__ == "__main__":
    main()
