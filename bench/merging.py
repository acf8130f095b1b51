"""Benchmark: merging (TIES speed / peak memory vs peft and mergekit, quality on 3 tasks) and PHLoRA.

    python bench/merging.py speed [--model embedded|tiny] [--counts 2 4 8] [--repeat 3] [--dtype bfloat16]
    python bench/merging.py quality [--steps 100]  # embedded SmolLM2-135M, tasks sentiment/domain/compare
    python bench/merging.py phlora  [--steps 150]  # full fine-tune of one task, extract, re-evaluate

Each part writes bench/results/merging_<part>.json (machine, versions, settings, numbers) and prints
a markdown table. Each timed case runs in a fresh subprocess, the implementations interleaved, one
warm-up round and ``--repeat`` kept rounds (median); peak memory is the growth of the process' max
RSS during the measured call. Equal-output anchors: for a LoRA output, peft's
``add_weighted_adapter(combination_type="ties_svd")`` (it merges dense deltas per tensor and
re-factorises by SVD); for a full merged model, mergekit's ``ties`` over the T full checkpoints
(base + each LoRA, written beforehand; mergekit runs from ``$MERGEKIT_PYTHON``, default
/tmp/mkvenv/bin/python). peft's plain ``ties`` merges A and B factors separately and is reported for
its error only. ``--dtype bfloat16``: the base is loaded in bf16 and the adapters are saved from it with
bf16 tensors (``merging_speed_bf16.json``); peft loads those files with its default
``autocast_adapter_dtype=True`` (fp32 adapter weights in memory — with bf16 weights its ``ties_svd``
stops: ``linalg_svd_cpu`` has no bf16 kernel), adapterlab computes in fp32 and casts once.
Besides the ratio of the medians, each row gives the median of the per-round (paired) ratios, and
the JSON records the load average before and after the run.
"""

from __future__ import annotations

import argparse
import json
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
TINY = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TASKS = ["sentiment", "domain", "compare"]


def _env() -> dict[str, Any]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "note": "shared machine: other jobs ran concurrently; timings are noisy",
    }


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class _PeakRSS:
    """Peak resident memory growth during a block, sampled every 2 ms by a thread."""

    def __enter__(self) -> _PeakRSS:
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


def _model_for(kind: str, dtype: str = "float32") -> Any:
    """The base of the speed benchmark: the embedded SmolLM2-135M, or the tiny Llama of the issue."""
    from adapterlab.models import load_default_model, tiny_llama

    dt = getattr(torch, dtype)
    if kind == "embedded":
        return load_default_model(dtype=dt)[0]
    return tiny_llama(**TINY, dtype=dt)


