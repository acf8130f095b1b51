"""Multi-adapter serving throughput: merged single adapter vs peft mixed batch vs adapterlab.

What is measured (forward-only throughput on a fixed token batch): a workload of ``--requests`` R
requests of ``--tokens`` T tokens each (default 1024 x 1: one decode step of 1024 concurrent requests,
no KV cache), run in forwards of ``--batch`` rows; request i uses adapter ``i mod n`` for a pool of
n = 1, 10, 100, 1000 distinct adapters. tokens/s = R*T / wall time of the whole workload. Arms:

* ``merged``   — the base with one adapter merged into its weights (the ceiling: plain base cost);
* ``peft``     — peft's mixed-batch inference, ``model(..., adapter_names=[...])`` with all n adapters
  loaded (capped at ``--peft-max``: building a PeftModel with 1000 adapters is too slow/large here);
* ``grouped``  — adapterlab ``AdapterServer`` grouped LoRA (all n adapters resident in the bank);
* ``shared_full`` / ``shared_diag`` — adapterlab shared basis (one ``x Vᵀ`` GEMM, per-request core,
  one ``Uᵀ`` GEMM) with rank ``--core-rank`` (full ``c×c`` cores) / ``--diag-rank`` (diagonal cores).

Adapters are synthetic random rank-``--rank`` LoRAs on ``--targets`` with the embedded model's
shapes (throughput does not depend on their values); bundles are random bases + cores of the same
shapes. Storage compares the bundle with the raw LoRAs (fp32 parameters). Timing is interleaved:
every repeat runs all arms back to back, after one warm-up round; medians and ratios are reported.

Run: ``python bench/serving.py`` (CPU, embedded model) or ``python bench/serving.py --device cuda
--model synthetic --tokens 16 --peft-max 1000`` (needs only torch, transformers, peft, safetensors).
``--quick`` is a smoke run on a tiny model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import write_json, write_markdown  # noqa: E402

EMBEDDED_SHAPES = dict(  # SmolLM2-135M-Instruct (the embedded default model)
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
)
QUICK_SHAPES = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=True,
)


def build_model(kind: str, dtype: torch.dtype, device: str, layers: int | None, quick: bool) -> torch.nn.Module:
    if kind == "default" and not quick:
        from adapterlab.models import load_default_model

        model = load_default_model()[0]
        if layers is not None:
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        shapes = dict(QUICK_SHAPES if quick else EMBEDDED_SHAPES)
        if layers is not None:
            shapes["num_hidden_layers"] = layers
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**shapes, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    return model.to(device=device, dtype=dtype).eval()


def target_modules(model: torch.nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    return {
        n: tuple(m.weight.shape)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
    }


def lora_factors(i: int, shapes: dict[str, tuple[int, int]], r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adapter i's synthetic factors ``{module: (B [d_out, r], A [r, d_in])}`` (scale 1), seeded by i."""
    g = torch.Generator().manual_seed(10_000 + i)
    return {
        m: (torch.randn(d_out, r, generator=g) * 0.02, torch.randn(r, d_in, generator=g) * 0.02)
        for m, (d_out, d_in) in shapes.items()
    }


def synthetic_bundle(n: int, shapes: dict[str, tuple[int, int]], c: int, mode: str, r: int) -> Any:
    from adapterlab.compression import CompressionErrors, SharedBasisBundle

    g = torch.Generator().manual_seed(7)
    mods = list(shapes)
    bases = {
        m: (
            torch.linalg.qr(torch.randn(d_out, c, generator=g))[0][None],
            torch.linalg.qr(torch.randn(d_in, c, generator=g))[0].T.contiguous()[None],
        )
        for m, (d_out, d_in) in shapes.items()
    }
    cores = {
        m: (torch.randn(n, c, c, generator=g) if mode == "full" else torch.randn(n, c, generator=g)) * 1e-3
        for m in mods
    }
    names = [f"a{i}" for i in range(n)]
    raw = sum(r * (d_out + d_in) for d_out, d_in in shapes.values())
    return SharedBasisBundle(
        names=names,
        mode=mode,
        rank=c,
        module_names=mods,
        shapes=dict(shapes),
        bases=bases,
        cores=cores,
        group=torch.zeros(n, dtype=torch.long),
        norms={m: torch.ones(n) for m in mods},
        errors=CompressionErrors(names, mods, torch.zeros(n, len(mods), dtype=torch.float64)),
        raw_params=[raw] * n,
    )


