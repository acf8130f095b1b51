"""Benchmark: DyLoRA vs separate LoRA runs, LoRI-S vs LoRA, rsLoRA vs LoRA at r=64.

Embedded SmolLM2-135M-Instruct, ``sentiment`` task, the same short budget for every arm
(``--steps`` AdamW steps of ``--batch-size`` examples, lr ``--lr``, no weight decay, q/v targets).
Accuracy is scored on the first ``--eval-n`` test examples (fixed sample, seed 0) by the answer
word's log-likelihood (both answer words are single tokens, so one forward per prompt; identical
to ``adapterlab.evaluate.task_accuracy``, checked at start-up on a few examples).

Arms:
* ``zero_shot``: the base model.
* ``lora_r{1,2,4,8}``: four separate peft LoRA runs (alpha 16, scale alpha/r) — the anchor.
* ``dylora``: one DyLoRA run, r_max 8, alpha 16 (scale alpha/b), evaluated at b = 1, 2, 4, 8
  (frozen-prefix mode and, with ``--dylora-modes frozen,full``, the all-leading-components mode).
  Goal (issue 3): every rank within 5 % of the separate LoRA's accuracy gain over zero-shot, for one
  quarter of the training cost (one run instead of four).
* ``lori``: LoRI-D r=8 for ``--steps`` steps, mask 90 % of B (one global magnitude threshold),
  LoRI-S for ``--steps`` more steps at ``--lori-s-lr-mult`` x lr; vs LoRA r=8: trainable
  parameters, stored bytes (``adapter_model.safetensors``), accuracy.
* ``rslora``: peft LoRA r=64 alpha 16 with and without ``use_rslora`` (scale 2 vs 0.25).

Run: ``python bench/lowrank.py`` (writes ``bench/results/lowrank.json`` and ``.md``). The arms are
independent, so on a busy machine they can run as separate processes and be merged::

    python bench/lowrank.py --threads 1 --arms zero_shot,lora_r1 --out /tmp/p0.json   # ... one per subset
    python bench/lowrank.py --merge /tmp/p0.json /tmp/p1.json ... --out bench/results/lowrank.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import adapterlab.tuners  # noqa: E402,F401  (registers the tuners)
from adapterlab.data import get_task, tokenize_for_training  # noqa: E402
from adapterlab.models import load_default_model  # noqa: E402
from adapterlab.tuners import DyLoraConfig, LoriConfig  # noqa: E402

logger = logging.getLogger("bench.lowrank")
RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "v_proj"]


# ---------------------------------------------------------------------------------------------
# data / eval


def batches(data: dict[str, torch.Tensor], batch_size: int, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches over a fixed shuffled order (epochs repeat), each trimmed to its longest row."""
    n = data["input_ids"].shape[0]
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch_size / n) + 1)])
    out = []
    for s in range(steps):
        idx = order[s * batch_size : (s + 1) * batch_size]
        b = {k: v[idx] for k, v in data.items()}
        width = int(b["attention_mask"].sum(1).max())
        out.append({k: v[:, :width] for k, v in b.items()})  # (bs, width)
    return out


class FastScorer:
    """Accuracy with single-token answers: one forward per prompt, compare the answers' log-probs."""

    def __init__(self, tok: Any, task: Any, n: int, batch_size: int = 32) -> None:
        self.tok, self.task, self.bs = tok, task, batch_size
        self.examples = task.examples("test", n=n)
        self.choice_ids = [tok(c, add_special_tokens=False).input_ids for c in task.choices]
        if any(len(c) != 1 for c in self.choice_ids):
            raise ValueError("FastScorer needs single-token answers")
        self.choice_ids = [c[0] for c in self.choice_ids]

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, examples: list[Any] | None = None) -> torch.Tensor:
        model.eval()
        exs = self.examples if examples is None else examples
        out = []
        for s in range(0, len(exs), self.bs):
            prompts = [self.task.prompt(e.text) for e in exs[s : s + self.bs]]
            enc = self.tok(prompts, return_tensors="pt", padding=True)
            logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits  # (b, L, V)
            last = enc.attention_mask.sum(1) - 1  # (b,) right padding
            lp = torch.log_softmax(logits[torch.arange(len(prompts)), last].float(), -1)  # (b, V)
            out.append(lp[:, self.choice_ids])  # (b, C)
        return torch.cat(out)

    def accuracy(self, model: torch.nn.Module) -> float:
        pred = self.scores(model).argmax(-1)
        labels = torch.tensor([e.label for e in self.examples])
        return float((pred == labels).float().mean())


# ---------------------------------------------------------------------------------------------
# training