def _make_adapters(root: Path, n: int, r: int, model_kind: str, dtype: str = "float32") -> list[Path]:
    """n random LoRAs saved from a ``dtype`` base with ``dtype`` tensors (no fp32 autocast)."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(n):
        pm = get_peft_model(
            _model_for(model_kind, dtype),
            LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS, init_lora_weights=False),
            autocast_adapter_dtype=False,
        )
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        path = root / f"a{i}"
        pm.save_pretrained(str(path))
        paths.append(path)
    return paths


def _full_models(root: Path, dirs: list[Path], model_kind: str) -> tuple[Path, list[Path]]:
    """mergekit merges full checkpoints: write the base and base + each LoRA (setup, not timed)."""
    from peft import PeftModel

    base_dir = root / "full_base"
    if not base_dir.exists():
        _model_for(model_kind).save_pretrained(str(base_dir))
    out = []
    for d in dirs:
        target = root / f"full_{d.name}"
        if not target.exists():
            PeftModel.from_pretrained(_model_for(model_kind), str(d)).merge_and_unload().save_pretrained(str(target))
        out.append(target)
    return base_dir, out


SAMPLE = "model.layers.0.self_attn.q_proj"


def _case_main(argv: list[str]) -> None:
    """Runs one case twice in this (fresh) process and writes {seconds, peak_mib} of both calls + a sample.

    The first call is "cold" (first use of the code paths in the process: lazy initialisation and
    library pages count in its peak); the second, on the same inputs, is "warm". Both are reported.
    """
    kind, model_kind, dtype, rank, out_file, *dirs = argv
    rank_i = int(rank)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from safetensors.torch import save_file

    work = Path(out_file).with_suffix(".out")
    if kind == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        base_dir, fulls = dirs[0], dirs[1:]
        cfg = MergeConfiguration.model_validate(
            {
                "merge_method": "ties",
                "base_model": base_dir,
                "dtype": "float32",
                "parameters": {"normalize": True, "int8_mask": False},
                "models": [{"model": f, "parameters": {"density": 0.2, "weight": 1.0}} for f in fulls],
            }
        )
        opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False)

        def call(i: int) -> Any:
            run_merge(cfg, str(work) + str(i), opts)

        def sample_of(_: Any) -> torch.Tensor:
            from safetensors import safe_open

            for f in sorted(Path(str(work) + "0").glob("*.safetensors")):
                with safe_open(str(f), "pt") as fh:
                    if SAMPLE + ".weight" in fh.keys():
                        return (
                            fh.get_tensor(SAMPLE + ".weight").float()
                            - _model_for(model_kind).get_submodule(SAMPLE).weight.detach().float()
                        )
            raise AssertionError("mergekit output misses the sample tensor")
    elif kind.startswith("peft"):
        from peft import PeftModel

        pm = PeftModel.from_pretrained(_model_for(model_kind, dtype), dirs[0], adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            pm.load_adapter(d, adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(len(dirs))]
        combo = "ties_svd" if kind == "peft_ties_svd" else "ties"
        extra = {"svd_rank": rank_i} if combo == "ties_svd" else {}

        def call(i: int) -> Any:
            pm.add_weighted_adapter(
                names, [1.0] * len(dirs), f"merged{i}", combination_type=combo, density=0.2, **extra
            )

        def sample_of(_: Any) -> torch.Tensor:
            return pm.base_model.model.get_submodule(SAMPLE).get_delta_weight("merged0").detach().float()
    elif kind == "adapterlab_full":
        from adapterlab.merging import merge_adapters

        bases = [_model_for(model_kind, dtype), _model_for(model_kind, dtype)]
        before = bases[0].get_submodule(SAMPLE).weight.detach().float().clone()

        def call(i: int) -> Any:
            res = merge_adapters(
                dirs, "ties", density=0.2, trim_scope="tensor", output="full", base=bases[i], progress=False
            )
            res.model.save_pretrained(str(work) + str(i))  # mergekit writes its merged model too
            return res

        def sample_of(res: Any) -> torch.Tensor:
            return res.model.get_submodule(SAMPLE).weight.detach().float() - before
    else:
        from adapterlab.merging import merge_adapters

        scope = "model" if kind == "adapterlab_lora_model_scope" else "tensor"

        def call(i: int) -> Any:
            return merge_adapters(dirs, "ties", density=0.2, trim_scope=scope, rank=rank_i, progress=False)

        def sample_of(res: Any) -> torch.Tensor:
            return res.delta(SAMPLE)

    meta = {}
    first = None
    for i, label in enumerate(("cold", "warm")):
        with _PeakRSS() as mem:
            t0 = time.perf_counter()
            got = call(i)
            seconds = time.perf_counter() - t0
        meta[f"seconds_{label}"], meta[f"peak_mib_{label}"] = repr(seconds), repr(mem.growth)
        if i == 0:
            first = got
    sample = sample_of(first)
    save_file({"sample": sample.contiguous()}, out_file, metadata=meta)


def _run_case(
    kind: str, model_kind: str, dirs: list[Path], rank: int, tmp: Path, dtype: str = "float32"
) -> dict[str, Any]:
    import subprocess

    from safetensors import safe_open

    python = MERGEKIT_PYTHON if kind == "mergekit" else sys.executable
    out_file = tmp / f"case_{kind}_{len(dirs)}_{time.monotonic_ns()}.safetensors"
    proc = subprocess.run(
        [
            python,
            str(Path(__file__).resolve()),
            "_case",
            kind,
            model_kind,
            dtype,
            str(rank),
            str(out_file),
            *map(str, dirs),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {kind} failed:\n{proc.stderr[-3000:]}")
    with safe_open(str(out_file), "pt") as fh:
        meta = fh.metadata()
        sample = fh.get_tensor("sample")
    out_file.unlink()
    import shutil

    for extra in out_file.parent.glob(out_file.stem + ".out*"):
        shutil.rmtree(extra, ignore_errors=True)
    return {**{k: float(v) for k, v in meta.items()}, "sample": sample}


#: mergekit lives in its own venv (it pins packages the project does not): `python -m venv
#: --system-site-packages /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit`.
MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON", "/tmp/mkvenv/bin/python")


def bench_speed(args: argparse.Namespace) -> dict[str, Any]:
    import statistics

    from adapterlab.merging import merge_adapters

    have_mergekit = Path(MERGEKIT_PYTHON).exists() and args.dtype == "float32"  # mergekit rows: fp32 only
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        dirs = _make_adapters(tmp, max(args.counts), args.rank, args.model, args.dtype)
        for n in args.counts:
            sub = dirs[:n]
            # reference: TIES of the dense deltas per tensor, no truncation
            dense = merge_adapters(sub, "ties", density=0.2, trim_scope="tensor", output="sparse").delta(SAMPLE)
            kinds: list[tuple[str, list[Path]]] = [
                (k, sub) for k in ("adapterlab_lora", "peft_ties_svd", "adapterlab_full")
            ]
            if have_mergekit:
                base_dir, fulls = _full_models(tmp, sub, args.model)
                kinds.append(("mergekit", [base_dir, *fulls]))
            stats: dict[str, dict[str, list[float]]] = {k: {} for k, _ in kinds}
            samples: dict[str, torch.Tensor] = {}
            for rep in range(args.repeat + 1):  # first round = warm-up (page cache, imports), not kept
                for kind, inputs in kinds:  # interleaved, so machine load hits all alike
                    got = _run_case(kind, args.model, inputs, args.rank, tmp, args.dtype)
                    if rep > 0:
                        for key in ("seconds_cold", "peak_mib_cold", "seconds_warm", "peak_mib_warm"):
                            stats[kind].setdefault(key, []).append(got[key])
                    samples[kind] = got["sample"]
            peft_plain = _run_case("peft_ties", args.model, sub, args.rank, tmp, args.dtype)
            for kind, _ in kinds:
                err = float((samples[kind] - dense).norm() / dense.norm())
                row = {
                    "adapters": n,
                    "impl": kind,
                    "dtype": args.dtype,
                    "output": "full model" if kind in ("adapterlab_full", "mergekit") else f"LoRA r={args.rank}",
                }
                for key, vals in stats[kind].items():
                    row[f"{key}_median"] = round(statistics.median(vals), 3 if key.startswith("seconds") else 1)
                row["seconds_cold_all"] = [round(t, 3) for t in stats[kind]["seconds_cold"]]
                row["rel_err_vs_dense_ties_q0"] = round(err, 4)
                rows.append(row)
                print(rows[-1], flush=True)
            err = float((peft_plain["sample"] - dense).norm() / dense.norm())
            rows.append(
                {
                    "adapters": n,
                    "impl": "peft_ties (factor-wise: not TIES)",
                    "dtype": args.dtype,
                    "output": f"LoRA r={args.rank * n}",
                    "seconds_cold_median": round(peft_plain["seconds_cold"], 3),
                    "peak_mib_cold_median": round(peft_plain["peak_mib_cold"], 1),
                    "rel_err_vs_dense_ties_q0": round(err, 4),
                }
            )
            # ratios against the equal-output anchor of the same output form
            for ours, anchor in (("adapterlab_lora", "peft_ties_svd"), ("adapterlab_full", "mergekit")):
                a = next((r for r in rows if r["adapters"] == n and r["impl"] == anchor), None)
                o = next(r for r in rows if r["adapters"] == n and r["impl"] == ours)
                if a is not None:
                    for temp in ("cold", "warm"):
                        o[f"speedup_{temp}_vs_{anchor}"] = round(
                            a[f"seconds_{temp}_median"] / max(o[f"seconds_{temp}_median"], 1e-9), 2
                        )
                        paired = [
                            x / max(y, 1e-9)
                            for x, y in zip(stats[anchor][f"seconds_{temp}"], stats[ours][f"seconds_{temp}"])
                        ]  # same round
                        o[f"speedup_{temp}_vs_{anchor}_paired_median"] = round(statistics.median(paired), 2)
                        o[f"memory_ratio_{temp}_vs_{anchor}"] = round(
                            o[f"peak_mib_{temp}_median"] / max(a[f"peak_mib_{temp}_median"], 1e-9), 2
                        )
    return {
        "part": "speed",
        "model": args.model if args.model == "embedded" else TINY,
        "rank": args.rank,
        "dtype": args.dtype,
        "density": 0.2,
        "targets": TARGETS,
        "repeats": args.repeat,
        "statistic": "median after 1 warm-up round; *_paired_median: median of the per-round ratios",
        "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
        "loadavg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
        "peft_adapter_dtype": (
            "fp32 in memory (peft's default autocast_adapter_dtype=True upcasts the bf16 files; "
            "with bf16 weights its ties_svd fails: linalg_svd_cpu has no bf16 kernel)"
        )
        if args.dtype != "float32"
        else "float32",
        "mergekit": _mergekit_version() if have_mergekit else "not installed",
        "timing_scope": (
            "in-process call only (imports and model loading excluded; adapterlab reads the adapter "
            "files inside the call, peft has them loaded before it); full-model outputs include "
            "writing the merged model as safetensors; peak = growth of max RSS during the call; "
            "cold = first call in a fresh process, warm = the same call repeated in that process"
        ),
        "rows": rows,
    }


def _mergekit_version() -> str:
    import subprocess

    out = subprocess.run(
        [MERGEKIT_PYTHON, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


# ------------------------------------------------------------------------------------------------
# quality


def task_adapter_cache() -> Path:
    """Where trained task adapters are kept between benchmark runs (shared with bench/compression.py)."""
    from adapterlab._paths import cache_dir

    return cache_dir() / "bench" / "task_adapters"


def cached_task_lora(task: str, steps: int, r: int, seed: int) -> Path:
    """Train (once) and cache the LoRA of one task; later runs with the same settings reuse it."""
    out = task_adapter_cache() / f"{task}_r{r}_s{steps}_seed{seed}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    return _train_lora(task, steps, r, seed, out)


def _train_lora(task: str, steps: int, r: int, seed: int, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

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
        loss = model(
            input_ids=batch["input_ids"][sl, :width],
            attention_mask=batch["attention_mask"][sl, :width],
            labels=batch["labels"][sl, :width],
        ).loss
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


def _rmm_label(spec: str) -> tuple[str, int, str]:
    k, _, scope = spec.partition(":")
    scope = scope or "layer"
    return (f"rmm_K{k}" if scope == "layer" else f"rmm_K{k}_{scope}"), int(k), scope


def _rmm_rows(
    out: dict[str, Any], acc: dict[str, Any], adapters: dict[str, Path], spec: str, tok: Any, n_eval: int
) -> None:
    """Per-task accuracy of RMM's reconstruction for one ``K[:scope]`` spec, plus its storage and errors."""
    from adapterlab.merging import merge_adapters
    from adapterlab.models import load_default_model

    label, k, scope = _rmm_label(spec)
    rmm = merge_adapters(adapters, "rmm", K=k, coeff_scope=scope)
    acc[label] = {}
    for task in TASKS:
        model, _ = load_default_model()
        rmm.reconstruct(task).apply_(model)
        acc[label][task] = _accuracy(model, tok, task, n_eval)
    out[f"{label}_errors"] = {t: max(e["delta"][i] for e in rmm.bundle.errors.values()) for i, t in enumerate(TASKS)}
    out[f"{label}_storage"] = rmm.bundle.storage()
    print(label, acc[label], out[f"{label}_storage"], flush=True)


