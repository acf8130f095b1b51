"""PERP benchmark: retraining after Wanda pruning, and sparsity after merge.

Embedded SmolLM2-135M, packaged wiki text (calibration / retraining windows from the train split,
perplexity on the first ``--eval-windows`` 512-token windows of the held-out split).

Rows, for Wanda 50 % unstructured and 2:4 (one pruning each, reused by both retraining arms):
* ``dense`` and ``pruned`` perplexity;
* ``perp``: :func:`adapterlab.perp_` (``--scope``, MaskLoRA rank ``--r``: <= 1 % trainable) retrained
  for ``--steps`` AdamW steps of ``--batch-size`` x ``--seqlen`` tokens (lr ``--lr``, linear schedule,
  10 % warm-up), then merged with :func:`adapterlab.merge` (sparsity verified);
* ``full``: every weight retrained for the same budget (lr ``--lr-full``) with
  :class:`adapterlab.callbacks.MaskKeeperCallback` keeping the mask — the reference PERP compares to.
Goal (issue 5): PERP closes >= 60 % of the pruned-to-dense perplexity gap at 50 % unstructured.

Sparsity after merge: a peft LoRA (r 8, all seven block projections) trained ``--lora-steps`` steps
on the 50 % pruned base, merged by peft's ``merge_and_unload`` (the anchor) and by
``adapterlab.merge(keep_sparsity=True)``; sparsity, perplexity and merge time (interleaved repeats,
median, ratio).

Run:  python bench/perp.py            (writes bench/results/perp.json and bench/results/perp.md)
      python bench/perp.py --quick    (smoke run of every arm on a tiny random Llama + char tokenizer and
                                       the small `lee` corpus, 2 steps; writes perp_quick.*)
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterlab import data, evaluate, models  # noqa: E402
from adapterlab.folding import merge  # noqa: E402
from adapterlab.pruning import prune_, sparsity_of  # noqa: E402
from adapterlab.retrain import merge_perp_, perp_, retrain_  # noqa: E402
from bench._common import write_json, write_markdown  # noqa: E402

log = logging.getLogger("bench.perp")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument("--nsamples", type=int, default=32, help="Wanda calibration windows")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--scope", default="mask_lora")
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8.0)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-full", type=float, default=2e-5)
    ap.add_argument("--lora-steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed merge repeats (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", default="perp,full,merge")
    args = ap.parse_args()
    name = "perp"
    corpus = "wiki"
    if args.quick:
        args.nsamples, args.calib_seqlen, args.eval_seqlen, args.eval_windows = 2, 64, 128, 2
        args.steps, args.seqlen, args.lora_steps, args.repeats = 2, 64, 2, 1
        name, corpus = "perp_quick", "lee"
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    arms = set(args.arms.split(","))

    if args.quick:
        dense, tok = models.tiny_llama(), models.tiny_tokenizer()
    else:
        dense, tok = models.load_default_model()
    ids = data.eval_ids(tok, corpus=corpus, split="test")
    calib = data.calibration_ids(tok, n_samples=args.nsamples, seqlen=args.calib_seqlen, seed=0, corpus=corpus)
    train = data.calibration_ids(tok, n_samples=args.steps * args.batch_size, seqlen=args.seqlen, seed=1, corpus=corpus)

    def ppl(model: torch.nn.Module) -> float:
        return evaluate.perplexity(model, ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows)

    t0 = time.perf_counter()
    rows: list[dict] = []
    p_dense = ppl(dense)
    rows.append(
        {
            "pattern": None,
            "arm": "dense",
            "ppl": p_dense,
            "trainable": 0,
            "trainable_fraction": 0.0,
            "sparsity": sparsity_of(dense),
        }
    )
    log.info("dense ppl %.3f", p_dense)
    merge_rows: list[dict] = []
    for pattern in args.patterns.split(","):
        pat = None if pattern == "unstructured" else pattern
        pruned = copy.deepcopy(dense)
        t = time.perf_counter()
        prune_(pruned, "wanda", 0.5, pattern=pat, calibration=calib)
        prune_s = time.perf_counter() - t
        p_pruned = ppl(pruned)
        rows.append(
            {
                "pattern": pattern,
                "arm": "pruned",
                "ppl": p_pruned,
                "trainable": 0,
                "trainable_fraction": 0.0,
                "sparsity": sparsity_of(pruned),
                "seconds": prune_s,
            }
        )
        log.info("%s pruned ppl %.3f", pattern, p_pruned)
        gap = p_pruned - p_dense
        for arm in ("perp", "full"):
            if arm not in arms:
                continue
            model = copy.deepcopy(pruned)
            rep = perp_(model, args.scope if arm == "perp" else "full", r=args.r, alpha=args.alpha)
            res = retrain_(
                model,
                train,
                steps=args.steps,
                lr=args.lr if arm == "perp" else args.lr_full,
                batch_size=args.batch_size,
                seed=0,
            )
            nm_valid = merge_perp_(model, pattern=pat).nm_valid if arm == "perp" else None
            model.requires_grad_(False)
            p = ppl(model)
            rows.append(
                {
                    "pattern": pattern,
                    "arm": arm,
                    "ppl": p,
                    "trainable": rep.trainable,
                    "trainable_fraction": rep.fraction,
                    "sparsity": sparsity_of(model),
                    "nm_valid": nm_valid,
                    "gap_closed": (p_pruned - p) / gap if gap else None,
                    "seconds": res.seconds,
                    "loss_first": res.losses[0],
                    "loss_last": res.losses[-1],
                    "losses": res.losses,
                }
            )
            log.info(
                "%s %s ppl %.3f (gap closed %.1f %%, %d trainable = %.3f %%, %.0f s)",
                pattern,
                arm,
                p,
                100 * rows[-1]["gap_closed"],
                rep.trainable,
                100 * rep.fraction,
                res.seconds,
            )
            del model
            gc.collect()
        if "merge" in arms and pat is None:
            merge_rows = merge_arm(pruned, train, ppl, args)
        del pruned
        gc.collect()

    payload = {
        "benchmark": "perp",
        "settings": {k: v for k, v in vars(args).items()},
        "model": "tiny_llama (smoke run)" if args.quick else "embedded SmolLM2-135M-Instruct",
        "eval": {"corpus": corpus, "split": "test", "seqlen": args.eval_seqlen, "windows": args.eval_windows},
        "rows": rows,
        "merge": merge_rows,
        "wall_seconds": time.perf_counter() - t0,
    }
    unstructured = next((r for r in rows if r["pattern"] == "unstructured" and r["arm"] == "perp"), None)
    if unstructured is not None:
        payload["goal"] = {
            "gap_closed_unstructured": unstructured["gap_closed"],
            "target": 0.6,
            "met": unstructured["gap_closed"] >= 0.6,
            "trainable_fraction": unstructured["trainable_fraction"],
        }
    write_json(name, payload)
    write_markdown(name, markdown(payload))
    log.info("done in %.0f s", payload["wall_seconds"])


def merge_arm(pruned: torch.nn.Module, train: torch.Tensor, ppl, args) -> list[dict]:
    """peft merge_and_unload (anchor) vs adapterlab.merge(keep_sparsity=True) of a LoRA on the pruned base."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(pruned)
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    res = retrain_(pm, train, steps=args.lora_steps, lr=args.lr, batch_size=args.batch_size, seed=0)
    pm.eval()
    p_unmerged = ppl(pm)
    sp0 = sparsity_of(pruned)

    def run_peft():
        m = copy.deepcopy(pm)
        t = time.perf_counter()
        out = m.merge_and_unload()
        return time.perf_counter() - t, out

    def run_ours():
        m = copy.deepcopy(pm)
        t = time.perf_counter()
        out = merge(m, keep_sparsity=True, probe=False)
        return time.perf_counter() - t, out

    times = {"peft": [], "adapterlab": []}
    run_peft(), run_ours()  # warm-up
    for _ in range(args.repeats):  # interleaved
        times["peft"].append(run_peft()[0])
        times["adapterlab"].append(run_ours()[0])
    rows = []
    for arm, fn in (("peft merge_and_unload", run_peft), ("adapterlab merge(keep_sparsity=True)", run_ours)):
        _, merged = fn()
        key = "peft" if arm.startswith("peft") else "adapterlab"
        rows.append(
            {
                "arm": arm,
                "sparsity_base": sp0,
                "sparsity_merged": sparsity_of(merged),
                "ppl_unmerged": p_unmerged,
                "ppl_merged": ppl(merged),
                "merge_seconds_median": statistics.median(times[key]),
                "merge_seconds": times[key],
                "lora_steps": res.steps,
            }
        )
        del merged
        gc.collect()
    ratio = rows[1]["merge_seconds_median"] / rows[0]["merge_seconds_median"]
    for r in rows:
        r["time_ratio_vs_peft"] = r["merge_seconds_median"] / rows[0]["merge_seconds_median"]
    log.info(
        "merge sparsity: peft %.4f, adapterlab %.4f (base %.4f); time ratio %.2f",
        rows[0]["sparsity_merged"],
        rows[1]["sparsity_merged"],
        sp0,
        ratio,
    )
    return rows


