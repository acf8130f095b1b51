"""Benchmark: shared-basis compression of LoRA adapters on the embedded SmolLM2-135M.

    python bench/compression.py            # quality (3 task LoRAs) + storage (100 / 1000 synthetic LoRAs)
    python bench/compression.py --quick    # smoke run: tiny budgets
    python bench/compression.py --parts quality --ranks 8 16 32 48

Quality: one rank-16 LoRA per task of ``adapterlab.data`` (sentiment, domain, compare) on all 7
projections of every layer, trained once and cached under
``~/.cache/adapterlab/bench/task_adapters/`` (shared with bench/merging.py and the serving bench);
the three are compressed jointly at several shared ranks c (full and diagonal), and each adapter's
task accuracy with its reconstructed delta is compared with its own uncompressed LoRA:
``gain kept = (acc_compressed − acc_base) / (acc_lora − acc_base)`` (goal >= 95 %).

Storage: n = 100 and 1000 synthetic rank-16 LoRAs with the embedded model's shapes (each = one of the
trained task LoRAs, its factors rotated by a random r×r orthogonal matrix, plus Gaussian factor noise
of ``--noise`` relative size), over the 7 projections of ``--layers`` decoder layers; real bundles
are fitted and saved, and raw LoRA bytes (fp32) are compared with the bundle's files. Every decoder
layer has the same shapes, so the ratio of the layers measured is the ratio of the whole model.
Baseline for the error: per-LoRA truncated SVD with the same total parameter budget.
Writes bench/results/compression.json and bench/results/compression.md.
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

from bench._common import machine_info, write_json, write_markdown  # noqa: E402

TASKS = ["sentiment", "domain", "compare"]
NAME = "compression"


# ------------------------------------------------------------------------------------------------
# quality


def _task_adapters(steps: int, rank: int, tasks: list[str] | None = None) -> dict[str, Path]:
    from bench.merging import cached_task_lora

    out = {}
    t0 = time.perf_counter()
    for i, task in enumerate(TASKS):
        if tasks is not None and task not in tasks:
            continue
        out[task] = cached_task_lora(task, steps, rank, i)
        print(f"task adapter {task}: {out[task]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


class _Weights:
    """Add a delta to the embedded model's weights and restore the originals afterwards."""

    def __init__(self, model: torch.nn.Module, modules: list[str]) -> None:
        self.model = model
        self.saved = {m: model.get_submodule(m).weight.detach().clone() for m in modules}

    def restore(self) -> None:
        with torch.no_grad():
            for m, w in self.saved.items():
                self.model.get_submodule(m).weight.copy_(w)


def _acc(model: torch.nn.Module, tok: Any, task: str, n: int) -> float:
    from adapterlab.evaluate import task_accuracy

    with torch.no_grad():
        return task_accuracy(model, tok, task, n=n, batch_size=16).accuracy