def _rmm_recovery(acc: dict[str, Any]) -> dict[str, Any]:
    own = acc["own_adapter"]
    return {
        k[len("rmm_") :]: {t: round(v[t] / max(own[t], 1e-9), 4) for t in TASKS}
        for k, v in acc.items()
        if k.startswith("rmm_")
    }


def bench_quality(args: argparse.Namespace) -> dict[str, Any]:
    from adapterlab.merging import merge_adapters
    from adapterlab.models import load_default_model

    out: dict[str, Any] = {
        "part": "quality",
        "steps": args.steps,
        "rank": args.rank,
        "n_eval": args.n_eval,
        "tasks": TASKS,
        "acc": {},
    }
    with tempfile.TemporaryDirectory():
        dirs = {}
        t0 = time.perf_counter()
        for i, task in enumerate(TASKS):
            dirs[task] = cached_task_lora(task, args.steps, args.rank, i)
            print(f"trained {task} ({time.perf_counter() - t0:.0f} s)", flush=True)
        base, tok = load_default_model()
        if args.rmm_only:  # same cached adapters and eval set: only the RMM rows are (re)computed
            prev = json.loads((RESULTS / "merging_quality.json").read_text(encoding="utf-8"))
            if (prev["steps"], prev["rank"], prev["n_eval"]) != (args.steps, args.rank, args.n_eval):
                raise SystemExit("--rmm-only needs the same --steps/--rank/--n-eval as merging_quality.json")
            out = {k: v for k, v in prev.items() if k not in ("env", "command", "wall_seconds", "table")}
            out["rmm_command"] = " ".join(["python", "bench/merging.py", *sys.argv[1:]])
            for spec in args.rmm:
                _rmm_rows(out, out["acc"], {t: dirs[t] for t in TASKS}, spec, tok, args.n_eval)
            out["mean"] = {k: round(sum(v.values()) / len(v), 4) for k, v in out["acc"].items()}
            out["rmm_recovery"] = _rmm_recovery(out["acc"])
            return out
        acc = out["acc"]
        acc["base"] = {t: _accuracy(base, tok, t, args.n_eval) for t in TASKS}
        print("base", acc["base"], flush=True)

        def evaluate_delta(result: Any) -> dict[str, float]:
            model, _ = load_default_model()
            result.apply_(model)
            return {t: _accuracy(model, tok, t, args.n_eval) for t in TASKS}

        acc["own_adapter"] = {}
        for task in TASKS:
            single = merge_adapters([dirs[task]], "linear", weights=[1.0])  # exact: rank = its own rank
            model, _ = load_default_model()
            single.apply_(model)
            acc["own_adapter"][task] = _accuracy(model, tok, task, args.n_eval)
        print("own", acc["own_adapter"], flush=True)
        adapters = {t: dirs[t] for t in TASKS}
        for lam in args.lambdas:
            acc[f"task_arithmetic_l{lam}"] = evaluate_delta(
                merge_adapters(adapters, "task_arithmetic", **{"lambda": lam})
            )
            acc[f"ties_l{lam}"] = evaluate_delta(
                merge_adapters(adapters, "ties", density=0.2, **{"lambda": lam}, output="sparse")
            )
            print(lam, acc[f"task_arithmetic_l{lam}"], acc[f"ties_l{lam}"], flush=True)
        for spec in args.rmm:
            _rmm_rows(out, acc, adapters, spec, tok, args.n_eval)
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    out["mean"] = {k: round(mean(v), 4) for k, v in acc.items()}
    out["rmm_recovery"] = _rmm_recovery(acc)
    return out


