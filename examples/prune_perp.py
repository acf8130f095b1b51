"""Prune the embedded model to 50 % with Wanda, then recover quality with PERP (parameter-efficient retraining).

PERP trains a small subset (here LoRA factors whose update is masked by the pruning mask, plus
norms and biases), merges it back and the model is still exactly 50 % sparse. Reports held-out
wiki perplexity dense / pruned / retrained and the share of the gap closed.

    python examples/prune_perp.py [--steps 40] [--smoke]
"""

from __future__ import annotations

from _common import elapsed, load, parse_args

from adapterlab import run_perp_pipeline


def main() -> None:
    args = parse_args(__doc__, steps=40)
    model, tok = load(args.smoke)
    res = run_perp_pipeline(
        model,
        tok,
        method="wanda",
        sparsity=0.5,
        scope="mask_lora",
        r=4,
        steps=args.steps,
        lr=5e-4,
        batch_size=2,
        seqlen=64 if args.smoke else 256,
        calib_samples=4 if args.smoke else 16,
        calib_seqlen=64 if args.smoke else 256,
        eval_seqlen=64 if args.smoke else 512,
        eval_windows=2 if args.smoke else 10,
    )
    print(f"wiki perplexity: dense {res.ppl_dense:.2f}  pruned {res.ppl_pruned:.2f}  retrained {res.ppl_retrained:.2f}")
    gap = res.gap_closed
    print(
        f"gap closed {gap:.1%}" if gap is not None else "gap closed: n/a",
        f"| trainable {res.trainable:,d} ({res.trainable_fraction:.2%}) | sparsity after merge {res.sparsity_after_merge:.2%}",
    )
    print(f"done in {elapsed()}")


if __name__ == "__main__":
    main()
