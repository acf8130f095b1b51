"""Train the low-rank tuners on the embedded model: LoRA, rsLoRA, DyLoRA and LoRI-D (sentiment task).

Each adapter adapts q_proj/v_proj of the last 8 decoder layers and trains with transformers' Trainer.
DyLoRA trains every rank 1..8 at once (its callback samples a rank per step) and is then scored
truncated to ranks 2, 4 and 8; LoRI keeps A frozen and random and trains only B.

    python examples/train_lowrank.py [--steps 20] [--smoke]
"""

from __future__ import annotations

import peft
from _common import accuracy, elapsed, load, parse_args, targets, train, trainable

from adapterlab import DyLoraConfig, LoriConfig
from adapterlab.callbacks import DyLoraCallback


def main() -> None:
    args = parse_args(__doc__, steps=30)
    base, tok = load(args.smoke)
    rx = targets(base, args.smoke)
    print(f"zero-shot sentiment accuracy: {accuracy(base, tok, 'sentiment', args.eval_n):.3f}")
    configs = {
        "LoRA r8": (peft.LoraConfig(r=8, lora_alpha=16, target_modules=rx), []),
        "rsLoRA r8": (peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=rx), []),
        "DyLoRA r1..8": (DyLoraConfig(r=8, lora_alpha=16, frozen_mode=False, target_modules=rx), [DyLoraCallback()]),
        "LoRI-D r8": (LoriConfig(r=8, lora_alpha=16, variant="D", task="sentiment", target_modules=rx), []),
    }
    for label, (config, callbacks) in configs.items():
        model = peft.get_peft_model(base, config)
        train(model, tok, "sentiment", steps=args.steps, callbacks=callbacks)
        line = f"{label:13s} trainable {trainable(model):>8,d}  accuracy {accuracy(model, tok, 'sentiment', args.eval_n):.3f}"
        if label.startswith("DyLoRA"):
            tuner = model.base_model
            scores = []
            for k in (2, 4):
                tuner.set_rank(k)
                scores.append(f"r{k} {accuracy(model, tok, 'sentiment', args.eval_n):.3f}")
            tuner.set_rank(8)
            line += "  truncated: " + ", ".join(scores)
        print(line, flush=True)
        base = model.unload()  # the untouched base for the next adapter
    print(f"done in {elapsed()}")


if __name__ == "__main__":
    main()