def train(model: torch.nn.Module, data: list[dict[str, torch.Tensor]], lr: float, *, on_step: Any = None) -> float:
    """Plain AdamW loop (weight decay 0); returns wall seconds. ``on_step(step)`` runs before each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step, batch in enumerate(data):
        if on_step is not None:
            on_step(step, opt)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        logger.debug("  step %d loss %.4f", step, loss.item())
    model.eval()
    return time.perf_counter() - t0


def stored_bytes(model: Any) -> int:
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        return os.path.getsize(Path(d) / "adapter_model.safetensors")


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------
# arms


ALL_ARMS = (
    "zero_shot",
    "lora_r1",
    "lora_r2",
    "lora_r4",
    "lora_r8",
    "dylora_frozen",
    "dylora_full",
    "lori",
    "lora_r64",
    "rslora_r64",
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected arms (each independent, so they can run in separate processes and be merged)."""
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import load_model

    torch.set_num_threads(args.threads)
    task = get_task("sentiment")
    t_start = time.perf_counter()
    model, tok = load_default_model()
    data = tokenize_for_training(tok, task, n=args.train_n, seed=0, max_length=args.max_length, return_tensors="pt")
    train_batches = batches(data, args.batch_size, args.steps, seed=0)
    scorer = FastScorer(tok, task, args.eval_n)

    # the fast scorer equals task_accuracy's scoring (adapterlab.evaluate.choice_logprobs) on a few examples
    from adapterlab.evaluate import choice_logprobs

    few = scorer.examples[:4]
    ref = choice_logprobs(model, tok, [task.prompt(e.text) for e in few], task.choices)
    torch.testing.assert_close(scorer.scores(model, few), ref, rtol=1e-3, atol=1e-3)

    res: dict[str, Any] = {"arms": {}}
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ALL_ARMS]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; choose from: {', '.join(ALL_ARMS)}")

    def record(name: str, **kw: Any) -> None:
        res["arms"][name] = kw
        logger.info("%s: %s", name, kw)
        write(res, args)  # partial results survive an interrupted run

    if "zero_shot" in arms:
        t0 = time.perf_counter()
        record("zero_shot", accuracy=scorer.accuracy(model), eval_s=time.perf_counter() - t0)
    del model

    def lora(r: int, use_rslora: bool = False) -> Any:
        torch.manual_seed(args.seed)
        cfg = LoraConfig(r=r, lora_alpha=args.alpha, target_modules=TARGETS, use_rslora=use_rslora, lora_dropout=0.0)
        pm = get_peft_model(load_model(None), cfg)
        secs = train(pm, train_batches, args.lr)
        return pm, dict(
            accuracy=scorer.accuracy(pm),
            train_s=secs,
            steps=args.steps,
            trainable=trainable(pm),
            stored_bytes=stored_bytes(pm),
            scale=args.alpha / (math.sqrt(r) if use_rslora else r),
        )

    for r in (1, 2, 4, 8):
        if f"lora_r{r}" not in arms:
            continue
        pm, out = lora(r)
        if r == 8:
            # LoRA r=8 truncated to its first b components at scale alpha/b (what DyLoRA should beat)
            trunc = {}
            for b in (1, 2, 4):
                saved = []
                for mod in pm.modules():
                    if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
                        w = mod.lora_A["default"].weight
                        saved.append((mod, w.data.clone()))
                        w.data[b:] = 0
                        mod.scaling["default"] = args.alpha / b
                trunc[b] = scorer.accuracy(pm)
                for mod, w in saved:
                    mod.lora_A["default"].weight.data.copy_(w)
                    mod.scaling["default"] = args.alpha / 8
            out["truncated_accuracy_at_rank"] = trunc
        record(f"lora_r{r}", **out)
        del pm

    for mode in ("frozen", "full"):
        if f"dylora_{mode}" not in arms:
            continue
        torch.manual_seed(args.seed)
        cfg = DyLoraConfig(
            r=8, lora_alpha=args.alpha, target_modules=TARGETS, frozen_mode=(mode == "frozen"), seed=args.seed
        )
        pm = get_peft_model(load_model(None), cfg)
        secs = train(pm, train_batches, args.lr, on_step=lambda step, opt, pm=pm: pm.sample_rank(step))
        per_rank = {}
        for b in (1, 2, 4, 8):
            pm.set_rank(b)
            per_rank[b] = scorer.accuracy(pm)
        record(
            f"dylora_{mode}",
            accuracy_at_rank=per_rank,
            train_s=secs,
            steps=args.steps,
            trainable=trainable(pm),
            stored_bytes=stored_bytes(pm),
        )
        del pm

    if "lori" in arms:
        cfg = LoriConfig(r=8, lora_alpha=args.alpha, target_modules=TARGETS, task="sentiment", sparsity=0.9)
        pm = get_peft_model(load_model(None), cfg)
        d_tr = trainable(pm)
        secs_d = train(pm, train_batches, args.lr * args.lori_d_lr_mult)
        acc_d, bytes_d = scorer.accuracy(pm), stored_bytes(pm)
        report = pm.sparsify_(0.9)
        acc_masked, s_tr = scorer.accuracy(pm), trainable(pm)
        secs_s = train(
            pm, batches(data, args.batch_size, args.steps, seed=1), args.lr * args.lori_d_lr_mult * args.lori_s_lr_mult
        )
        record(
            "lori",
            lori_d_accuracy=acc_d,
            lori_d_masked_no_retrain_accuracy=acc_masked,
            lori_s_accuracy=scorer.accuracy(pm),
            trainable={"lori_d": d_tr, "lori_s": s_tr},
            stored_bytes={"lori_d": bytes_d, "lori_s": stored_bytes(pm)},
            achieved_sparsity=report.achieved_sparsity,
            train_s={"lori_d": secs_d, "lori_s": secs_s},
            steps={"lori_d": args.steps, "lori_s": args.steps},
        )
        del pm

    for name, use in (("lora_r64", False), ("rslora_r64", True)):
        if name in arms:
            pm, out = lora(64, use_rslora=use)
            record(name, **out)
            del pm
    res["total_s"] = time.perf_counter() - t_start
    return res