def markdown(p: dict) -> str:
    s = p["settings"]
    lines = [
        f"# PERP: retraining after Wanda pruning ({p['model']})",
        "",
        f"{p['eval']['corpus']} test perplexity, {p['eval']['windows']} x {p['eval']['seqlen']} tokens; budget {s['steps']} steps x "
        f"{s['batch_size']} x {s['seqlen']} tokens; PERP scope `{s['scope']}` r={s['r']} lr {s['lr']}; "
        f"full retraining lr {s['lr_full']} with MaskKeeperCallback.",
        "",
        "| pattern | arm | ppl | gap closed | trainable | sparsity | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        gc_ = "" if r.get("gap_closed") is None else f"{100 * r['gap_closed']:.1f} %"
        tr = f"{r['trainable']:,} ({100 * r['trainable_fraction']:.2f} %)" if r["trainable"] else "-"
        sec = f"{r['seconds']:.0f}" if r.get("seconds") is not None and r["arm"] in ("perp", "full") else ""
        lines.append(
            f"| {r['pattern'] or '-'} | {r['arm']} | {r['ppl']:.3f} | {gc_} | {tr} | {r['sparsity']:.4f} | {sec} |"
        )
    if "goal" in p:
        g = p["goal"]
        lines += [
            "",
            f"Goal: PERP closes >= 60 % of the gap at 50 % unstructured: {100 * g['gap_closed_unstructured']:.1f} % "
            f"({'met' if g['met'] else 'not met'}), {100 * g['trainable_fraction']:.2f} % trainable.",
        ]
    if p["merge"]:
        lines += [
            "",
            "## Sparsity after merge (LoRA r=8 on the 50 % Wanda base)",
            "",
            "| merge | base sparsity | merged sparsity | ppl unmerged | ppl merged | merge s (median) | time ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in p["merge"]:
            lines.append(
                f"| {r['arm']} | {r['sparsity_base']:.4f} | {r['sparsity_merged']:.4f} | {r['ppl_unmerged']:.3f} | "
                f"{r['ppl_merged']:.3f} | {r['merge_seconds_median']:.3f} | {r['time_ratio_vs_peft']:.2f} |"
            )
    cmd = "python bench/perp.py" + (" --quick" if s["quick"] else "")
    lines += ["", f"Wall time {p['wall_seconds'] / 60:.1f} min. Command: `{cmd}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
