"""Benchmark: merging (TIES speed / peak memory vs peft, quality on 3 tasks) and PHLoRA extraction.

    python bench/merging.py speed                 # tiny Llama h=512, 4 layers, r=16; T = 2, 4, 8
    python bench/merging.py quality [--steps 150] # embedded SmolLM2-135M, tasks sentiment/domain/compare
    python bench/merging.py phlora  [--steps 150] # full fine-tune of one task, extract, re-evaluate

Each part writes bench/results/merging_<part>.json (machine, versions, settings, numbers) and prints
a markdown table. Each timed case runs in a fresh subprocess; peak memory is the growth of the
process' max RSS during the measured call. Anchors: peft's ``add_weighted_adapter(combination_type=
"ties_svd")`` (the only equal-output anchor: it merges dense deltas per tensor and re-factorises by
SVD); peft's plain ``ties`` merges A and B factors separately and is reported for its error only.
mergekit is not installed in this environment (it merges full models; not measured here).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
TINY = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=4)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ["sentiment", "domain", "compare"]


def _env() -> dict[str, Any]:
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "peft": peft.__version__,
            "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "note": "shared machine: other jobs ran concurrently; timings are noisy"}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakRSS:
    """Peak resident memory growth during a block, sampled every 2 ms by a thread."""

    def __enter__(self) -> "_PeakRSS":
        import threading

        self.before = self.peak = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def growth(self) -> float:
        return self.peak - self.before


# ------------------------------------------------------------------------------------------------
# speed


def _make_adapters(root: Path, n: int, r: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model

    from adapterlab.models import tiny_llama

    paths = []
    for i in range(n):
        pm = get_peft_model(tiny_llama(**TINY), LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False))
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        path = root / f"a{i}"
        pm.save_pretrained(str(path))
        paths.append(path)
    return paths


def _case(kind: str, dirs: list[str], rank: int, queue: Any) -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from adapterlab.models import tiny_llama

    if kind.startswith("peft"):
        from peft import PeftModel

        pm = PeftModel.from_pretrained(tiny_llama(**TINY), dirs[0], adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            pm.load_adapter(d, adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(dirs))]
        combo = "ties_svd" if kind == "peft_ties_svd" else "ties"
        extra = {"svd_rank": rank} if combo == "ties_svd" else {}
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            pm.add_weighted_adapter(names, [1.0] * len(dirs), "merged", combination_type=combo, density=0.2, **extra)
            seconds = time.perf_counter() - t0
        peak = mem.growth
        layer = pm.base_model.model.model.layers[0].self_attn.q_proj
        sample = layer.get_delta_weight("merged").detach().clone()
    else:
        from adapterlab.merging import merge_adapters

        scope = "tensor" if kind == "adapterlab_tensor" else "model"
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            res = merge_adapters(dirs, "ties", density=0.2, trim_scope=scope, rank=rank)
            seconds = time.perf_counter() - t0
        peak = mem.growth
        sample = res.delta("model.layers.0.self_attn.q_proj")
    queue.put({"seconds": seconds, "peak_mib": peak, "sample": sample.float().numpy().copy()})  # by value


def _run_case(kind: str, dirs: list[Path], rank: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_case, args=(kind, [str(d) for d in dirs], rank, q))
    p.start()
    out = q.get()
    p.join()
    return out


def bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.merging import merge_adapters

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _make_adapters(Path(tmp), max(args.counts), args.rank)
        for n in args.counts:
            sub = dirs[:n]
            # reference: TIES of the dense deltas per tensor, no truncation
            dense = merge_adapters(sub, "ties", density=0.2, trim_scope="tensor", output="sparse").delta(
                "model.layers.0.self_attn.q_proj")
            for kind in ("adapterlab_tensor", "adapterlab_model", "peft_ties_svd", "peft_ties"):
                best = None
                for _ in range(args.repeat):
                    got = _run_case(kind, sub, args.rank)
                    best = got if best is None or got["seconds"] < best["seconds"] else best
                assert best is not None
                err = float((torch.from_numpy(best["sample"]) - dense).norm() / dense.norm())
                rows.append({"adapters": n, "impl": kind, "seconds": round(best["seconds"], 3),
                             "peak_mib": round(best["peak_mib"], 1), "rel_err_vs_dense_ties_q0": round(err, 4)})
                print(rows[-1], flush=True)
    for n in args.counts:
        ours = next(r for r in rows if r["adapters"] == n and r["impl"] == "adapterlab_tensor")
        peft_r = next(r for r in rows if r["adapters"] == n and r["impl"] == "peft_ties_svd")
        ours["speedup_vs_peft_ties_svd"] = round(peft_r["seconds"] / max(ours["seconds"], 1e-9), 2)
        ours["memory_ratio_vs_peft_ties_svd"] = round(ours["peak_mib"] / max(peft_r["peak_mib"], 1e-9), 2)
    return {"part": "speed", "model": TINY, "rank": args.rank, "density": 0.2, "targets": TARGETS,
            "repeat_best_of": args.repeat, "rows": rows}


# ------------------------------------------------------------------------------------------------
# quality


def _train_lora(task: str, steps: int, r: int, seed: int, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    from adapterlab.data import tokenize_for_training
    from adapterlab.models import load_default_model

    model, tok = load_default_model()
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0))
    return _train(pm, tok, task, steps, seed, out, lr=1e-3, lora=True)


def _train(model: Any, tok: Any, task: str, steps: int, seed: int, out: Path, *, lr: float, lora: bool) -> Path:
    from adapterlab.data import tokenize_for_training

    bs = 8
    batch = tokenize_for_training(tok, task, n=steps * bs, seed=seed, max_length=96, return_tensors="pt")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for s in range(steps):
        sl = slice(s * bs, (s + 1) * bs)
        width = int(batch["attention_mask"][sl].sum(1).max())
        loss = model(input_ids=batch["input_ids"][sl, :width], attention_mask=batch["attention_mask"][sl, :width],
                     labels=batch["labels"][sl, :width]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.save_pretrained(str(out))
    return out


def _accuracy(model: Any, tok: Any, task: str, n: int) -> float:
    from adapterlab.evaluate import task_accuracy

    with torch.no_grad():
        return task_accuracy(model, tok, task, n=n, batch_size=16).accuracy


def bench_quality(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.merging import merge_adapters
    from adapterlab.models import load_default_model

    out: dict[str, Any] = {"part": "quality", "steps": args.steps, "rank": args.rank, "n_eval": args.n_eval,
                           "tasks": TASKS, "acc": {}}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        t0 = time.perf_counter()
        for i, task in enumerate(TASKS):
            dirs[task] = _train_lora(task, args.steps, args.rank, i, Path(tmp) / task)
            print(f"trained {task} ({time.perf_counter() - t0:.0f} s)", flush=True)
        base, tok = load_default_model()
        acc = out["acc"]
        acc["base"] = {t: _accuracy(base, tok, t, args.n_eval) for t in TASKS}
        print("base", acc["base"], flush=True)

        def evaluate_delta(result: Any) -> dict[str, float]:
            model, _ = load_default_model()
            result.apply_(model)
            return {t: _accuracy(model, tok, t, args.n_eval) for t in TASKS}

        acc["own_adapter"] = {}
        from adapterlab.merging import resolve_adapter

        for task in TASKS:
            single = merge_adapters([dirs[task]], "linear", weights=[1.0])  # exact: rank = its own rank
            model, _ = load_default_model()
            single.apply_(model)
            acc["own_adapter"][task] = _accuracy(model, tok, task, args.n_eval)
        print("own", acc["own_adapter"], flush=True)
        adapters = {t: dirs[t] for t in TASKS}
        for lam in args.lambdas:
            acc[f"task_arithmetic_l{lam}"] = evaluate_delta(merge_adapters(adapters, "task_arithmetic", **{"lambda": lam}))
            acc[f"ties_l{lam}"] = evaluate_delta(merge_adapters(adapters, "ties", density=0.2, **{"lambda": lam}, output="sparse"))
            print(lam, acc[f"task_arithmetic_l{lam}"], acc[f"ties_l{lam}"], flush=True)
        for k in (1, 2):
            rmm = merge_adapters(adapters, "rmm", K=k)
            acc[f"rmm_K{k}"] = {}
            for task in TASKS:
                model, _ = load_default_model()
                rmm.reconstruct(task).apply_(model)
                acc[f"rmm_K{k}"][task] = _accuracy(model, tok, task, args.n_eval)
            out[f"rmm_K{k}_errors"] = {t: max(e["delta"][i] for e in rmm.bundle.errors.values()) for i, t in enumerate(TASKS)}
            print(k, acc[f"rmm_K{k}"], flush=True)
        del resolve_adapter
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    out["mean"] = {k: round(mean(v), 4) for k, v in acc.items()}
    out["rmm_recovery"] = {f"K{k}": {t: round(acc[f"rmm_K{k}"][t] / max(acc["own_adapter"][t], 1e-9), 4) for t in TASKS}
                           for k in (1, 2)}
    return out


def bench_phlora(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.extraction import extract_lora
    from adapterlab.models import load_default_model

    task = "sentiment"
    out: dict[str, Any] = {"part": "phlora", "task": task, "steps": args.steps, "n_eval": args.n_eval, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model, tok = load_default_model()
        base_acc = _accuracy(model, tok, task, args.n_eval)
        _train(model, tok, task, args.steps, 0, Path(tmp) / "ft", lr=2e-5, lora=False)
        ft_acc = _accuracy(model, tok, task, args.n_eval)
        base, _ = load_default_model()
        out.update(base_acc=base_acc, ft_acc=ft_acc)
        for energy in args.energies:
            t0 = time.perf_counter()
            res = extract_lora(base, model, energy=energy, max_rank=256)
            secs = time.perf_counter() - t0
            m, _ = load_default_model()
            res.apply_(m)
            acc = _accuracy(m, tok, task, args.n_eval)
            ranks = list(res.ranks.values())
            gain = (acc - base_acc) / (ft_acc - base_acc) if ft_acc != base_acc else float("nan")
            out["rows"].append({"energy": energy, "seconds": round(secs, 2), "global_energy": round(res.global_energy, 4),
                                "mean_rank": round(sum(ranks) / len(ranks), 1), "max_rank": max(ranks),
                                "params": res.n_params(), "acc": acc, "gain_kept": round(gain, 3)})
            print(out["rows"][-1], flush=True)
    return out


def _table(result: dict[str, Any]) -> str:
    rows = result.get("rows")
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
        return "\n".join(lines)
    if "acc" in result:
        lines = ["| variant | " + " | ".join(TASKS) + " | mean |", "|" + "---|" * (len(TASKS) + 2)]
        for k, v in result["acc"].items():
            lines.append(f"| {k} | " + " | ".join(f"{v[t]:.3f}" for t in TASKS) + f" | {result['mean'][k]:.3f} |")
        return "\n".join(lines)
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["speed", "quality", "phlora"])
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--energies", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    fn = {"speed": bench_speed, "quality": bench_quality, "phlora": bench_phlora}[args.part]
    t0 = time.perf_counter()
    result = fn(args)
    result.update(env=_env(), command=" ".join(["python", "bench/merging.py", *sys.argv[1:]]),
                  wall_seconds=round(time.perf_counter() - t0, 1), table=_table(result))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"merging_{args.part}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(result["table"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
