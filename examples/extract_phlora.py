"""Extract a LoRA from a full fine-tune (PHLoRA) on the embedded model and check it keeps the gain.

Fine-tunes every weight of the attention and MLP projections of all decoder layers (``--layers N``:
the last N only) on the sentiment task, extracts a LoRA by truncated SVD of each weight difference (the smallest rank
keeping 90 % of its energy, at most 64), and compares the base, the fine-tune and base + extracted
LoRA. Also writes the singular-value energy plot (needs matplotlib).

    python examples/extract_phlora.py [--steps 40] [--layers N] [--lr 1e-4] [--smoke]
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import peft
from _common import accuracy, elapsed, load, parse_args, train

from adapterlab import extract_lora


def main() -> None:
    args = parse_args(
        __doc__,
        steps=40,
        layers=(0, "fine-tune the projections of the last N layers (0 = all)"),
        lr=(1e-4, "AdamW learning rate of the full fine-tune"),
    )
    base, tok = load(args.smoke)
    tuned = copy.deepcopy(base)
    n_layers = tuned.config.num_hidden_layers
    last = 1 if args.smoke else (args.layers or n_layers)
    for name, p in tuned.named_parameters():  # full fine-tune of the projections of the last layers
        p.requires_grad = any(f"layers.{i}." in name for i in range(n_layers - last, n_layers)) and name.endswith(
            "proj.weight"
        )
    train(tuned, tok, "sentiment", steps=args.steps, lr=args.lr)
    print(f"base        accuracy {accuracy(base, tok, 'sentiment', args.eval_n):.3f}")
    print(f"full tune   accuracy {accuracy(tuned, tok, 'sentiment', args.eval_n):.3f}")
    res = extract_lora(base, tuned, energy=0.9, max_rank=64, extras="skip")
    out = Path(tempfile.mkdtemp(prefix="adapterlab-phlora-")) / "phlora"
    res.save(out)
    ranks = sorted(set(res.ranks.values()))
    model = peft.PeftModel.from_pretrained(base, str(out))
    print(
        f"PHLoRA      accuracy {accuracy(model, tok, 'sentiment', args.eval_n):.3f}  ({len(res.ranks)} modules, "
        f"ranks {ranks[0]}..{ranks[-1]}, {res.n_params():,d} params, energy kept {res.global_energy:.1%})"
    )
    try:
        from adapterlab.plots import plot_extraction_energy

        print(f"plot: {plot_extraction_energy(res, out.parent / 'phlora_energy.png')}")
    except ImportError:
        print("install matplotlib for the energy plot")
    print(f"adapter in {out}; done in {elapsed()}")


if __name__ == "__main__":
    main()