def derive(res: dict[str, Any]) -> dict[str, Any]:
    """Comparisons between arms: DyLoRA vs separate LoRA gains, LoRI vs LoRA r=8."""
    a = res["arms"]
    zs = a.get("zero_shot", {}).get("accuracy")
    out: dict[str, Any] = {}
    lora = {b: a[f"lora_r{b}"]["accuracy"] for b in (1, 2, 4, 8) if f"lora_r{b}" in a}
    for mode in ("frozen", "full"):
        d = a.get(f"dylora_{mode}")
        if d is None or zs is None or len(lora) < 4:
            continue
        acc = {int(k): v for k, v in d["accuracy_at_rank"].items()}
        ratio = {b: (acc[b] - zs) / (lora[b] - zs) if lora[b] != zs else None for b in acc}
        within = {b: bool(acc[b] - zs >= 0.95 * (lora[b] - zs)) for b in acc}
        out[f"dylora_{mode}_vs_lora"] = {
            "dylora_accuracy": acc,
            "lora_accuracy": lora,
            "gain_ratio": ratio,
            "within_5pct_of_lora_gain": within,
            "goal_met": all(within.values()),
            "training_steps_dylora": d["steps"],
            "training_steps_4_lora_runs": sum(a[f"lora_r{b}"]["steps"] for b in lora),
        }
    if "lori" in a and "lora_r8" in a:
        lo, l8 = a["lori"], a["lora_r8"]
        out["lori_vs_lora_r8"] = {
            "accuracy": {
                "lora_r8": l8["accuracy"],
                "lori_d": lo["lori_d_accuracy"],
                "lori_s": lo["lori_s_accuracy"],
                "lori_d_masked_no_retrain": lo["lori_d_masked_no_retrain_accuracy"],
            },
            "trainable": {"lora_r8": l8["trainable"], **lo["trainable"]},
            "stored_bytes": {"lora_r8": l8["stored_bytes"], **lo["stored_bytes"]},
            "lori_s_trainable_fraction_of_lora": lo["trainable"]["lori_s"] / l8["trainable"],
        }
    if "lora_r64" in a and "rslora_r64" in a:
        out["rslora_vs_lora_r64"] = {
            "lora": a["lora_r64"]["accuracy"],
            "rslora": a["rslora_r64"]["accuracy"],
            "scale": {"lora": a["lora_r64"]["scale"], "rslora": a["rslora_r64"]["scale"]},
        }
    return out


def write(res: dict[str, Any], args: argparse.Namespace) -> None:
    import adapterlab

    res["derived"] = derive(res)
    res.update(
        benchmark="lowrank",
        command="python " + " ".join(sys.argv),
        machine={
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "processor": platform.processor(),
            "note": "shared machine (other jobs running): times are indicative only; accuracies are unaffected",
        },
        versions={d: version(d) for d in ("torch", "transformers", "peft", "bitsandbytes")}
        | {"adapterlab": adapterlab.__version__},
        settings={k: v for k, v in vars(args).items() if k != "out"}
        | {"targets": TARGETS, "model": "SmolLM2-135M-Instruct (embedded)", "task": "sentiment"},
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(res))


