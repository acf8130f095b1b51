"""Prune the embedded model to 50 % (Wanda), then train SPP and LoRS adapters that keep it 50 % sparse.

Both adapters' deltas are masked by the pruned base's zeros, so after ``merge_and_unload`` every
pruned weight is still exactly zero (checked here). Sentiment task; q_proj/v_proj of the last 8
decoder layers.

    python examples/train_sparsity_preserving.py [--steps 20] [--smoke]
"""

from __future__ import annotations

import peft
from _common import accuracy, elapsed, load, parse_args, targets, train, trainable

from adapterlab import LorsConfig, SppConfig, data, prune_, sparsity_report
from adapterlab.demo import zeros_kept


def main() -> None:
    args = parse_args(__doc__, steps=60)
    base, tok = load(args.smoke)
    calib = data.calibration_ids(tok, n_samples=4 if args.smoke else 16, seqlen=64 if args.smoke else 512)
    report = prune_(base, "wanda", 0.5, calibration=calib)
    print(
        f"wanda: {report.global_sparsity:.2%} sparse in {report.seconds:.0f} s; "
        f"sentiment accuracy {accuracy(base, tok, 'sentiment', args.eval_n):.3f}"
    )
    pruned = {k: v.clone() for k, v in base.state_dict().items()}
    rx = targets(base, args.smoke)
    configs = {
        "SPP": SppConfig(r=8, lora_alpha=16, lora_dropout=0.0, groups=8, target_modules=rx),
        "LoRS r8": LorsConfig(r=8, lora_alpha=2.0 * 8**0.5, target_modules=rx),
    }
    for label, config in configs.items():
        base.load_state_dict(pruned)
        model = peft.get_peft_model(base, config)
        n = trainable(model)
        train(model, tok, "sentiment", steps=args.steps)
        acc = accuracy(model, tok, "sentiment", args.eval_n)
        merged = model.merge_and_unload()
        kept = zeros_kept(pruned, merged)
        print(
            f"{label:8s} trainable {n:>8,d}  accuracy {acc:.3f}  merged sparsity {sparsity_report(merged).global_sparsity:.2%}"
            f"  every pruned zero kept: {kept}",
            flush=True,
        )
        base = merged
    print(f"done in {elapsed()}")


if __name__ == "__main__":
    main()
