"""The main job: a tour of adapterlab on the embedded default model.

The tour runs every step of the adapter lifecycle on one base and returns one table:

1. ``dense``    evaluate the dense SmolLM2-135M-Instruct (held-out wiki perplexity, task accuracy);
2. ``prune``    prune it with each requested method and evaluate again; the method with the lowest
   perplexity becomes the base of every later stage;
3. ``adapt``    train a sparsity-preserving adapter (LoRS or SPP) on the pruned base for the task;
4. ``merge``    merge it into the base and check that every pruned zero is still zero;
5. ``extract``  extract a LoRA from the merged model vs the pruned base (PHLoRA) and evaluate it;
6. ``compress`` train small LoRAs for other tasks, compress them with the extracted adapter into one
   shared basis and evaluate the compressed sentiment adapter;
7. ``serve``    serve a mixed batch (base + every compressed adapter) with :class:`AdapterServer`.

Everything runs in memory on CPU; adapters and the bundle are written under ``DemoConfig.output``.
Adapters adapt ``targets`` of the last ``adapt_layers`` decoder layers (default 30: every layer of
the embedded SmolLM2-135M; fewer layers make the backward pass cheaper but, measured on the
SparseGPT-50 % base, 30 steps on the last 8 layers do not learn the task while 100 steps on all
layers do).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterlab.progress import ProgressFactory, _silent

logger = logging.getLogger(__name__)

STAGES = ("dense", "prune", "adapt", "merge", "extract", "compress", "serve")
ADAPTERS = ("lors", "spp")


@dataclass
class DemoConfig:
    """Options of the tour (names and numbers only; validated on creation).

    Attributes:
        methods: pruning methods compared in the ``prune`` stage (magnitude | wanda | sparsegpt).
        sparsity / pattern: unstructured sparsity, or an ``"N:M"`` pattern instead.
        nsamples / calib_seqlen: calibration windows for Wanda/SparseGPT.
        eval_seqlen / eval_windows: wiki perplexity windows (None = all).
        task / task_n: the task the adapter learns and how many test examples score it (None = all).
        stages: stages to run; ``dense`` and ``prune`` always run, each later stage needs every one before it.
        adapter: sparsity-preserving tuner of the ``adapt`` stage: ``lors`` or ``spp``.
        rank: rank of every low-rank adapter (LoRS, the extra LoRAs, the PHLoRA extraction).
        targets / adapt_layers: projections adapted, in the last ``adapt_layers`` decoder layers.
        steps / extra_steps: optimizer steps for the main adapter / each extra LoRA.
        batch_size / max_length / lr: training batches (examples, tokens) and AdamW learning rate.
        train_n: training examples drawn per task (None = the whole train split).
        extra_tasks: tasks of the extra LoRAs compressed together with the extracted adapter.
        compress_rank: shared-basis rank c (``c = n * rank`` is lossless).
        serve_requests / serve_tokens: size of the mixed serving batch and tokens generated each.
        seed: seeds pruning calibration, training batches and initialisations.
    """

    methods: list[str] = field(default_factory=lambda: ["magnitude", "wanda", "sparsegpt"])
    sparsity: float = 0.5
    pattern: str | None = None
    nsamples: int = 16
    calib_seqlen: int = 512
    eval_seqlen: int = 512
    eval_windows: int | None = 10
    task: str = "sentiment"
    task_n: int | None = 200
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    adapter: str = "lors"
    rank: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    adapt_layers: int = 30
    steps: int = 100
    extra_steps: int = 30
    batch_size: int = 8
    train_n: int | None = 512
    max_length: int = 64
    lr: float = 2e-3
    extra_tasks: list[str] = field(default_factory=lambda: ["domain", "compare"])
    compress_rank: int = 12
    serve_requests: int = 12
    serve_tokens: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        from adapterlab.data import get_task
        from adapterlab.pruning import PRUNERS

        if not self.methods:
            raise ValueError("methods must name at least one pruning method")
        for m in self.methods:
            PRUNERS.get(m)
        if self.pattern is None and not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.pattern is not None:
            from adapterlab.pruning import parse_pattern

            parse_pattern(self.pattern)
        get_task(self.task)
        for t in self.extra_tasks:
            get_task(t)
        for s in self.stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; choose from: {', '.join(STAGES)}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter={self.adapter!r}: choose one of {', '.join(ADAPTERS)}")
        if not self.targets:
            raise ValueError("targets must name at least one projection (e.g. q_proj,v_proj)")
        for key in (
            "rank",
            "adapt_layers",
            "steps",
            "extra_steps",
            "batch_size",
            "max_length",
            "compress_rank",
            "serve_requests",
            "serve_tokens",
            "nsamples",
            "calib_seqlen",
            "eval_seqlen",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if self.train_n is not None and (
            isinstance(self.train_n, bool) or not isinstance(self.train_n, int) or self.train_n < 1
        ):
            raise ValueError(f"train_n must be None or an integer >= 1, got {self.train_n!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def wants(self, stage: str) -> bool:
        """True when ``stage`` and every later-tour stage before it are requested (each needs the last)."""
        i = STAGES.index(stage)
        return all(s in self.stages for s in STAGES[2 : i + 1])


@dataclass
class DemoRow:
    """One line of the results table.

    ``tokens_per_s`` is the forward throughput of the perplexity evaluation (``serve``: generated
    tokens per second of the mixed batch); ``size_bytes`` what the stage stored on disk.
    """

    stage: str
    name: str
    perplexity: float | None = None
    accuracy: float | None = None
    sparsity: float | None = None
    size_bytes: int | None = None
    tokens_per_s: float | None = None
    seconds: float = 0.0
    note: str = ""
    nm_valid: bool | None = None


@dataclass
class DemoResult:
    """Rows plus the details of each stage (JSON-ready)."""

    rows: list[DemoRow]
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rows": rows_to_dicts(self.rows), "details": self.details, "seconds": self.seconds}


def rows_to_dicts(rows: list[DemoRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def target_regex(model: nn.Module, targets: list[str], last_layers: int) -> str:
    """A peft ``target_modules`` regex for ``targets`` in the last ``last_layers`` decoder layers."""
    from adapterlab.models import decoder_layers

    n = len(decoder_layers(model))
    first = max(0, n - last_layers)
    layers = "|".join(str(i) for i in range(first, n))
    return rf".*\.layers\.({layers})\..*\.({'|'.join(targets)})"


def train_steps(
    model: nn.Module,
    batches: dict[str, torch.Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: ProgressFactory,
    description: str,
) -> tuple[list[float], float]:
    """AdamW on the trainable parameters for ``steps`` random mini-batches; returns (losses, tokens/s)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    n = batches["input_ids"].shape[0]
    step = progress(description, steps)
    losses: list[float] = []
    tokens = 0
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        batch = {k: v[idx] for k, v in batches.items()}  # (batch, longest)
        width = int(batch["attention_mask"].sum(1).max())
        batch = {k: v[:, :width] for k, v in batch.items()}  # drop all-padding columns
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        step(1)
    model.eval()
    return losses, tokens / max(time.perf_counter() - start, 1e-9)