def markdown(res: dict[str, Any]) -> str:
    a, d = res["arms"], res.get("derived", {})
    lines = ["# lowrank benchmark", "", f"commands: {res.get('commands') or res.get('command')}", ""]
    if "zero_shot" in a:
        lines += [f"zero-shot accuracy: {a['zero_shot']['accuracy']:.3f} (n={res['settings']['eval_n']})", ""]
    for mode in ("frozen", "full"):
        x = d.get(f"dylora_{mode}_vs_lora")
        if x:
            lines += [
                f"## DyLoRA ({mode}) — one run, r_max=8 — vs four separate LoRA runs",
                "",
                "| rank | LoRA (own run) | DyLoRA | gain ratio | within 5% of LoRA gain |",
                "|---|---|---|---|---|",
            ]
            for b in (1, 2, 4, 8):
                gr = x["gain_ratio"][b]
                lines.append(
                    f"| {b} | {x['lora_accuracy'][b]:.3f} | {x['dylora_accuracy'][b]:.3f} | {'-' if gr is None else f'{gr:.2f}'} | {x['within_5pct_of_lora_gain'][b]} |"
                )
            lines += [
                "",
                f"goal met: {x['goal_met']}; training steps {x['training_steps_dylora']} vs {x['training_steps_4_lora_runs']}",
                "",
            ]
    if "lora_r8" in a and "truncated_accuracy_at_rank" in a["lora_r8"]:
        t = a["lora_r8"]["truncated_accuracy_at_rank"]
        lines += [
            "LoRA r=8 truncated to its first b components: " + ", ".join(f"b={k}: {v:.3f}" for k, v in t.items()),
            "",
        ]
    x = d.get("lori_vs_lora_r8")
    if x:
        lines += [
            "## LoRI (r=8, 90% sparse B) vs LoRA r=8",
            "",
            "| arm | accuracy | trainable | stored bytes |",
            "|---|---|---|---|",
        ]
        for k, label in (("lora_r8", "LoRA r=8"), ("lori_d", "LoRI-D"), ("lori_s", "LoRI-S")):
            lines.append(f"| {label} | {x['accuracy'][k]:.3f} | {x['trainable'][k]} | {x['stored_bytes'][k]} |")
        lines += ["", f"LoRI-D masked to 90% without retraining: {x['accuracy']['lori_d_masked_no_retrain']:.3f}", ""]
    x = d.get("rslora_vs_lora_r64")
    if x:
        lines += [
            "## rsLoRA vs LoRA at r=64 (alpha 16)",
            "",
            f"LoRA (scale {x['scale']['lora']}): {x['lora']:.3f}; "
            f"rsLoRA (scale {x['scale']['rslora']}): {x['rslora']:.3f}",
            "",
        ]
    return "\n".join(lines)


def merge_results(paths: list[str], out: str) -> dict[str, Any]:
    """Combine partial result files (arms run in separate processes) into one."""
    merged: dict[str, Any] = {"arms": {}, "commands": [], "parts": []}
    for p in paths:
        part = json.loads(Path(p).read_text())
        merged["arms"].update(part["arms"])
        merged["commands"].append(part.get("command"))
        merged["parts"].append(
            {"arms": sorted(part["arms"]), "total_s": part.get("total_s"), "settings": part.get("settings")}
        )
        for k in ("benchmark", "machine", "versions", "settings"):
            merged.setdefault(k, part.get(k))
    merged["settings"] = {
        k: v for k, v in merged["settings"].items() if k not in ("arms", "threads", "merge", "lori_s_lr_mult")
    }
    merged["settings"]["note"] = "per-part settings (arms, threads, LoRI-S LR multiplier) are under parts[]"
    merged["derived"] = derive(merged)
    Path(out).write_text(json.dumps(merged, indent=2, default=str))
    Path(out).with_suffix(".md").write_text(markdown(merged))
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-n", type=int, default=200)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lori-d-lr-mult", type=float, default=1.0)
    p.add_argument(
        "--lori-s-lr-mult", type=float, default=10.0, help="LoRI-S LR multiplier (the paper uses ~10x the LoRI-D LR)"
    )
    p.add_argument("--arms", default=",".join(ALL_ARMS), help="comma-separated subset of: " + ", ".join(ALL_ARMS))
    p.add_argument("--merge", nargs="+", default=None, help="merge partial result JSON files into --out and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "lowrank.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.merge:
        merge_results(args.merge, args.out)
        return
    res = run(args)
    write(res, args)


if __name__ == "__main__":
    main()
