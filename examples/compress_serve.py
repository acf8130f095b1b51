"""Compress three task adapters into one shared basis and serve a mixed batch (embedded model).

Trains a LoRA for each task (sentiment, domain, compare), compresses them into per-module shared
bases with small per-adapter cores, then serves one batch in which every request names its own
adapter (or the base), with adapterlab's AdapterServer. Prints the compression ratio and error,
each request's completion, and the batch's throughput.

    python examples/compress_serve.py [--steps 15] [--smoke]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import peft
from _common import elapsed, load, parse_args, targets, train

from adapterlab import AdapterServer, Request, compress_adapters, data

TASKS = ("sentiment", "domain", "compare")


def main() -> None:
    args = parse_args(__doc__, steps=30)
    base, tok = load(args.smoke)
    out = Path(tempfile.mkdtemp(prefix="adapterlab-compress-"))
    rx = targets(base, args.smoke)
    dirs = {}
    for task in TASKS:
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=rx))
        train(model, tok, task, steps=args.steps)
        model.save_pretrained(out / task)
        dirs[task] = str(out / task)
        base = model.unload()

    bundle = compress_adapters(dirs, rank=12, mode="full")
    bundle.save(out / "bundle")
    st = bundle.storage()
    print(
        f"shared basis c=12 for {st['adapters']} adapters: {st['raw_params']:,d} -> {st['compressed_params']:,d} params "
        f"({st['ratio']:.2f}x), mean relative error {bundle.errors.mean:.1%}"
    )

    server = AdapterServer(base, tokenizer=tok)
    names = server.add_bundle(out / "bundle")
    requests = []
    for i, adapter in enumerate([None, *names, *names]):
        task = data.get_task(adapter or "sentiment")
        ex = task.examples("test", n=8, seed=0)[i % 8]
        requests.append(Request(task.prompt(ex.text), adapter=adapter, max_new_tokens=4))
    t = time.perf_counter()
    completions = server.generate(requests)
    seconds = time.perf_counter() - t
    for r, c in zip(requests, completions):
        print(f"  [{c.adapter or 'base':9s}] {r.prompt[-48:]!r:52s} -> {c.text!r}")
    tokens = sum(len(c.tokens) for c in completions)
    print(f"{len(requests)} requests over {len(names) + 1} adapters in one batch: {tokens / seconds:.1f} tokens/s")
    print(f"done in {elapsed()}")


if __name__ == "__main__":
    main()
