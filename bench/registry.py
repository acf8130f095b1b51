"""Benchmark: loading one adapter from the registry vs ``PeftModel.from_pretrained`` of the same folder.

    python bench/registry.py [--rank 16] [--repeat 5]     # embedded SmolLM2-135M
    python bench/registry.py --quick                      # tiny model, smoke run

A LoRA adapter (rank ``--rank`` on q/k/v/o/gate/up/down) is put into a fresh registry with its base
fingerprint, then each round loads it, the cases interleaved in a rotating order, onto the same base
model (``unload()`` restores the base between loads, untimed):

- ``peft``: ``PeftModel.from_pretrained(model, <object folder>)`` (no hash or base check; the anchor);
- ``registry cold``: a fresh ``AdapterRegistry(root)`` and ``load(name, model)``: resolve, re-hash every
  file, fingerprint the model and compare it with the recorded base, then the same peft load;
- ``registry warm``: the same registry with the model's fingerprint already known
  (``load(..., fingerprint=fp)``, what a server does after its first adapter): hashes still checked.

The page cache cannot be dropped here, so "cold" means a fresh registry object and a full check, not
a cold disk; the very first load of each kind in the process is reported separately. Also reported:
the parts (hash verification, base fingerprint) and the time of ``put``. Timings are medians of
``--repeat`` rounds after one warm-up round; ratios are registry / peft within the same rounds.
Writes bench/results/registry.json and registry.md (``registry_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import write_json, write_markdown  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(quick: bool) -> torch.nn.Module:
    if quick:
        from adapterlab.models import tiny_llama

        return tiny_llama(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    from adapterlab.models import load_default_model

    return load_default_model()[0]


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, PeftModel, get_peft_model

    from adapterlab.io import base_fingerprint
    from adapterlab.registry import AdapterRegistry

    torch.manual_seed(0)
    model = _model(args.quick)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    src = tmp / "adapter"
    pm = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, init_lora_weights=False)
    )
    pm.save_pretrained(str(src))
    model = pm.unload()

    t_fp, fp = _timed(lambda: base_fingerprint(model))
    root = tmp / "hub"
    t_put, digest = _timed(lambda: AdapterRegistry(root).put(src, "bench", base=fp, provenance={"kind": "trained"}))
    folder = root / "objects" / digest
    adapter_bytes = sum(f.stat().st_size for f in folder.iterdir())
    warm_reg = AdapterRegistry(root)

    def peft_load() -> Any:
        return PeftModel.from_pretrained(model, str(folder))

    def cold_load() -> Any:
        return AdapterRegistry(root).load("bench", model)

    def warm_load() -> Any:
        return warm_reg.load("bench", model, fingerprint=fp)

    cases = {"peft": peft_load, "registry cold": cold_load, "registry warm": warm_load}
    first: dict[str, float] = {}
    raw: dict[str, list[float]] = {k: [] for k in cases}
    parts: dict[str, list[float]] = {"verify hashes (get)": [], "base fingerprint": []}
    names = list(cases)
    x = torch.arange(16).reshape(1, 16) % 100
    anchor = peft_load()
    with torch.no_grad():
        ref_out = anchor(input_ids=x).logits
    anchor.unload()
    for rnd in range(args.repeat + 1):  # round 0 is the warm-up
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            dt, out = _timed(cases[name])
            with torch.no_grad():
                if rnd == 0:
                    assert torch.equal(out(input_ids=x).logits, ref_out), f"{name}: output differs from peft"
            out.unload()
            if name not in first:
                first[name] = dt
            if rnd > 0:
                raw[name].append(dt)
        if rnd > 0:
            parts["verify hashes (get)"].append(_timed(lambda: warm_reg.get("bench"))[0])
            parts["base fingerprint"].append(_timed(lambda: base_fingerprint(model))[0])
    med = {k: statistics.median(v) for k, v in raw.items()}
    ratio = {k: med[k] / med["peft"] for k in med}
    return {
        "benchmark": "registry",
        "settings": {
            "model": "tiny" if args.quick else "embedded SmolLM2-135M-Instruct",
            "rank": args.rank,
            "targets": TARGETS,
            "repeat": args.repeat,
            "warmup": 1,
            "adapter_bytes": adapter_bytes,
            "n_files": len(list(folder.iterdir())),
        },
        "put_s": t_put,
        "first_fingerprint_s": t_fp,
        "first_call_s": first,
        "raw_s": raw,
        "median_s": med,
        "ratio_vs_peft": ratio,
        "parts_raw_s": parts,
        "parts_median_s": {k: statistics.median(v) for k, v in parts.items()},
    }


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [
        f"## Registry: load one adapter ({s['model']}, LoRA r={s['rank']} on {len(s['targets'])} projections, "
        f"{s['adapter_bytes'] / 2**20:.1f} MiB)",
        "",
        "| case | median load (s) | x peft | first call in process (s) |",
        "|---|---:|---:|---:|",
    ]
    for k in res["median_s"]:
        lines.append(
            f"| {k} | {res['median_s'][k]:.3f} | {res['ratio_vs_peft'][k]:.2f} | {res['first_call_s'][k]:.3f} |"
        )
    lines += ["", "| part | median (s) |", "|---|---:|"]
    for k, v in res["parts_median_s"].items():
        lines.append(f"| {k} | {v:.3f} |")
    lines.append(f"| put (copy + hash + NaN check + manifest) | {res['put_s']:.3f} |")
    lines += [
        "",
        f"Median of {s['repeat']} interleaved rounds after a warm-up; `cold` = fresh AdapterRegistry + "
        "full checks (hashes + base fingerprint), `warm` = fingerprint known, hashes still checked.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 rounds: a smoke run")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.quick:
        args.repeat = min(args.repeat, 3)
    res = run(args)
    name = "registry_quick" if args.quick else "registry"
    write_json(name, res)
    text = markdown(res)
    write_markdown(name, text)
    print(text)


if __name__ == "__main__":
    main()
