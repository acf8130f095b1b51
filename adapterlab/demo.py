"""The main job: a tour of adapterlab on the embedded default model.

Today it evaluates the dense SmolLM2-135M-Instruct, prunes it with each requested method, and
evaluates again (held-out wiki perplexity, sentiment accuracy, exact sparsity), returning one
table. Later stages (sparsity-preserving adapters, merging, extraction, serving) extend it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from adapterlab.progress import ProgressFactory


@dataclass
class DemoConfig:
    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt"])
    sparsity: float = 0.5
    pattern: str | None = None
    nsamples: int = 32
    calib_seqlen: int = 512
    eval_seqlen: int = 512
    eval_windows: int | None = 20
    task: str = "sentiment"
    task_n: int | None = 300
    seed: int = 0

    def __post_init__(self) -> None:
        from adapterlab.pruning import PRUNERS
        from adapterlab.data import get_task

        for m in self.methods:
            PRUNERS.get(m)
        if not self.methods:
            raise ValueError("methods must name at least one pruning method")
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            from adapterlab.pruning import parse_pattern

            parse_pattern(self.pattern)
        get_task(self.task)


@dataclass
class DemoRow:
    name: str
    perplexity: float
    accuracy: float
    sparsity: float
    prune_seconds: float | None = None
    nm_valid: bool | None = None


def run_demo(config: DemoConfig, *, progress: ProgressFactory | None = None) -> list[DemoRow]:
    """Evaluate dense, prune with each method, evaluate again; return one row per model."""
    from adapterlab import data, evaluate, models
    from adapterlab.pruning import prune_

    torch.manual_seed(config.seed)
    tok = models.load_tokenizer(None)
    ids = data.eval_ids(tok, corpus="wiki", split="test")
    calib = None

    def measure(name: str, model: torch.nn.Module, seconds: float | None) -> DemoRow:
        ppl = evaluate.perplexity(
            model, ids, seqlen=config.eval_seqlen, max_windows=config.eval_windows, progress=progress
        )
        acc = evaluate.task_accuracy(model, tok, config.task, n=config.task_n, progress=progress)
        rep = evaluate.sparsity_report(model, pattern=config.pattern)
        return DemoRow(name, ppl, acc.accuracy, rep.global_sparsity, seconds, rep.nm_valid)

    rows = [measure("dense", models.load_model(None), None)]
    for method in config.methods:
        model = models.load_model(None)
        if method != "magnitude" and calib is None:
            calib = data.calibration_ids(
                tok, n_samples=config.nsamples, seqlen=config.calib_seqlen, seed=config.seed
            )
        start = time.perf_counter()
        prune_(
            model,
            method,
            None if config.pattern else config.sparsity,
            pattern=config.pattern,
            calibration=calib if method != "magnitude" else None,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        label = f"{method} {config.pattern or f'{config.sparsity:.0%}'}"
        rows.append(measure(label, model, seconds))
        del model
    return rows


def rows_to_dicts(rows: list[DemoRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