def zeros_kept(base_state: dict[str, torch.Tensor], model: nn.Module) -> bool:
    """``(W == 0) ⊇ (W_base == 0)`` for every 2-D weight the base has zeros in."""
    state = model.state_dict()
    for k, w0 in base_state.items():
        if w0.dim() != 2 or "weight" not in k or k not in state or not bool((w0 == 0).any()):
            continue
        if bool(((w0 == 0) & (state[k] != 0)).any()):
            return False
    return True


def run_tour(
    config: DemoConfig,
    *,
    output: str | Path | None = None,
    progress: ProgressFactory | None = None,
    load: Callable[[], tuple[nn.Module, Any]] | None = None,
) -> DemoResult:
    """Run the tour; return its table and details.

    Args:
        config: a :class:`DemoConfig`.
        output: folder for the adapters / bundle (a temporary folder when None).
        progress: progress factory (the CLI passes a rich one).
        load: returns ``(model, tokenizer)``; default the embedded model (tests pass a tiny one).
    """
    import tempfile

    from adapterlab import data, evaluate, models
    from adapterlab.pruning import prune_

    t_start = time.perf_counter()
    progress = progress or _silent
    torch.manual_seed(config.seed)
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="adapterlab-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = load() if load is not None else models.load_default_model()
    dense.eval()
    ids = data.eval_ids(tok, corpus="wiki", split="test")
    rows: list[DemoRow] = []
    details: dict[str, Any] = {"output": str(out)}

    def measure(row: DemoRow, model: nn.Module, task: str | None = None, sparsity: bool = True) -> DemoRow:
        t = time.perf_counter()
        windows = len(ids) // config.eval_seqlen
        if config.eval_windows is not None:
            windows = min(windows, config.eval_windows)
        with torch.no_grad():
            row.perplexity = evaluate.perplexity(
                model, ids, seqlen=config.eval_seqlen, max_windows=config.eval_windows, progress=progress
            )
        row.tokens_per_s = windows * config.eval_seqlen / max(time.perf_counter() - t, 1e-9)
        row.accuracy = evaluate.task_accuracy(
            model, tok, task or config.task, n=config.task_n, progress=progress
        ).accuracy
        if sparsity:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            rep = evaluate.sparsity_report(inner, pattern=config.pattern)
            row.sparsity, row.nm_valid = rep.global_sparsity, rep.nm_valid
        return row

    # 1. dense --------------------------------------------------------------------------------
    t = time.perf_counter()
    rows.append(measure(DemoRow("dense", "dense"), dense))
    rows[-1].seconds = time.perf_counter() - t

    # 2. prune: compare methods, keep the best as the base of the rest --------------------------
    dense_state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    calib = None
    best: tuple[float, str, dict[str, torch.Tensor]] | None = None
    for method in config.methods:
        model = dense
        model.load_state_dict(dense_state)
        if method != "magnitude" and calib is None:
            calib = data.calibration_ids(tok, n_samples=config.nsamples, seqlen=config.calib_seqlen, seed=config.seed)
        t = time.perf_counter()
        prune_(
            model,
            method,
            None if config.pattern else config.sparsity,
            pattern=config.pattern,
            calibration=calib if method != "magnitude" else None,
            progress=progress,
        )
        prune_s = time.perf_counter() - t
        row = measure(DemoRow("prune", f"{method} {config.pattern or f'{config.sparsity:.0%}'}"), model)
        row.seconds = time.perf_counter() - t
        row.note = f"pruned in {prune_s:.1f} s"
        rows.append(row)
        layer_rows = evaluate.sparsity_report(model).to_dict()["layers"]
        details.setdefault("sparsity_layers", {})[row.name] = [
            {"name": r["name"], "sparsity": r["sparsity"]} for r in layer_rows
        ]
        if best is None or (row.perplexity or float("inf")) < best[0]:
            best = (
                row.perplexity or float("inf"),
                method,
                {k: v.detach().clone() for k, v in model.state_dict().items()},
            )
    assert best is not None
    base_state = best[2]
    details["base"] = {"method": best[1], "perplexity": best[0]}
    _plot(details, "sparsity_plot", "plot_layer_sparsity", details["sparsity_layers"], out / "layer_sparsity.png")
    del dense_state

    def pruned() -> nn.Module:
        m = copy.deepcopy(dense)
        m.load_state_dict(base_state)
        return m.eval()

    if not config.wants("adapt"):
        return DemoResult(rows, details, time.perf_counter() - t_start)

    # 3. adapt: a sparsity-preserving adapter on the pruned base ---------------------------------
    import peft

    from adapterlab import LorsConfig, SppConfig

    regex = target_regex(dense, config.targets, config.adapt_layers)
    train = data.tokenize_for_training(
        tok, config.task, n=config.train_n, max_length=config.max_length, seed=config.seed, return_tensors="pt"
    )
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.adapter == "lors":
        peft_cfg: Any = LorsConfig(r=config.rank, lora_alpha=2.0 * config.rank**0.5, target_modules=regex)
    else:
        peft_cfg = SppConfig(
            r=config.rank, lora_alpha=2.0 * config.rank, target_modules=regex, lora_dropout=0.0, groups=8
        )
    pm = peft.get_peft_model(pruned(), peft_cfg)
    losses, train_tps = train_steps(
        pm,
        train,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        progress=progress,
        description=f"train {config.adapter}",
    )
    adapter_dir = out / f"{config.adapter}-{config.task}"
    pm.save_pretrained(str(adapter_dir))
    train_s = time.perf_counter() - t
    row = measure(DemoRow("adapt", f"+ {config.adapter.upper()} r{config.rank} ({config.steps} steps)"), pm)
    row.size_bytes, row.seconds = _dir_bytes(adapter_dir), time.perf_counter() - t
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    row.note = f"loss {losses[0]:.2f}->{losses[-1]:.2f}, train {train_tps:.0f} tok/s"
    rows.append(row)
    details["adapt"] = {
        "adapter": config.adapter,
        "dir": str(adapter_dir),
        "losses": losses,
        "train_seconds": train_s,
        "train_tokens_per_s": train_tps,
        "trainable_params": trainable,
        "targets": regex,
    }
    if not config.wants("merge"):
        return DemoResult(rows, details, time.perf_counter() - t_start)

    # 4. merge keeping sparsity ------------------------------------------------------------------
    t = time.perf_counter()
    merged = pm.merge_and_unload()
    kept = zeros_kept(base_state, merged)
    if not kept:
        raise RuntimeError("merging the sparsity-preserving adapter made a pruned weight non-zero")
    row = measure(DemoRow("merge", "merged into base"), merged)
    row.seconds, row.note = time.perf_counter() - t, "every pruned zero still zero"
    rows.append(row)
    details["merge"] = {"zeros_kept": kept}
    if not config.wants("extract"):
        return DemoResult(rows, details, time.perf_counter() - t_start)

    # 5. extract: PHLoRA from the merged model vs the pruned base -------------------------------
    from adapterlab import extract_lora

    t = time.perf_counter()
    base = pruned()
    ext = extract_lora(base, merged, rank=config.rank, extras="skip", progress=progress)
    del merged
    ext_dir = ext.save(out / f"phlora-{config.task}", overwrite=True)
    em = peft.PeftModel.from_pretrained(base, str(ext_dir))
    row = measure(DemoRow("extract", f"PHLoRA r{config.rank} of the merge"), em, sparsity=False)
    row.size_bytes, row.seconds = _dir_bytes(ext_dir), time.perf_counter() - t
    row.note = f"energy kept {ext.global_energy:.1%}; delta is dense (not merged)"
    rows.append(row)
    details["extract"] = {
        "dir": str(ext_dir),
        "global_energy": ext.global_energy,
        "ranks": ext.ranks,
        "modules": [m.to_dict() for m in ext.modules if m.stored_as == "lora"],
    }
    _plot(details["extract"], "plot", "plot_extraction_energy", ext, out / "extract_energy.png")
    del em, base
    if not config.wants("compress"):
        return DemoResult(rows, details, time.perf_counter() - t_start)

    # 6. compress: extra LoRAs + the extracted adapter into one shared basis ---------------------
    from adapterlab import compress_adapters

    t = time.perf_counter()
    sources: dict[str, Any] = {config.task: str(ext_dir)}
    for i, task in enumerate(config.extra_tasks):
        torch.manual_seed(config.seed + 1 + i)
        lcfg = peft.LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=regex, lora_dropout=0.0)
        lm = peft.get_peft_model(pruned(), lcfg)
        batches = data.tokenize_for_training(
            tok, task, n=config.train_n, max_length=config.max_length, seed=config.seed, return_tensors="pt"
        )
        train_steps(
            lm,
            batches,
            steps=config.extra_steps,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed + 1 + i,
            progress=progress,
            description=f"train LoRA {task}",
        )
        lm.save_pretrained(str(out / f"lora-{task}"))
        sources[task] = str(out / f"lora-{task}")
        del lm
    # every adapter was trained on the same in-memory pruned base: skip the name check
    bundle = compress_adapters(
        sources, rank=config.compress_rank, mode="full", check_base=False, allow_mixed_ranks=True, progress=progress
    )
    bundle_dir = bundle.save(out / "bundle", overwrite=True)
    storage = bundle.storage()
    cdir = bundle.export(config.task, out / f"compressed-{config.task}", overwrite=True)
    cm = peft.PeftModel.from_pretrained(pruned(), str(cdir))
    row = measure(
        DemoRow("compress", f"{len(sources)} adapters -> shared basis c{config.compress_rank}"), cm, sparsity=False
    )
    accs = {config.task: row.accuracy}
    for task in config.extra_tasks:
        accs[task] = evaluate.task_accuracy(
            bundle_model(bundle, task, pruned(), out), tok, task, n=config.task_n, progress=progress
        ).accuracy
    row.size_bytes, row.seconds = _dir_bytes(Path(bundle_dir)), time.perf_counter() - t
    row.note = (
        f"{storage['ratio']:.1f}x fewer params than {len(sources)} LoRAs; err {bundle.errors.mean:.1%}; "
        + ", ".join(f"{k} {v:.2f}" for k, v in accs.items() if k != config.task)
    )
    rows.append(row)
    details["compress"] = {
        "dir": str(bundle_dir),
        "storage": storage,
        "errors": bundle.errors.per_adapter(),
        "accuracy": accs,
    }
    del cm
    if not config.wants("serve"):
        return DemoResult(rows, details, time.perf_counter() - t_start)

    # 7. serve a mixed batch ------------------------------------------------------------------
    from adapterlab import AdapterServer, Request

    t = time.perf_counter()
    server = AdapterServer(pruned(), tokenizer=tok, check_base=False, max_batch_size=config.serve_requests)
    names = server.add_bundle(bundle, key="tour")
    choices: list[str | None] = [None, *names]
    requests = []
    for i in range(config.serve_requests):
        adapter = choices[i % len(choices)]
        task = data.get_task(adapter if adapter in data.task_names() else config.task)
        ex = task.examples("test", n=config.serve_requests, seed=config.seed)[i % config.serve_requests]
        requests.append(Request(task.prompt(ex.text), adapter=adapter, max_new_tokens=config.serve_tokens))
    t_gen = time.perf_counter()
    completions = server.generate(requests)
    gen_s = time.perf_counter() - t_gen
    generated = sum(len(c.tokens) for c in completions)
    server.close()
    rows.append(
        DemoRow(
            "serve",
            f"mixed batch: {len(requests)} requests, {len(choices)} adapters",
            tokens_per_s=generated / max(gen_s, 1e-9),
            seconds=time.perf_counter() - t,
            note=f"base + {', '.join(names)} in one batch",
        )
    )
    details["serve"] = {
        "adapters": names,
        "generated_tokens": generated,
        "generate_seconds": gen_s,
        "samples": [{"adapter": c.adapter, "text": c.text} for c in completions[: len(choices)]],
    }
    return DemoResult(rows, details, time.perf_counter() - t_start)


def _plot(where: dict[str, Any], key: str, fn: str, data: Any, path: Path) -> None:
    """Write a PNG with :mod:`adapterlab.plots` and record its path; skipped without matplotlib."""
    try:
        from adapterlab import plots
    except ImportError:  # pragma: no cover - matplotlib is an optional extra
        return
    try:
        where[key] = str(getattr(plots, fn)(data, path))
    except ImportError:
        logger.info("matplotlib is not installed: %s not written", path.name)


def bundle_model(bundle: Any, name: str, base: nn.Module, out: Path) -> nn.Module:
    """``base`` with adapter ``name`` of a shared-basis bundle attached (exported as a PEFT LoRA dir)."""
    import peft

    path = bundle.export(name, out / f"compressed-{name}", overwrite=True)
    return peft.PeftModel.from_pretrained(base, str(path)).eval()


def run_demo(config: DemoConfig, *, progress: ProgressFactory | None = None) -> list[DemoRow]:
    """The pruning comparison only (``dense`` + ``prune`` rows); kept for callers of the old demo."""
    cfg = copy.copy(config)
    cfg.stages = ["dense", "prune"]
    return run_tour(cfg, progress=progress).rows