def _phlora_tuned(steps: int) -> Path:
    """Full fine-tune of the embedded model on sentiment (cached: the slow part of this benchmark)."""
    from adapterlab.models import load_default_model

    out = task_adapter_cache().parent / f"phlora_full_ft_sentiment_s{steps}"
    if (out / "model.safetensors").is_file():
        return out
    model, tok = load_default_model()
    tmp = out.with_name(out.name + ".partial")
    _train(model, tok, "sentiment", steps, 0, tmp, lr=2e-5, lora=False)
    tmp.rename(out)
    return out


def _global_energy_of(adapter_dir: Path, base: Any, tuned: Any) -> tuple[float, int]:
    """Retained energy of a LoRA folder, exactly: 1 - Σ‖Δ - BA‖² / Σ‖Δ‖² over the modules it adapts.

    The folder is loaded with peft (so any writer's conventions — rank/alpha patterns, the norms
    mergekit saves as ``modules_to_save`` — are read the same way) and each LoRA layer's
    ``get_delta_weight`` is compared with the true fine-tuning delta.
    """
    import copy

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    pm = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir))
    err = tot = 0.0
    params = 0
    for name, mod in pm.base_model.model.named_modules():
        if not isinstance(mod, LoraLayer) or "default" not in mod.lora_A:
            continue
        delta = tuned.get_submodule(name).weight.detach().float() - base.get_submodule(name).weight.detach().float()
        approx = mod.get_delta_weight("default").detach().float()
        err += float((delta - approx).square().sum())
        tot += float(delta.square().sum())
        params += sum(p.numel() for p in (mod.lora_A["default"].weight, mod.lora_B["default"].weight))
    return 1.0 - err / tot, params


