"""Train the sparse tuners on the embedded model: SHiRA (a sparse set of weight entries) and SNELL (sentiment task).

SHiRA trains a fixed sparse set of entries of each target weight ("wm": the largest-magnitude
entries, a LoRA r=8 parameter budget: a few % of each weight); SNELL learns a low-rank, kernelised update and keeps only
its largest entries per layer. Both adapt q_proj/v_proj of the last 8 decoder layers.

    python examples/train_sparse.py [--steps 20] [--smoke]
"""

from __future__ import annotations

import peft
from _common import accuracy, elapsed, load, parse_args, targets, train, trainable

from adapterlab import ShiraConfig, SnellConfig


def main() -> None:
    args = parse_args(__doc__, steps=30)
    base, tok = load(args.smoke)
    rx = targets(base, args.smoke)
    print(f"zero-shot sentiment accuracy: {accuracy(base, tok, 'sentiment', args.eval_n):.3f}")
    configs = {
        "SHiRA wm (r=8 budget)": (ShiraConfig(mask_type="wm", r=8, target_modules=rx), 5e-3),
        "SNELL r8, 30% sparse": (SnellConfig(r=8, sparsity=0.3, target_modules=rx), 2e-3),
    }
    for label, (config, lr) in configs.items():
        model = peft.get_peft_model(base, config)
        adapted = sum(
            m.weight.numel() for n, m in model.named_modules() if n.endswith(("q_proj.base_layer", "v_proj.base_layer"))
        )
        n = trainable(model)
        train(model, tok, "sentiment", steps=args.steps, lr=lr)
        acc = accuracy(model, tok, "sentiment", args.eval_n)
        print(
            f"{label:22s} trainable {n:>8,d} ({n / max(adapted, 1):.2%} of the adapted weights)  accuracy {acc:.3f}",
            flush=True,
        )
        base = model.unload()
    print(f"done in {elapsed()}")


if __name__ == "__main__":
    main()
