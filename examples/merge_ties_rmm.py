"""Merge two task adapters with TIES and with RMM (sentiment + domain LoRAs on the embedded model).

Trains one LoRA per task, then: TIES merges them into one adapter (trim to 20 % density, elect
signs, disjoint mean); RMM stores them in a shared basis from which each task's adapter is
reconstructed. Prints each model's accuracy on both tasks.

    python examples/merge_ties_rmm.py [--steps 20] [--smoke]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import peft
from _common import accuracy, elapsed, load, parse_args, targets, train

from adapterlab import merge_adapters

TASKS = ("sentiment", "domain")


def main() -> None:
    args = parse_args(__doc__, steps=30)
    base, tok = load(args.smoke)
    out = Path(tempfile.mkdtemp(prefix="adapterlab-merge-"))
    rx = targets(base, args.smoke)

    def score(model, label):
        accs = "  ".join(f"{t} {accuracy(model, tok, t, args.eval_n):.3f}" for t in TASKS)
        print(f"{label:24s} {accs}", flush=True)

    score(base, "base (zero-shot)")
    dirs = {}
    for task in TASKS:
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=rx))
        train(model, tok, task, steps=args.steps)
        score(model, f"LoRA {task}")
        model.save_pretrained(out / task)
        dirs[task] = str(out / task)
        base = model.unload()

    ties = merge_adapters(dirs, "ties", density=0.2)
    ties.save(out / "ties")
    model = peft.PeftModel.from_pretrained(base, str(out / "ties"))
    score(model, "TIES merge (one adapter)")
    base = model.unload()

    rmm = merge_adapters(dirs, "rmm")
    for task in TASKS:
        rmm.reconstruct(task).save(out / f"rmm-{task}")
        model = peft.PeftModel.from_pretrained(base, str(out / f"rmm-{task}"))
        score(model, f"RMM -> {task}")
        base = model.unload()
    print(f"adapters in {out}; done in {elapsed()}")


if __name__ == "__main__":
    main()