def bench_phlora(args: argparse.Namespace) -> dict[str, Any]:
    import statistics
    import subprocess

    from adapterlab.extraction import extract_lora
    from adapterlab.models import load_default_model, load_model

    task = "sentiment"
    out: dict[str, Any] = {
        "part": "phlora",
        "task": task,
        "steps": args.steps,
        "n_eval": args.n_eval,
        "rows": [],
        "mergekit_rows": [],
    }
    tuned_dir = _phlora_tuned(args.steps)
    base, tok = load_default_model()
    tuned = load_model(str(tuned_dir))
    base_acc = _accuracy(base, tok, task, args.n_eval)
    ft_acc = _accuracy(tuned, tok, task, args.n_eval)
    out.update(base_acc=base_acc, ft_acc=ft_acc, tuned_dir=str(tuned_dir))
    have_mergekit = Path(MERGEKIT_PYTHON).exists()
    if have_mergekit:
        t = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([MERGEKIT_PYTHON, "-c", "import mergekit.scripts.extract_lora"], capture_output=True)
            t.append(time.perf_counter() - t0)
        out["mergekit_import_seconds"] = round(statistics.median(t), 2)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for energy in args.energies:
            row: dict[str, Any] = {"energy": energy, "energy_scope": "module"}
            for solver in ("svd", "gram"):
                times = []
                for _ in range(args.repeat):
                    t0 = time.perf_counter()
                    res = extract_lora(base, tuned, energy=energy, max_rank=256, extras="skip", solver=solver)
                    times.append(time.perf_counter() - t0)
                row[f"seconds_{solver}"] = round(statistics.median(times), 2)
            ranks = list(res.ranks.values())
            folder = tmp / f"ours_{energy}"
            res.save(folder)
            m, _ = load_default_model()
            res.apply_(m)
            acc = _accuracy(m, tok, task, args.n_eval)
            gain = (acc - base_acc) / (ft_acc - base_acc) if ft_acc != base_acc else float("nan")
            g_energy, params = _global_energy_of(folder, base, tuned)
            row.update(
                global_energy=round(g_energy, 4),
                mean_rank=round(sum(ranks) / len(ranks), 1),
                max_rank=max(ranks),
                params=params,
                acc=acc,
                gain_kept=round(gain, 3),
            )
            # CLI wall time, the same for both tools (imports, loading, writing included)
            cli = tmp / f"cli_{energy}"
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "adapterlab.cli.app",
                    "extract",
                    "--base",
                    "default",
                    "--tuned",
                    str(tuned_dir),
                    "--energy",
                    str(energy),
                    "--max-rank",
                    "256",
                    "--skip-extras",
                    "--solver",
                    "gram",
                    "-o",
                    str(cli),
                ],
                capture_output=True,
                check=True,
            )
            row["cli_wall_seconds"] = round(time.perf_counter() - t0, 2)
            out["rows"].append(row)
            print(row, flush=True)
            # the same energy over the whole model, ranks where they buy the most energy per parameter
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                gres = extract_lora(
                    base, tuned, energy=energy, energy_scope="global", max_rank=256, extras="skip", solver="gram"
                )
                times.append(time.perf_counter() - t0)
            gfolder = tmp / f"global_{energy}"
            gres.save(gfolder)
            m, _ = load_default_model()
            gres.apply_(m)
            gacc = _accuracy(m, tok, task, args.n_eval)
            g_energy, g_params = _global_energy_of(gfolder, base, tuned)
            granks = list(gres.ranks.values())
            grow = {
                "energy": energy,
                "energy_scope": "global",
                "seconds_gram": round(statistics.median(times), 2),
                "global_energy": round(g_energy, 4),
                "mean_rank": round(sum(granks) / len(granks), 1),
                "max_rank": max(granks),
                "params": g_params,
                "acc": gacc,
                "gain_kept": round((gacc - base_acc) / (ft_acc - base_acc), 3) if ft_acc != base_acc else None,
            }
            out["rows"].append(grow)
            print(grow, flush=True)
            if not have_mergekit:
                continue
            # mergekit: one uniform rank (its only knob besides an absolute cutoff), = our mean rank
            mk_rank = max(1, round(sum(ranks) / len(ranks)))
            mk_out = tmp / f"mergekit_{energy}"
            base_dir = tmp / "base_full"
            if not base_dir.exists():
                base.save_pretrained(str(base_dir))
            t0 = time.perf_counter()
            proc = subprocess.run(
                [
                    str(Path(MERGEKIT_PYTHON).with_name("mergekit-extract-lora")),
                    "--model",
                    str(tuned_dir),
                    "--base-model",
                    str(base_dir),
                    "--out-path",
                    str(mk_out),
                    "--max-rank",
                    str(mk_rank),
                    "--exclude-regex",
                    ".*(embed_tokens|lm_head).*",
                    "--quiet",
                ],
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                out["mergekit_rows"].append({"energy": energy, "error": proc.stderr[-1500:]})
                continue
            from peft import PeftModel

            mk_g, mk_params = _global_energy_of(mk_out, base, tuned)
            pm = PeftModel.from_pretrained(load_default_model()[0], str(mk_out)).merge_and_unload()
            mk_acc = _accuracy(pm, tok, task, args.n_eval)
            mk_gain = (mk_acc - base_acc) / (ft_acc - base_acc) if ft_acc != base_acc else float("nan")
            mk = {
                "energy_of_ours": energy,
                "rank": mk_rank,
                "cli_wall_seconds": round(wall, 2),
                "seconds_minus_import": round(wall - out.get("mergekit_import_seconds", 0.0), 2),
                "global_energy": round(mk_g, 4),
                "params": mk_params,
                "acc": mk_acc,
                "gain_kept": round(mk_gain, 3),
            }
            out["mergekit_rows"].append(mk)
            print(mk, flush=True)
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
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        _case_main(sys.argv[2:])
        return
    ap.add_argument("part", choices=["speed", "quality", "phlora"])
    ap.add_argument(
        "--model",
        choices=["embedded", "tiny"],
        default="embedded",
        help="speed: the embedded SmolLM2-135M (default) or the issue's tiny Llama h=512",
    )
    ap.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="speed: dtype of the base and of the saved adapter tensors",
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument(
        "--rmm", nargs="+", default=["1", "2", "2:position", "3"], help="quality: RMM variants as K[:coeff_scope]"
    )
    ap.add_argument(
        "--rmm-only",
        action="store_true",
        help="quality: add the --rmm rows to the existing merging_quality.json, keep its other rows",
    )
    ap.add_argument("--energies", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    fn = {"speed": bench_speed, "quality": bench_quality, "phlora": bench_phlora}[args.part]
    t0 = time.perf_counter()
    result = fn(args)
    result.update(
        env=_env(),
        command=" ".join(["python", "bench/merging.py", *sys.argv[1:]]),
        wall_seconds=round(time.perf_counter() - t0, 1),
        table=_table(result),
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_tiny" if args.part == "speed" and args.model == "tiny" else ""
    if args.part == "speed" and args.dtype != "float32":
        suffix += "_bf16"  # a separate file: the fp32 rows stay as they are
    path = RESULTS / f"merging_{args.part}{suffix}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print(result["table"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
