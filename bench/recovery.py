"""Recovery benchmark: training-free compensation adapters (EoRA) on pruned bases.

Embedded SmolLM2-135M-Instruct. One evaluation setting for every row: wiki perplexity on the first
``--eval-windows`` windows of ``--eval-seqlen`` tokens of the held-out split, and sentiment accuracy
(:func:`adapterlab.evaluate.task_accuracy`) on the first ``--acc-n`` test examples.

Rows: ``dense``; per compression (SparseGPT 2:4, Wanda 50 %, SparseGPT 50 % by default; ``--nf4`` adds a
bitsandbytes NF4 base, whose weights already sit on a 4-bit grid: see adapterlab.models) the compressed base
and the base + :func:`adapterlab.compensate` at each of ``--ranks`` in the activation space (EoRA) and the
weight space (plain SVD). Per compression and space ONE ``compensate`` call runs at the largest rank; the
smaller ranks are its exact prefixes (:meth:`CompensationResult.truncated`), so ``compensate s`` is the time
of that one call (calibration pass included). Pruning and compensation use the same calibration windows
(``--nsamples`` x ``--calib-seqlen`` tokens of the train split, seed 0). The adapters are added into a copy
of the pruned weights for evaluation (the same function as the unmerged LoRA); the NF4 rows load the adapter
with ``PeftModel`` on the 4-bit base.

``gap closed`` = (metric(compressed) - metric(compensated)) / (metric(compressed) - metric(dense)).
Goals (issue 20): activation space r = 32 closes >= 30 % of the SparseGPT 2:4 perplexity gap in seconds;
activation beats weight space at every rank.

Run:  python bench/recovery.py           (writes bench/results/recovery.json and .md)
      python bench/recovery.py --quick   (tiny random Llama + char tokenizer, `lee` corpus; recovery_quick.*)
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterlab import data, evaluate, models  # noqa: E402
from adapterlab.extraction import compensate  # noqa: E402
from adapterlab.pruning import prune_, sparsity_of  # noqa: E402
from bench._common import write_json, write_markdown  # noqa: E402

log = logging.getLogger("bench.recovery")

COMPRESSIONS = {
    "sparsegpt-2:4": ("sparsegpt", None, "2:4"),
    "wanda-50%": ("wanda", 0.5, None),
    "sparsegpt-50%": ("sparsegpt", 0.5, None),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compressions", default=",".join(COMPRESSIONS))
    ap.add_argument("--nf4", action="store_true", help="also a bitsandbytes NF4 base (slow 4-bit CPU forwards)")
    ap.add_argument("--ranks", default="8,32,128")
    ap.add_argument("--spaces", default="activation,weight")
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows (pruning and compensation)")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--acc-n", type=int, default=24)
    ap.add_argument("--percdamp", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    name, corpus = "recovery", "wiki"
    if args.quick:
        args.nsamples, args.calib_seqlen, args.eval_seqlen, args.eval_windows, args.acc_n = 4, 32, 64, 2, 8
        args.ranks = "2,4,8"
        name, corpus = "recovery_quick", "lee"
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    warnings.filterwarnings("ignore")
    ranks = sorted(int(r) for r in args.ranks.split(","))
    spaces = args.spaces.split(",")
    load_start = os.getloadavg()

    if args.quick:
        dense, tok = models.tiny_llama(vocab_size=128), models.tiny_tokenizer()
    else:
        dense, tok = models.load_default_model()
    ids = data.eval_ids(tok, corpus=corpus, split="test")
    calib = data.calibration_ids(tok, n_samples=args.nsamples, seqlen=args.calib_seqlen, seed=0, corpus=corpus)

    def evaluate_model(model: torch.nn.Module) -> dict[str, float]:
        t = time.perf_counter()
        with torch.no_grad():
            ppl = evaluate.perplexity(model, ids, seqlen=args.eval_seqlen, max_windows=args.eval_windows)
            acc = evaluate.task_accuracy(model, tok, "sentiment", n=args.acc_n).accuracy
        return {"ppl": ppl, "acc": acc, "eval_seconds": time.perf_counter() - t}

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    ref = evaluate_model(dense)
    rows.append(
        {"compression": "dense", "space": None, "rank": None, **ref, "params": 0, "sparsity": sparsity_of(dense)}
    )
    log.info("dense %s", ref)

    names = [c for c in args.compressions.split(",") if c] + (["bnb-nf4"] if args.nf4 else [])
    for comp_name in names:
        t = time.perf_counter()
        if comp_name == "bnb-nf4":
            from adapterlab.quant import quantize_model

            base = quantize_model(dense, 4, quant_type="nf4")
        else:
            method, sparsity, pattern = COMPRESSIONS[comp_name]
            base = copy.deepcopy(dense)
            prune_(base, method, sparsity, pattern=pattern, calibration=calib)
        compress_s = time.perf_counter() - t
        got = evaluate_model(base)
        rows.append(
            {
                "compression": comp_name,
                "space": None,
                "rank": None,
                **got,
                "params": 0,
                "sparsity": sparsity_of(base) if comp_name != "bnb-nf4" else None,
                "compress_seconds": compress_s,
            }
        )
        log.info("%s %s", comp_name, got)
        for space in spaces:
            t = time.perf_counter()
            result = compensate(
                dense,
                base,
                rank=ranks[-1],
                space=space,
                calibration=calib if space == "activation" else None,
                percdamp=args.percdamp,
            )
            comp_s = time.perf_counter() - t
            for r in ranks:
                cut = result.truncated(r)
                model = _compensated(base, cut, comp_name == "bnb-nf4")
                res = evaluate_model(model)
                row = {
                    "compression": comp_name,
                    "space": space,
                    "rank": r,
                    **res,
                    "params": cut.n_params(),
                    "compensate_seconds": comp_s,
                    "compensate_rank": ranks[-1],
                    "gap_closed_ppl": _closed(got["ppl"], res["ppl"], ref["ppl"]),
                    "gap_closed_acc": _closed(got["acc"], res["acc"], ref["acc"]),
                }
                rows.append(row)
                log.info("%s %s r=%d %s", comp_name, space, r, {k: row[k] for k in ("ppl", "acc", "gap_closed_ppl")})
                del model
                gc.collect()
        del base
        gc.collect()

    goal = _goal(rows, ranks)
    payload = {
        "benchmark": "recovery",
        "model": "tiny_llama (smoke run)" if args.quick else "embedded SmolLM2-135M-Instruct",
        "settings": vars(args),
        "eval": {
            "corpus": corpus,
            "split": "test",
            "seqlen": args.eval_seqlen,
            "windows": args.eval_windows,
            "task": "sentiment",
            "n": args.acc_n,
        },
        "calibration": {"corpus": corpus, "split": "train", "n_samples": args.nsamples, "seqlen": args.calib_seqlen},
        "rows": rows,
        "goal": goal,
        "wall_seconds": time.perf_counter() - t0,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }
    write_json(name, payload)
    write_markdown(name, markdown(payload))
    log.info("done in %.0f s; goal %s", payload["wall_seconds"], goal)


def _compensated(base: torch.nn.Module, result: Any, quantized: bool) -> torch.nn.Module:
    if not quantized:
        model = copy.deepcopy(base)
        result.apply_(model)
        return model
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        result.save(Path(tmp) / "adapter")
        return PeftModel.from_pretrained(base, str(Path(tmp) / "adapter")).eval()


def _closed(compressed: float, got: float, dense: float) -> float | None:
    gap = compressed - dense
    return (compressed - got) / gap if gap else None


def _goal(rows: list[dict[str, Any]], ranks: list[int]) -> dict[str, Any]:
    def find(comp: str, space: str, r: int) -> dict[str, Any] | None:
        return next((x for x in rows if x["compression"] == comp and x["space"] == space and x["rank"] == r), None)

    target = find("sparsegpt-2:4", "activation", 32)
    beats: dict[str, dict[str, bool]] = {}
    for comp in dict.fromkeys(x["compression"] for x in rows if x["space"] is not None):
        beats[comp] = {}
        for r in ranks:
            a, w = find(comp, "activation", r), find(comp, "weight", r)
            if a is not None and w is not None:
                beats[comp][str(r)] = a["ppl"] < w["ppl"]
    return {
        "sparsegpt_2:4_activation_r32_gap_closed": target["gap_closed_ppl"] if target else None,
        "target": 0.3,
        "met": bool(target and target["gap_closed_ppl"] is not None and target["gap_closed_ppl"] >= 0.3),
        "seconds": target["compensate_seconds"] if target else None,
        "activation_beats_weight_ppl": beats,
        "activation_beats_weight_everywhere": all(all(v.values()) for v in beats.values()) if beats else None,
    }


def _secs(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f} %"


def markdown(p: dict[str, Any]) -> str:
    ev = p["eval"]
    lines = [
        f"# Recovery: training-free compensation adapters ({p['model']})",
        "",
        f"wiki test perplexity, {ev['windows']} x {ev['seqlen']} tokens; sentiment accuracy on {ev['n']} test "
        f"examples; calibration {p['calibration']['n_samples']} x {p['calibration']['seqlen']} train tokens "
        f"(pruning and compensation); {p['settings']['threads']} thread(s); load average "
        f"{p['loadavg_start'][0]:.1f} at start, {p['loadavg_end'][0]:.1f} at the end.",
        "",
        "| compression | space | rank | ppl | gap closed (ppl) | accuracy | gap closed (acc) | adapter params "
        "| compensate s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["rows"]:
        lines.append(
            f"| {r['compression']} | {r['space'] or '-'} | {r['rank'] or '-'} | {r['ppl']:.3f} | "
            f"{_pct(r.get('gap_closed_ppl'))} | {r['acc']:.3f} | {_pct(r.get('gap_closed_acc'))} | "
            f"{r['params']:,} | {_secs(r.get('compensate_seconds'))} |"
        )
    g = p["goal"]
    lines += [
        "",
        "`compensate s`: one call at the largest rank (calibration pass included; the smaller ranks are its exact "
        "prefixes). Weight space needs no calibration.",
        "",
        f"Goal: activation space r=32 closes >= 30 % of the SparseGPT 2:4 perplexity gap: "
        f"{_pct(g['sparsegpt_2:4_activation_r32_gap_closed'])} ({'met' if g['met'] else 'not met'}), "
        f"in {g['seconds'] or 0:.1f} s.",
        f"Activation beats weight space (perplexity) at every rank: {g['activation_beats_weight_everywhere']} "
        f"({g['activation_beats_weight_ppl']}).",
        "",
        f"Wall time {p['wall_seconds'] / 60:.1f} min. Command: `python bench/recovery.py"
        f"{' --quick' if p['settings']['quick'] else ''}`.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
