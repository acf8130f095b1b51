"""Foundation benchmark: perplexity of the embedded model dense, pruned and quantized; pruning time.

Run:  python bench/foundation.py            (24 wiki test windows of 512 tokens, 64 x 512 calibration)
      python bench/foundation.py --quick    (a smoke run: few windows, small calibration)

Writes bench/results/foundation.json and bench/results/foundation.md. The embedded model's weights
sit on a 4-bit grid (dequantized from GGUF Q4_1): its 4-bit results are optimistic.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterlab import data, evaluate, models  # noqa: E402
from adapterlab.pruning import prune_  # noqa: E402
from adapterlab.quant import load_quantized  # noqa: E402
from bench._common import timed, write_json, write_markdown  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument(
        "--eval-windows",
        type=int,
        default=24,
        help="first K 512-token windows of the wiki test split (0 = all 81; ~4 min per model on 2 cores)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed pruning repeats (median reported)")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--patterns", default="unstructured,2:4")
    ap.add_argument(
        "--timing-only",
        action="store_true",
        help="time pruning only (no perplexity, no quantized rows); writes foundation_timing.*",
    )
    args = ap.parse_args()
    if args.quick:
        args.nsamples, args.calib_seqlen, args.eval_windows, args.repeats = 4, 128, 4, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    log = logging.getLogger("bench.foundation")

    tok = models.load_tokenizer(None)
    ids = data.eval_ids(tok, corpus="wiki", split="test")
    calib = data.calibration_ids(tok, n_samples=args.nsamples, seqlen=args.calib_seqlen, seed=0, corpus="wiki")
    windows = args.eval_windows or None

    def ppl(model: torch.nn.Module) -> float:
        return evaluate.perplexity(model, ids, seqlen=args.eval_seqlen, max_windows=windows)

    rows: list[dict] = []
    start = time.perf_counter()
    dense = models.load_model(None)
    if not args.timing_only:
        rows.append(
            {
                "config": "dense",
                "method": None,
                "pattern": None,
                "ppl": ppl(dense),
                "sparsity": evaluate.sparsity_report(dense).global_sparsity,
            }
        )
        log.info("dense ppl %.3f", rows[-1]["ppl"])
    del dense

    # warm-up: one untimed prune on a tiny model so lazy imports/allocations are not timed
    prune_(models.tiny_llama(), "magnitude", 0.5)
    for pattern in args.patterns.split(","):
        pat = None if pattern == "unstructured" else pattern
        for method in args.methods.split(","):
            holder: dict[str, torch.nn.Module] = {}

            def run(holder=holder, method=method, pat=pat) -> object:
                model = models.load_model(None)
                holder["model"] = model
                return prune_(
                    model,
                    method,
                    None if pat else 0.5,
                    pattern=pat,
                    calibration=None if method == "magnitude" else calib,
                )

            median, times, report = timed(run, repeats=args.repeats, warmup=0)
            model = holder["model"]
            rep = evaluate.sparsity_report(model, pattern=pat)
            row = {
                "config": f"{method} {pattern if pat else '50%'}",
                "method": method,
                "pattern": pattern,
                "ppl": None if args.timing_only else ppl(model),
                "sparsity": rep.global_sparsity,
                "nm_valid": rep.nm_valid,
                "prune_seconds_median": median,
                "prune_seconds_all": times,
            }
            rows.append(row)
            log.info("%s ppl %s sparsity %.4f time %.1fs", row["config"], row["ppl"], row["sparsity"], median)
            del model, holder

    for bits, qt in () if args.timing_only else ((4, "nf4"), (4, "fp4"), (8, None)):
        kw = {"quant_type": qt} if qt else {}
        model = load_quantized(None, bits=bits, **kw)
        name = f"bnb {bits}-bit{' ' + qt if qt else ''}"
        rows.append(
            {
                "config": name,
                "method": "bitsandbytes",
                "pattern": None,
                "ppl": ppl(model),
                "sparsity": None,
                "note": "base weights already on a 4-bit grid (GGUF Q4_1): optimistic",
            }
        )
        log.info("%s ppl %.3f", name, rows[-1]["ppl"])
        del model

    n_windows = min(ids.numel() // args.eval_seqlen, windows or 10**9)
    settings = {
        "model": models.DEFAULT_MODEL_ID,
        "eval": {
            "corpus": "wiki",
            "split": "test",
            "seqlen": args.eval_seqlen,
            "windows": n_windows,
            "tokens": n_windows * args.eval_seqlen,
        },
        "calibration": {
            "corpus": "wiki",
            "split": "train",
            "n_samples": args.nsamples,
            "seqlen": args.calib_seqlen,
            "seed": 0,
        },
        "repeats": args.repeats,
        "quick": args.quick,
        "dtype": "float32",
        "total_seconds": time.perf_counter() - start,
    }
    name = "foundation_quick" if args.quick else "foundation_timing" if args.timing_only else "foundation"
    path = write_json(name, {"benchmark": "foundation", "settings": settings, "rows": rows})
    md = ["| config | wiki ppl | sparsity | N:M valid | prune time (median s) |", "|---|---:|---:|---|---:|"]
    for r in rows:
        sp = "" if r["sparsity"] is None else f"{r['sparsity']:.2%}"
        nm = "" if r.get("nm_valid") is None else str(r["nm_valid"])
        t = f"{r['prune_seconds_median']:.1f}" if "prune_seconds_median" in r else ""
        ppl_s = "" if r["ppl"] is None else f"{r['ppl']:.2f}"
        md.append(f"| {r['config']} | {ppl_s} | {sp} | {nm} | {t} |")
    write_markdown(name, "\n".join(md) + "\n")
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
