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

Two presets. The default (fast) tour prunes with SparseGPT only, scores perplexity on 2 wiki windows
and accuracy on 100 examples, and trains 50 + 2 x 10 steps (linear lr decay): a few minutes on 2 CPU cores.
:meth:`DemoConfig.full` (``adapterlab demo --full``) is the long tour: magnitude, Wanda and SparseGPT
compared, 10 windows, 200 examples, 100 + 2 x 30 steps and every extra task scored.

Everything runs in memory on CPU with one copy of the model: pruning works in place, the pruned
base shares every tensor with the adapted model but the adapted weights, and each adapter loaded for
evaluation is unloaded afterwards. Each finished row is handed to ``on_row`` and the whole result so
far is written to ``<output>/results.json`` at once, so an interrupted tour keeps what it measured.
Adapters adapt ``targets`` of the last ``adapt_layers`` decoder layers (default 30: every layer of the
embedded SmolLM2-135M).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
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
LR_SCHEDULES = ("linear", "constant")
RESULTS_FILE = "results.json"

#: The long tour (``adapterlab demo --full``, the defaults before the fast tour): every pruning method
#: compared, more calibration, evaluation and training, and the extra tasks scored after compression.
FULL: dict[str, Any] = {
    "methods": ["magnitude", "wanda", "sparsegpt"],
    "nsamples": 16,
    "calib_seqlen": 512,
    "eval_windows": 10,
    "task_n": 200,
    "steps": 100,
    "lr": 2e-3,
    "lr_schedule": "constant",
    "extra_steps": 30,
    "extra_eval": True,
    "serve_requests": 12,
}