def bench_quality(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.compression import compress_adapters
    from adapterlab.merging import resolve_adapter
    from adapterlab.models import load_default_model

    dirs = _task_adapters(args.steps, args.lora_rank)
    sources = {t: resolve_adapter(d, name=t) for t, d in dirs.items()}
    model, tok = load_default_model()
    modules = sorted(sources[TASKS[0]].modules)
    state = _Weights(model, modules)
    base = {t: _acc(model, tok, t, args.n_eval) for t in TASKS}
    own = {}
    for t, src in sources.items():
        with torch.no_grad():
            for m in modules:
                w = model.get_submodule(m).weight
                w.copy_((w.float() + src.delta(m)).to(w.dtype))
        own[t] = _acc(model, tok, t, args.n_eval)
        state.restore()
    print("base", base, "own LoRA", own, flush=True)
    rows = []
    configs = [("full", c) for c in args.ranks] + [("diagonal", c) for c in args.diag_ranks]
    for mode, c in configs:
        t0 = time.perf_counter()
        bundle = compress_adapters(dirs, rank=c, mode=mode, niter=args.niter if mode == "full" else args.diag_niter)
        seconds = time.perf_counter() - t0
        for t in TASKS:
            bundle.apply_(model, t)
            acc = _acc(model, tok, t, args.n_eval)
            state.restore()
            gain = own[t] - base[t]
            kept = (acc - base[t]) / gain if abs(gain) > 1e-9 else float("nan")
            st = bundle.storage()
            rows.append(
                {
                    "mode": mode,
                    "c": c,
                    "task": t,
                    "acc_base": base[t],
                    "acc_lora": own[t],
                    "acc_compressed": acc,
                    "gain_kept": round(kept, 4),
                    "rel_sq_error": round(bundle.errors.per_adapter()[t], 5),
                    "core_params_per_adapter": st["core_params_per_adapter"],
                    "raw_params_per_adapter": st["raw_params_per_adapter"],
                    "bundle_vs_raw_3_adapters": round(st["ratio"], 3),
                    "fit_seconds": round(seconds, 2),
                }
            )
            print(rows[-1], flush=True)
    return {
        "n_eval": args.n_eval,
        "lora_rank": args.lora_rank,
        "steps": args.steps,
        "adapters": {t: str(p) for t, p in dirs.items()},
        "base": base,
        "own_lora": own,
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------------
# storage at scale


def _synthetic(n: int, templates: list[Any], modules: list[str], noise: float, seed: int) -> list[Any]:
    """n in-memory LoRA sources: a task LoRA's factors, rotated by a random orthogonal r×r matrix,
    plus Gaussian noise of relative size ``noise`` on both factors (scale folded, weight layout)."""
    from adapterlab.adapters import LoraModule, LoraSource

    g = torch.Generator().manual_seed(seed)
    base = {m: [t.factors(m) for t in templates] for m in modules}
    out = []
    for i in range(n):  # loop over adapters (each is built from its factors only)
        tensors: dict[str, torch.Tensor] = {}
        mods = {}
        k = i % len(templates)
        for m in modules:
            b, a = base[m][k]
            r = b.shape[1]
            q, _ = torch.linalg.qr(torch.randn(r, r, generator=g))
            nb = torch.randn(b.shape, generator=g) * (noise * b.norm() / b.numel() ** 0.5)
            na = torch.randn(a.shape, generator=g) * (noise * a.norm() / a.numel() ** 0.5)
            tensors[f"{m}.B"], tensors[f"{m}.A"] = b @ q + nb, q.T @ a + na
            mods[m] = LoraModule(m, f"{m}.A", f"{m}.B", r, 1.0, False, False, (b.shape[0], a.shape[1]))
        out.append(LoraSource(f"syn{i}", {"peft_type": "LORA"}, mods, tensors.__getitem__))
    return out


def _svd_baseline(sources: list[Any], modules: list[str], budget_params: float) -> tuple[float, int]:
    """Mean relative squared error of per-LoRA truncated SVD whose total size equals ``budget_params``
    (the bundle's): rank k per module with ``n · k · Σ(d_in + d_out) ≈ budget``; factor form."""
    from adapterlab.compression.functional import delta_sqnorm

    per_rank = sum(sources[0].modules[m].shape[0] + sources[0].modules[m].shape[1] for m in modules)
    k = int(budget_params // (len(sources) * per_rank))
    errs = []
    for m in modules:
        B = torch.stack([s.factors(m)[0] for s in sources])  # [n, d_out, r]
        A = torch.stack([s.factors(m)[1] for s in sources])  # [n, r, d_in]
        _, rb = torch.linalg.qr(B)  # [n, r, r]
        _, ra = torch.linalg.qr(A.transpose(1, 2))  # [n, r, r]
        sv = torch.linalg.svdvals(rb @ ra.transpose(1, 2))  # singular values of B A: [n, r]
        total = delta_sqnorm(B, A)
        kept = sv[:, :k].pow(2).sum(1)
        errs.append(((total - kept).clamp_min(0) / total).double())
    return float(torch.stack(errs).mean()), k


def bench_storage(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.compression import compress_adapters
    from adapterlab.merging import resolve_adapter

    dirs = _task_adapters(args.steps, args.lora_rank, args.template_tasks)
    templates = [resolve_adapter(d, name=t) for t, d in dirs.items()]
    layers = list(range(args.layers))
    modules = sorted(m for m in templates[0].modules if int(m.split(".")[2]) in layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.counts:
            sources = _synthetic(n, templates, modules, args.noise, seed=n)
            raw_bytes = 4 * sum(s.modules[m].rank * sum(s.modules[m].shape) for s in sources for m in modules)
            for mode, c, niter in args.storage_configs:
                t0 = time.perf_counter()
                bundle = compress_adapters(sources, rank=c, mode=mode, niter=niter)
                seconds = time.perf_counter() - t0
                out = bundle.save(Path(tmp) / f"b_{n}_{mode}_{c}")
                files = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
                cfg = (out / "compressed_config.json").stat().st_size
                st = bundle.storage()
                svd_err, k = _svd_baseline(sources, modules, st["compressed_params"])
                rows.append(
                    {
                        "adapters": n,
                        "mode": mode,
                        "c": c,
                        "niter": niter,
                        "modules": len(modules),
                        "raw_lora_bytes_fp32": raw_bytes,
                        "bundle_tensor_bytes": files,
                        "bundle_config_bytes": cfg,
                        "storage_ratio_tensors": round(raw_bytes / files, 2),
                        "storage_ratio_incl_config": round(raw_bytes / (files + cfg), 2),
                        "rel_sq_error_mean": round(bundle.errors.mean, 4),
                        "per_lora_svd_same_budget_rank": k,
                        "per_lora_svd_error": round(svd_err, 4),
                        "fit_seconds": round(seconds, 1),
                    }
                )
                print(rows[-1], flush=True)
                import shutil

                shutil.rmtree(out)
            del sources
    return {
        "layers": layers,
        "noise": args.noise,
        "templates": list(dirs),
        "rows": rows,
        "note": (
            "synthetic adapters = trained task LoRA factors x random orthogonal r x r + Gaussian noise; all "
            "decoder layers share shapes, so the measured ratio is the full-model ratio"
        ),
    }


# ------------------------------------------------------------------------------------------------


def _markdown(res: dict[str, Any]) -> str:
    lines = ["# compression benchmark (shared basis, embedded SmolLM2-135M)", "", f"command: `{res['command']}`", ""]
    q = res.get("quality")
    if q:
        lines += [
            f"## quality: 3 task LoRAs (rank {q['lora_rank']}, {q['steps']} steps) compressed jointly;"
            f" accuracy on {q['n_eval']} test examples",
            "",
            "base: "
            + ", ".join(f"{t} {v:.3f}" for t, v in q["base"].items())
            + "; own LoRA: "
            + ", ".join(f"{t} {v:.3f}" for t, v in q["own_lora"].items()),
            "",
            "| mode | c | task | acc LoRA | acc compressed | gain kept | rel. sq. error | core params / adapter | raw params / adapter |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in q["rows"]:
            lines.append(
                f"| {r['mode']} | {r['c']} | {r['task']} | {r['acc_lora']:.3f} | {r['acc_compressed']:.3f} | "
                f"{r['gain_kept']:.3f} | {r['rel_sq_error']:.4f} | {r['core_params_per_adapter']} | "
                f"{int(r['raw_params_per_adapter'])} |"
            )
        by = {}
        for r in q["rows"]:
            by.setdefault((r["mode"], r["c"]), []).append(r["gain_kept"])
        lines += [
            "",
            "min gain kept per setting (goal >= 0.95): "
            + ", ".join(f"{m} c={c}: {min(v):.3f}" for (m, c), v in by.items()),
            "",
        ]
    s = res.get("storage")
    if s:
        lines += [
            f"## storage at scale: synthetic rank-16 LoRAs, decoder layers {s['layers']} (all 7 projections)",
            "",
            "| adapters | mode | c | raw LoRA MiB | bundle MiB | ratio | rel. sq. error | per-LoRA SVD error (same size, rank) | fit s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            lines.append(
                f"| {r['adapters']} | {r['mode']} | {r['c']} | {r['raw_lora_bytes_fp32'] / 2**20:.1f} | "
                f"{(r['bundle_tensor_bytes'] + r['bundle_config_bytes']) / 2**20:.2f} | "
                f"{r['storage_ratio_incl_config']:.1f}x | {r['rel_sq_error_mean']:.4f} | "
                f"{r['per_lora_svd_error']:.4f} (k={r['per_lora_svd_same_budget_rank']}) | {r['fit_seconds']} |"
            )
        lines += ["", s["note"], ""]
    lines += [f"wall time {res['wall_seconds']} s; machine: {res['machine_brief']}", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny budgets")
    ap.add_argument("--parts", nargs="+", choices=["quality", "storage"], default=["quality", "storage"])
    ap.add_argument("--steps", type=int, default=150, help="training steps per task LoRA (cached)")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 48], help="full-mode shared ranks")
    ap.add_argument("--diag-ranks", type=int, nargs="+", default=[16, 48], help="diagonal-mode shared ranks")
    ap.add_argument("--niter", type=int, default=10)
    ap.add_argument("--diag-niter", type=int, default=50)
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--layers", type=int, default=1, help="decoder layers in the storage bundles")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument(
        "--template-tasks",
        nargs="+",
        choices=TASKS,
        default=TASKS,
        help="task LoRAs the synthetic adapters are built from",
    )
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    args.storage_configs = [("full", 16, 5), ("full", 32, 5), ("diagonal", 64, 20)]
    if args.quick:
        args.steps, args.n_eval, args.ranks, args.diag_ranks = 4, 16, [16, 48], [48]
        args.counts, args.storage_configs, args.diag_niter = [10, 30], [("full", 16, 2), ("diagonal", 32, 5)], 10
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "command": " ".join(["python", "bench/compression.py", *sys.argv[1:]]),
        "settings": {k: v for k, v in vars(args).items()},
    }
    if "quality" in args.parts:
        res["quality"] = bench_quality(args)
    if "storage" in args.parts:
        res["storage"] = bench_storage(args)
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    info = machine_info()
    res["machine_brief"] = (
        f"{info['processor']}, {info['cpu_count']} cores, torch threads {args.threads}, load {info['loadavg_at_start']}"
    )
    if "quality" in res:
        kept = [r["gain_kept"] for r in res["quality"]["rows"]]
        res["quality"]["median_gain_kept"] = statistics.median(kept)
    name = NAME + ("_quick" if args.quick else "") + ("" if len(args.parts) == 2 else "_" + args.parts[0])
    print(write_json(name, res))
    print(write_markdown(name, _markdown(res)))
    if len(args.parts) == 1 and not args.quick:
        _combine()


def _combine() -> None:
    """After a single-part run: bench/results/compression.{json,md} from the part files present."""
    import json

    from bench._common import RESULTS

    parts = {}
    for part in ("quality", "storage"):
        path = RESULTS / f"{NAME}_{part}.json"
        if path.is_file():
            parts[part] = json.loads(path.read_text())
    if not parts:
        return
    res: dict[str, Any] = {
        "command": " ; ".join(p["command"] for p in parts.values()),
        "wall_seconds": sum(p["wall_seconds"] for p in parts.values()),
        "machine_brief": next(iter(parts.values()))["machine_brief"],
        "parts": sorted(parts),
    }
    for part, p in parts.items():
        res[part] = p[part]
        res[f"{part}_settings"] = p["settings"]
    print(write_json(NAME, res))
    print(write_markdown(NAME, _markdown(res)))


if __name__ == "__main__":
    main()