def build_peft(base: torch.nn.Module, n: int, shapes: dict[str, tuple[int, int]], r: int, targets: list[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0)
    pm = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", cfg)
    with torch.no_grad():
        for i in range(n):
            for mod, (b, a) in lora_factors(i, shapes, r).items():
                layer = pm.base_model.model.get_submodule(mod)
                layer.lora_A[f"a{i}"].weight.copy_(a)
                layer.lora_B[f"a{i}"].weight.copy_(b)
    return pm.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on a tiny model")
    ap.add_argument("--model", choices=["default", "synthetic"], default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    ap.add_argument(
        "--skip-lm-head",
        action="store_true",
        help="replace the vocabulary projection by a 1-output linear (time the decoder stack only)",
    )
    ap.add_argument("--pools", default="1,10,100,1000", help="distinct adapters per workload")
    ap.add_argument("--requests", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per request")
    ap.add_argument("--batch", type=int, default=1024, help="rows per forward")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--core-rank", type=int, default=32, help="shared rank c of the full-core bundle")
    ap.add_argument("--diag-rank", type=int, default=64, help="shared rank c of the diagonal-core bundle (0 = skip)")
    ap.add_argument("--peft-max", type=int, default=100, help="largest pool run through peft")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None, help="results file stem (default serving, serving_quick)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.pools, args.requests, args.batch, args.tokens = "1,10,40", 40, 40, 2
        args.rank, args.core_rank, args.diag_rank, args.repeats = 4, 8, 8, 3
    name = args.name or ("serving_quick" if args.quick else "serving")
    dtype = getattr(torch, args.dtype)
    pools = [int(p) for p in args.pools.split(",")]
    targets = args.targets.split(",")

    from adapterlab.serving import AdapterServer

    base = build_model(args.model, dtype, args.device, args.layers, args.quick)
    if args.skip_lm_head:  # same for every arm: removes a cost no adapter touches
        base.lm_head = torch.nn.Linear(base.config.hidden_size, 1, bias=False).to(device=args.device, dtype=dtype)
        base.config.tie_word_embeddings = False
    shapes = target_modules(base, targets)
    vocab = base.config.vocab_size
    R, T = args.requests, args.tokens
    ids = torch.randint(3, vocab, (R, T), generator=torch.Generator().manual_seed(0)).to(args.device)
    chunks = [(s, min(s + args.batch, R)) for s in range(0, R, args.batch)]
    peft_n = min(args.peft_max, max(p for p in pools))
    t0 = time.perf_counter()
    peft_model = build_peft(base, peft_n, shapes, args.rank, targets) if peft_n > 0 else None
    peft_build_s = time.perf_counter() - t0
    merged = copy.deepcopy(base)
    with torch.no_grad():  # merge adapter a0 into the weights (cost = plain base)
        for mod, (b, a) in lora_factors(0, shapes, args.rank).items():
            w = merged.get_submodule(mod).weight
            w += (b @ a).to(device=w.device, dtype=w.dtype)

    rows: list[dict[str, Any]] = []
    for n in pools:
        names = [f"a{i % n}" for i in range(R)]
        server = AdapterServer(copy.deepcopy(base), capacity=n, max_batch_size=args.batch)
        t0 = time.perf_counter()
        for i in range(n):
            server.load(f"a{i}", lora_factors(i, shapes, args.rank))
        load_s = time.perf_counter() - t0
        storage = {}
        bundles = {"shared_full": ("full", args.core_rank)}
        if args.diag_rank:
            bundles["shared_diag"] = ("diagonal", args.diag_rank)
        for arm, (mode, c) in bundles.items():
            b = synthetic_bundle(n, shapes, c, mode, args.rank)
            storage[arm] = b.storage()
            server.add_bundle(b, key=arm, prefix=f"{arm}/")

        @torch.no_grad()
        def run_server(prefix: str, server=server, names=names) -> None:
            for s, e in chunks:
                server.forward(ids[s:e], adapters=[prefix + x for x in names[s:e]])

        @torch.no_grad()
        def run_merged() -> None:
            for s, e in chunks:
                merged(input_ids=ids[s:e])

        @torch.no_grad()
        def run_peft(names=names) -> None:
            for s, e in chunks:
                peft_model(input_ids=ids[s:e], adapter_names=names[s:e])

        arms: dict[str, Callable[[], None]] = {"merged": run_merged}
        if peft_model is not None and n <= peft_n:
            arms["peft"] = run_peft
        arms["grouped"] = lambda: run_server("")
        for arm in bundles:
            arms[arm] = (lambda p: lambda: run_server(p))(f"{arm}/")
        times: dict[str, list[float]] = {a: [] for a in arms}
        for rep in range(args.repeats + 1):  # round 0 = warm-up
            for arm, fn in arms.items():
                sync(args.device)
                t = time.perf_counter()
                fn()
                sync(args.device)
                if rep:
                    times[arm].append(time.perf_counter() - t)
            print(f"pool {n}: round {rep} done", file=sys.stderr, flush=True)
        med = {a: statistics.median(v) for a, v in times.items()}
        tps = {a: R * T / med[a] for a in med}
        row = {
            "pool": n,
            "times_s": times,
            "median_s": med,
            "tokens_per_s": tps,
            "vs_merged": {a: tps[a] / tps["merged"] for a in tps},
            "vs_peft": ({a: tps[a] / tps["peft"] for a in tps} if "peft" in tps else None),
            "adapter_load_s": load_s,
            "storage": storage,
        }
        rows.append(row)
        print(f"pool {n}: " + ", ".join(f"{a} {tps[a]:.0f} tok/s" for a in tps), file=sys.stderr, flush=True)
        del server
        gc.collect()

    settings = {k: v for k, v in vars(args).items()}
    settings.update(
        {
            "workload": f"{R} requests x {T} tokens, forwards of {args.batch} rows (forward-only, no KV cache"
            + (f", {base.config.num_hidden_layers} decoder layers" if args.layers else "")
            + (", vocabulary projection skipped" if args.skip_lm_head else "")
            + ")",
            "peft_adapters_loaded": peft_n,
            "peft_build_s": peft_build_s,
            "targets": targets,
            "n_target_modules": len(shapes),
        }
    )
    write_json(name, {"benchmark": "serving", "settings": settings, "rows": rows})
    arms_all = ["merged", "peft", "grouped", "shared_full", "shared_diag"]
    lines = [
        f"# Multi-adapter serving throughput ({'quick' if args.quick else args.model} model, {args.device}, {args.dtype})",
        "",
        f"Workload: {settings['workload']}; LoRA rank {args.rank} on {','.join(targets)} "
        f"({len(shapes)} modules); shared basis full c={args.core_rank}, diagonal c={args.diag_rank}; "
        f"median of {args.repeats} interleaved repeats after a warm-up; peft capped at {peft_n} adapters.",
        "",
        "| adapters | " + " | ".join(f"{a} tok/s" for a in arms_all) + " | shared_full / merged | shared_full / peft "
        "| grouped / merged | storage ratio full | storage ratio diag |",
        "|" + "---|" * (len(arms_all) + 6),
    ]
    for row in rows:
        t, vm, vp, st = row["tokens_per_s"], row["vs_merged"], row["vs_peft"], row["storage"]
        cells = [f"{t[a]:.0f}" if a in t else "n/a" for a in arms_all]
        lines.append(
            f"| {row['pool']} | "
            + " | ".join(cells)
            + f" | {vm['shared_full']:.2f} | "
            + (f"{vp['shared_full']:.2f}" if vp else "n/a")
            + f" | {vm['grouped']:.2f} | "
            + f"{st['shared_full']['ratio']:.1f}x | "
            + (f"{st['shared_diag']['ratio']:.1f}x" if "shared_diag" in st else "n/a")
            + " |"
        )
    lines += [
        "",
        "Goals: shared basis >= 0.8x merged at 1000 adapters and >= 2x peft's mixed batch; "
        "storage >= 10x smaller than the raw LoRAs.",
        "",
    ]
    write_markdown(name, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