@dataclass
class DemoConfig:
    """Options of the tour (names and numbers only; validated on creation). The defaults are the fast
    tour; :meth:`full` gives the long one.

    Attributes:
        methods: pruning methods compared in the ``prune`` stage (magnitude | wanda | sparsegpt).
        sparsity / pattern: unstructured sparsity, or an ``"N:M"`` pattern instead.
        nsamples / calib_seqlen: calibration windows for Wanda/SparseGPT.
        eval_seqlen / eval_windows: wiki perplexity windows (None = all).
        eval_batch_size: perplexity windows per forward pass (one 512-token window holds ~0.1 GB of
            logits; more windows per pass raise the peak memory, not the speed).
        task / task_n: the task the adapter learns and how many test examples score it (None = all).
        stages: stages to run; ``dense`` and ``prune`` always run, each later stage needs every one before it.
        adapter: sparsity-preserving tuner of the ``adapt`` stage: ``lors`` or ``spp``.
        rank: rank of every low-rank adapter (LoRS, the extra LoRAs, the PHLoRA extraction).
        targets / adapt_layers: projections adapted, in the last ``adapt_layers`` decoder layers.
        steps / extra_steps: optimizer steps for the main adapter / each extra LoRA.
        batch_size / max_length / lr: training batches (examples, tokens) and AdamW learning rate.
        lr_schedule: ``linear`` (decays to 0 over the steps) or ``constant``.
        train_n: training examples drawn per task (None = the whole train split).
        extra_tasks: tasks of the extra LoRAs compressed together with the extracted adapter.
        extra_eval: also score each extra task's compressed adapter (``task_n`` examples each).
        compress_rank: shared-basis rank c (``c = n * rank`` is lossless).
        serve_requests / serve_tokens: size of the mixed serving batch and tokens generated each.
        seed: seeds pruning calibration, training batches and initialisations.
    """

    methods: list[str] = field(default_factory=lambda: ["sparsegpt"])
    sparsity: float = 0.5
    pattern: str | None = None
    nsamples: int = 8
    calib_seqlen: int = 256
    eval_seqlen: int = 512
    eval_windows: int | None = 2
    eval_batch_size: int = 1
    task: str = "sentiment"
    task_n: int | None = 100
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    adapter: str = "lors"
    rank: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    adapt_layers: int = 30
    steps: int = 50
    extra_steps: int = 10
    batch_size: int = 8
    train_n: int | None = 512
    max_length: int = 64
    lr: float = 5e-3
    lr_schedule: str = "linear"
    extra_tasks: list[str] = field(default_factory=lambda: ["domain", "compare"])
    extra_eval: bool = False
    compress_rank: int = 12
    serve_requests: int = 6
    serve_tokens: int = 8
    seed: int = 0

    @classmethod
    def full(cls, **overrides: Any) -> DemoConfig:
        """The long tour (:data:`FULL` over the defaults), with ``overrides`` on top."""
        return cls(**{**FULL, **overrides})

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
            "eval_batch_size",
        ):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        for key in ("train_n", "task_n", "eval_windows"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be None or an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")

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


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The causal-LM loss of ``batch`` (mean cross-entropy over the tokens whose label is not -100),
    with the LM head run on the predicting positions only.

    Equals ``model(**batch).loss``; the prompt tokens of a task example carry no label, so skipping
    their (b, T, V) logits saves most of the head's forward and backward. For adapters injected into
    the layers (the LoRA family, LoRS, SPP: a peft model's decoder runs them); models without
    ``get_decoder`` / ``get_output_embeddings`` fall back to the plain forward.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(inner, "get_decoder", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or head is None or decoder is inner:
        return model(**batch).loss
    hidden = decoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).last_hidden_state  # (b, T, d)
    target = batch["labels"][:, 1:]  # (b, T-1): token t+1 is predicted at position t
    keep = target != -100  # (b, T-1)
    logits = head(hidden[:, :-1][keep])  # (b, T-1, d) -> (k, d) -> (k, V)
    return torch.nn.functional.cross_entropy(logits.float(), target[keep])


def length_grouped_batches(
    lengths: torch.Tensor, *, batch_size: int, steps: int, seed: int, group: int = 16
) -> list[torch.Tensor]:
    """``steps`` batches of example indices, each of examples of similar length (little padding).

    Every epoch is a fresh permutation cut into groups of ``group * batch_size`` examples; each group
    is sorted by length and cut into batches, and the batches of a group are shuffled (as
    ``transformers``' ``group_by_length``). Examples are drawn without replacement within an epoch.

    Args:
        lengths: ``(n,)`` tokens of each example.
        batch_size: examples per batch (the last batch of a group may be smaller).
        steps: how many batches.
        seed: seeds the permutations.
        group: batches per length-sorted group.

    Returns:
        ``steps`` LongTensors of indices into ``lengths``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = int(lengths.numel())
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)  # (n,)
        for chunk in perm.split(group * batch_size):
            ordered = chunk[torch.argsort(lengths[chunk], descending=True, stable=True)]
            batches = list(ordered.split(batch_size))
            out.extend(batches[j] for j in torch.randperm(len(batches), generator=gen).tolist())
    return out[:steps]


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
    schedule: str = "constant",
) -> tuple[list[float], float]:
    """AdamW on the trainable parameters for ``steps`` mini-batches of similar-length examples
    (:func:`length_grouped_batches`); returns (losses, tokens/s).

    ``schedule``: ``constant`` lr, or ``linear``: step i (from 0) uses ``lr * (1 - i / steps)``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    factor = (lambda i: 1.0 - i / steps) if schedule == "linear" else (lambda i: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    lengths = batches["attention_mask"].sum(1)  # (n,)
    order = length_grouped_batches(lengths, batch_size=batch_size, steps=steps, seed=seed)
    step = progress(description, steps)
    losses: list[float] = []
    tokens = 0
    model.train()
    start = time.perf_counter()
    for idx in order:
        batch = {k: v[idx] for k, v in batches.items()}  # (batch, longest)
        width = int(lengths[idx].max())
        batch = {k: v[:, :width] for k, v in batch.items()}  # drop all-padding columns
        loss = answer_loss(model, batch)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        step(1)
    model.eval()
    return losses, tokens / max(time.perf_counter() - start, 1e-9)


@dataclass
class ZeroMask:
    """Where one weight is zero, one bit per entry (an eighth of a bool mask's memory)."""

    shape: tuple[int, ...]
    bits: torch.Tensor  # (ceil(numel / 8),) uint8, entry i is bit i % 8 of byte i // 8

    @classmethod
    def of(cls, weight: torch.Tensor) -> ZeroMask:
        flat = (weight == 0).reshape(-1)  # (numel,)
        pad = (-flat.numel()) % 8
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])  # (numel + pad,)
        shifts = torch.arange(8, dtype=torch.uint8)  # (8,)
        bits = (flat.view(-1, 8).to(torch.uint8) << shifts).sum(1, dtype=torch.uint8)  # (numel/8, 8) -> (numel/8,)
        return cls(tuple(weight.shape), bits)

    def dim(self) -> int:
        return len(self.shape)

    def dense(self) -> torch.Tensor:
        """The bool mask, shape ``self.shape``."""
        numel = math.prod(self.shape)
        shifts = torch.arange(8, dtype=torch.uint8)  # (8,)
        flat = ((self.bits[:, None] >> shifts) & 1).bool().view(-1)  # (numel/8, 8) -> (numel + pad,)
        return flat[:numel].view(self.shape)


def zero_masks(model: nn.Module) -> dict[str, ZeroMask]:
    """The zeros of every 2-D weight that has any (what :func:`zeros_kept` checks against), bit-packed."""
    out: dict[str, ZeroMask] = {}
    for k, w in model.state_dict().items():
        if w.dim() == 2 and "weight" in k and bool((w == 0).any()):
            out[k] = ZeroMask.of(w)
    return out


def zeros_kept(base_state: dict[str, Any], model: nn.Module) -> bool:
    """``(W == 0) ⊇ (W_base == 0)`` for every 2-D weight the base has zeros in.

    ``base_state`` holds the base's weights, bool masks of their zeros, or :class:`ZeroMask` s
    (:func:`zero_masks`).
    """
    state = model.state_dict()
    for k, w0 in base_state.items():
        if w0.dim() != 2 or "weight" not in k or k not in state:
            continue
        if isinstance(w0, ZeroMask):
            zero = w0.dense()
        else:
            zero = w0 if w0.dtype == torch.bool else w0 == 0
        if not bool(zero.any()):
            continue
        if bool((zero & (state[k] != 0)).any()):
            return False
    return True


def shared_copy(model: nn.Module, own: set[str]) -> nn.Module:
    """A copy of ``model`` that owns fresh copies of the tensors named in ``own`` and shares every
    other parameter and buffer with ``model`` (no second copy of the model in memory).

    The shared tensors must not be written afterwards; the demo writes only the adapted weights
    (the merge), which the copy owns.
    """
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    unknown = sorted(own - set(tensors))
    if unknown:
        raise ValueError(f"own names tensors the model lacks: {unknown[:3]}")
    memo: dict[int, Any] = {id(t): t for name, t in tensors.items() if name not in own}
    return copy.deepcopy(model, memo)


def _adapted_weights(model: nn.Module, regex: str) -> set[str]:
    """Names of the weights of the linear layers that ``regex`` (a peft target regex) matches."""
    import re

    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(regex, n)}


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` through a temporary file and a rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class _Tour:
    """The state shared by the stages: config, output folder, rows so far, progress and results file."""

    def __init__(
        self,
        config: DemoConfig,
        out: Path,
        progress: ProgressFactory,
        on_row: Callable[[DemoRow], None] | None,
    ) -> None:
        self.config = config
        self.out = out
        self.progress = progress
        self.on_row = on_row
        self.rows: list[DemoRow] = []
        self.details: dict[str, Any] = {"output": str(out)}
        self.start = time.perf_counter()
        self.stage = ""
        self.model_name = ""

    def at(self, stage: str, model_name: str) -> None:
        """Name the stage and model that the progress lines describe from now on."""
        self.stage, self.model_name = stage, model_name

    def bar(self, description: str, total: int | None) -> Callable[[int], None]:
        """The progress factory of the stages: each line names the stage and model."""
        return self.progress(f"{self.stage} · {self.model_name}: {description}", total)

    def result(self) -> DemoResult:
        return DemoResult(self.rows, self.details, time.perf_counter() - self.start)

    def save(self, *, complete: bool = False) -> None:
        """Write ``results.json``: the config, every finished row, the details, and whether the tour ended."""
        payload = {
            "config": asdict(self.config),
            **self.result().to_dict(),
            "stages_done": sorted({r.stage for r in self.rows}, key=STAGES.index),
            "complete": complete,
        }
        _write_json(self.out / RESULTS_FILE, payload)

    def emit(self, row: DemoRow) -> DemoRow:
        """A finished row: append it, write the results file, hand it to ``on_row``."""
        self.rows.append(row)
        self.save()
        if self.on_row is not None:
            self.on_row(row)
        return row


def run_tour(
    config: DemoConfig,
    *,
    output: str | Path | None = None,
    progress: ProgressFactory | None = None,
    load: Callable[[], tuple[nn.Module, Any]] | None = None,
    on_row: Callable[[DemoRow], None] | None = None,
) -> DemoResult:
    """Run the tour; return its table and details.

    Args:
        config: a :class:`DemoConfig`.
        output: folder for the adapters / bundle / ``results.json`` (a temporary folder when None).
        progress: progress factory (the CLI passes a rich one); each description names the stage
            and the model being worked on.
        load: returns ``(model, tokenizer)``; default the embedded model (tests pass a tiny one).
        on_row: called with each row the moment its stage finishes (after ``results.json`` holds it).
    """
    import tempfile

    from adapterlab import data, evaluate, models
    from adapterlab.pruning import prune_

    torch.manual_seed(config.seed)
    out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="adapterlab-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    tour = _Tour(config, out, progress or _silent, on_row)
    details = tour.details
    tour.save()  # an empty table from the start: a stale file of an earlier run never passes for this one
    dense, tok = load() if load is not None else models.load_default_model()
    dense.eval()
    ids = data.eval_ids(tok, corpus="wiki", split="test")

    def measure(row: DemoRow, model: nn.Module, sparsity: bool = True) -> DemoRow:
        tour.at(row.stage, row.name)
        t = time.perf_counter()
        windows = len(ids) // config.eval_seqlen
        if config.eval_windows is not None:
            windows = min(windows, config.eval_windows)
        row.perplexity = evaluate.perplexity(
            model,
            ids,
            seqlen=config.eval_seqlen,
            batch_size=config.eval_batch_size,
            max_windows=config.eval_windows,
            progress=tour.bar,
        )
        row.tokens_per_s = windows * config.eval_seqlen / max(time.perf_counter() - t, 1e-9)
        row.accuracy = evaluate.task_accuracy(model, tok, config.task, n=config.task_n, progress=tour.bar).accuracy
        if sparsity:
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            rep = evaluate.sparsity_report(inner, pattern=config.pattern)
            row.sparsity, row.nm_valid = rep.global_sparsity, rep.nm_valid
        return row

    # 1. dense --------------------------------------------------------------------------------
    t = time.perf_counter()
    row = measure(DemoRow("dense", "dense"), dense)
    row.seconds = time.perf_counter() - t
    tour.emit(row)

    # 2. prune: compare methods, keep the best as the base of the rest --------------------------
    # One method prunes the model in place; a comparison keeps the dense weights and the best
    # pruned weights aside (two state copies, only then) and loads the best at the end.
    model = dense
    compare = len(config.methods) > 1
    dense_state = {k: v.detach().clone() for k, v in dense.state_dict().items()} if compare else None
    calib = None
    best: tuple[float, str, dict[str, torch.Tensor] | None] | None = None
    for i, method in enumerate(config.methods):
        name = f"{method} {config.pattern or f'{config.sparsity:.0%}'}"
        tour.at("prune", name)
        if i > 0 and dense_state is not None:
            model.load_state_dict(dense_state)
        if method != "magnitude" and calib is None:  # one calibration set for every method
            calib = data.calibration_ids(tok, n_samples=config.nsamples, seqlen=config.calib_seqlen, seed=config.seed)
        t = time.perf_counter()
        prune_(
            model,
            method,
            None if config.pattern else config.sparsity,
            pattern=config.pattern,
            calibration=calib if method != "magnitude" else None,
            progress=tour.bar,
        )
        prune_s = time.perf_counter() - t
        row = measure(DemoRow("prune", name), model)
        row.seconds = time.perf_counter() - t
        row.note = f"pruned in {prune_s:.1f} s"
        layer_rows = evaluate.sparsity_report(model).to_dict()["layers"]
        details.setdefault("sparsity_layers", {})[row.name] = [
            {"name": r["name"], "sparsity": r["sparsity"]} for r in layer_rows
        ]
        ppl = row.perplexity if row.perplexity is not None else float("inf")
        if best is None or ppl < best[0]:
            if compare:
                best = None  # free the previous best before copying the new one
                best = (ppl, method, {k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                best = (ppl, method, None)
        details["base"] = {"method": best[1], "perplexity": best[0]}
        tour.emit(row)
    assert best is not None
    if best[2] is not None:
        model.load_state_dict(best[2])
    del dense_state, best, dense
    _plot(details, "sparsity_plot", "plot_layer_sparsity", details["sparsity_layers"], out / "layer_sparsity.png")
    tour.save()

    if not config.wants("adapt"):
        tour.save(complete=True)
        return tour.result()

    # 3. adapt: a sparsity-preserving adapter on the pruned base ---------------------------------
    import peft

    from adapterlab import LorsConfig, SppConfig

    regex = target_regex(model, config.targets, config.adapt_layers)
    base_zeros = zero_masks(model)  # the pruned base's zeros, for the check after the merge
    # the pruned base for extract / compress / serve: it owns only the weights the adapter merges into
    base = shared_copy(model, _adapted_weights(model, regex))
    train = data.tokenize_for_training(
        tok, config.task, n=config.train_n, max_length=config.max_length, seed=config.seed, return_tensors="pt"
    )
    name = f"+ {config.adapter.upper()} r{config.rank} ({config.steps} steps)"
    tour.at("adapt", name)
    t = time.perf_counter()
    torch.manual_seed(config.seed)
    if config.adapter == "lors":
        peft_cfg: Any = LorsConfig(r=config.rank, lora_alpha=2.0 * config.rank**0.5, target_modules=regex)
    else:
        peft_cfg = SppConfig(
            r=config.rank, lora_alpha=2.0 * config.rank, target_modules=regex, lora_dropout=0.0, groups=8
        )
    pm = peft.get_peft_model(model, peft_cfg)
    losses, train_tps = train_steps(
        pm,
        train,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        progress=tour.bar,
        description=f"train {config.adapter}",
        schedule=config.lr_schedule,
    )
    adapter_dir = out / f"{config.adapter}-{config.task}"
    pm.save_pretrained(str(adapter_dir))
    train_s = time.perf_counter() - t
    row = measure(DemoRow("adapt", name), pm)
    row.size_bytes, row.seconds = _dir_bytes(adapter_dir), time.perf_counter() - t
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    row.note = f"loss {losses[0]:.2f}->{losses[-1]:.2f}, train {train_tps:.0f} tok/s"
    details["adapt"] = {
        "adapter": config.adapter,
        "dir": str(adapter_dir),
        "losses": losses,
        "train_seconds": train_s,
        "train_tokens_per_s": train_tps,
        "trainable_params": trainable,
        "targets": regex,
    }
    tour.emit(row)
    if not config.wants("merge"):
        tour.save(complete=True)
        return tour.result()

    # 4. merge keeping sparsity ------------------------------------------------------------------
    tour.at("merge", "merged into base")
    t = time.perf_counter()
    merged = pm.merge_and_unload()
    del pm
    kept = zeros_kept(base_zeros, merged)
    del base_zeros
    if not kept:
        raise RuntimeError("merging the sparsity-preserving adapter made a pruned weight non-zero")
    row = measure(DemoRow("merge", "merged into base"), merged)
    row.seconds, row.note = time.perf_counter() - t, "every pruned zero still zero"
    details["merge"] = {"zeros_kept": kept}
    tour.emit(row)
    if not config.wants("extract"):
        tour.save(complete=True)
        return tour.result()

    # 5. extract: PHLoRA from the merged model vs the pruned base -------------------------------
    from adapterlab import extract_lora

    name = f"PHLoRA r{config.rank} of the merge"
    tour.at("extract", name)
    t = time.perf_counter()
    ext = extract_lora(base, merged, rank=config.rank, extras="skip", progress=tour.bar)
    del merged, model  # the merged weights go; the base keeps every tensor it shares
    ext_dir = ext.save(out / f"phlora-{config.task}", overwrite=True)
    em = peft.PeftModel.from_pretrained(base, str(ext_dir))
    row = measure(DemoRow("extract", name), em, sparsity=False)
    base = em.unload()  # the LoRA layers go, the base weights were never touched
    del em
    row.size_bytes, row.seconds = _dir_bytes(ext_dir), time.perf_counter() - t
    row.note = f"energy kept {ext.global_energy:.1%}; delta is dense (not merged)"
    details["extract"] = {
        "dir": str(ext_dir),
        "global_energy": ext.global_energy,
        "ranks": ext.ranks,
        "modules": [m.to_dict() for m in ext.modules if m.stored_as == "lora"],
    }
    _plot(details["extract"], "plot", "plot_extraction_energy", ext, out / "extract_energy.png")
    del ext
    tour.emit(row)
    if not config.wants("compress"):
        tour.save(complete=True)
        return tour.result()

    # 6. compress: extra LoRAs + the extracted adapter into one shared basis ---------------------
    from adapterlab import compress_adapters

    t = time.perf_counter()
    sources: dict[str, Any] = {config.task: str(ext_dir)}
    for i, task in enumerate(config.extra_tasks):
        tour.at("compress", f"LoRA {task}")
        torch.manual_seed(config.seed + 1 + i)
        lcfg = peft.LoraConfig(r=config.rank, lora_alpha=2 * config.rank, target_modules=regex, lora_dropout=0.0)
        lm = peft.get_peft_model(base, lcfg)
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
            progress=tour.bar,
            description=f"train LoRA {task}",
            schedule=config.lr_schedule,
        )
        lm.save_pretrained(str(out / f"lora-{task}"))
        sources[task] = str(out / f"lora-{task}")
        base = lm.unload()
        del lm
    name = f"{len(sources)} adapters -> shared basis c{config.compress_rank}"
    tour.at("compress", name)
    # every adapter was trained on the same in-memory pruned base: skip the name check
    bundle = compress_adapters(
        sources, rank=config.compress_rank, mode="full", check_base=False, allow_mixed_ranks=True, progress=tour.bar
    )
    bundle_dir = bundle.save(out / "bundle", overwrite=True)
    storage = bundle.storage()
    cdir = bundle.export(config.task, out / f"compressed-{config.task}", overwrite=True)
    cm = peft.PeftModel.from_pretrained(base, str(cdir))
    row = measure(DemoRow("compress", name), cm, sparsity=False)
    base = cm.unload()
    del cm
    accs: dict[str, float | None] = {config.task: row.accuracy}
    if config.extra_eval:
        for task in config.extra_tasks:
            tour.at("compress", f"compressed {task}")
            xm = bundle_model(bundle, task, base, out)
            accs[task] = evaluate.task_accuracy(xm, tok, task, n=config.task_n, progress=tour.bar).accuracy
            base = xm.unload()
            del xm
    errors = bundle.errors.per_adapter()
    row.size_bytes, row.seconds = _dir_bytes(Path(bundle_dir)), time.perf_counter() - t
    scored = ", ".join(f"{k} {v:.2f}" for k, v in accs.items() if k != config.task and v is not None)
    row.note = f"{storage['ratio']:.1f}x fewer params than {len(sources)} LoRAs; err {bundle.errors.mean:.1%}" + (
        f"; {scored}" if scored else ""
    )
    details["compress"] = {
        "dir": str(bundle_dir),
        "storage": storage,
        "errors": errors,
        "accuracy": accs,
    }
    tour.emit(row)
    if not config.wants("serve"):
        tour.save(complete=True)
        return tour.result()

    # 7. serve a mixed batch ------------------------------------------------------------------
    from adapterlab import AdapterServer, Request

    t = time.perf_counter()
    server = AdapterServer(base, tokenizer=tok, check_base=False, max_batch_size=config.serve_requests)
    names = server.add_bundle(bundle, key="tour")
    choices: list[str | None] = [None, *names]
    name = f"mixed batch: {config.serve_requests} requests, {len(choices)} adapters"
    tour.at("serve", name)
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
    details["serve"] = {
        "adapters": names,
        "generated_tokens": generated,
        "generate_seconds": gen_s,
        "samples": [{"adapter": c.adapter, "text": c.text} for c in completions[: len(choices)]],
    }
    tour.emit(
        DemoRow(
            "serve",
            name,
            tokens_per_s=generated / max(gen_s, 1e-9),
            seconds=time.perf_counter() - t,
            note=f"base + {', '.join(names)} in one batch",
        )
    )
    tour.save(complete=True)
    return tour.result()


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
