"""Evaluation: windowed perplexity on held-out text, task accuracy, and a per-layer sparsity report.

All three work on plain ``transformers`` models and on peft-wrapped or quantized models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from adapterlab.models import decoder_layers
from adapterlab.pruning.base import LayerSparsity
from adapterlab.pruning.functional import check_nm, parse_pattern
from adapterlab.progress import ProgressFactory, track


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    progress: ProgressFactory | None = None,
) -> float:
    """Windowed perplexity of ``model`` on a 1-D token stream.

    The stream is cut into ``W = len(ids) // seqlen`` non-overlapping windows (the tail is dropped,
    as in the Wanda/SparseGPT evaluation); inside each window every token but the first is predicted
    from its prefix. Returns ``exp(total NLL / predicted tokens)``.

    Semantics:
        nll = 0; count = 0
        for w in range(W):
            x = ids[w*seqlen:(w+1)*seqlen]
            logp = log_softmax(model(x).logits)
            for t in range(1, seqlen):
                nll -= logp[t-1, x[t]]; count += 1
        return exp(nll / count)

    Args:
        model: a causal LM returning ``.logits``.
        ids: 1-D LongTensor of token ids (e.g. :func:`adapterlab.data.eval_ids`).
        seqlen: window length in tokens.
        batch_size: windows per forward pass.
        max_windows: evaluate only the first ``max_windows`` windows (a fixed subset, for speed).
        progress: optional progress factory (see :mod:`adapterlab.progress`).

    Reference:
        Sun et al., Wanda (https://arxiv.org/abs/2306.11695) evaluation protocol.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"need at least {seqlen} tokens for one window, got {ids.numel()}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)  # (W, seqlen)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    starts = list(range(0, n_windows, batch_size))
    try:
        for s in track(starts, "perplexity", progress=progress):
            batch = windows[s : s + batch_size].to(device)  # (b, seqlen)
            logits = model(input_ids=batch).logits.float()  # (b, seqlen, V)
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),  # (b*(seqlen-1), V)
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += nll.double().cpu()
    finally:
        model.train(was_training)
    return math.exp(total_nll.item() / (n_windows * (seqlen - 1)))


class TaskLike(Protocol):
    """What :func:`task_accuracy` needs from a task (see :class:`adapterlab.data.Task`)."""

    name: str
    choices: list[str]

    def prompt(self, text: str) -> str: ...

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Any]: ...


@torch.no_grad()
def choice_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
) -> torch.Tensor:
    """Summed log-probability of each answer string after each prompt, in one batched forward.

    Returns:
        Tensor of shape (len(prompts), len(choices)), fp32.

    Semantics:
        out[i, c] = sum_t log p(choice_c[t] | prompt_i + choice_c[:t])
    """
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    choice_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in choices]
    if any(len(c) == 0 for c in choice_ids):
        raise ValueError(f"every choice must tokenize to at least one token: {list(choices)!r}")
    seqs: list[list[int]] = []
    answer_spans: list[tuple[int, int]] = []
    for p in prompt_ids:
        for c in choice_ids:
            seqs.append(p + c)
            answer_spans.append((len(p), len(p) + len(c)))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(seqs)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    answer = torch.zeros((n, width), dtype=torch.bool)  # positions whose token is an answer token
    for i, (s, (a, b)) in enumerate(zip(seqs, answer_spans)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        answer[i, a:b] = True
    device = _model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attn.to(device)).logits
    logp = torch.log_softmax(logits.float()[:, :-1], dim=-1).cpu()  # (n, width-1, V)
    target = input_ids[:, 1:]  # (n, width-1)
    tok_lp = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (n, width-1)
    scores = (tok_lp * answer[:, 1:]).sum(-1)  # (n,)
    return scores.view(len(prompts), len(choices))  # (P, C)


@dataclass
class TaskResult:
    task: str
    split: str
    n: int
    accuracy: float
    predictions: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("predictions")
        return d


def task_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    task: TaskLike | str,
    *,
    split: str = "test",
    n: int | None = None,
    batch_size: int = 16,
    progress: ProgressFactory | None = None,
) -> TaskResult:
    """Accuracy of picking the label word with the highest log-likelihood (zero-shot or adapted).

    Args:
        task: a task object or a registered task name (:func:`adapterlab.data.get_task`).
        split: the task split to score ("test" by default).
        n: score only the first ``n`` examples of the split (fixed order).
    """
    if isinstance(task, str):
        from adapterlab.data import get_task

        task = get_task(task)
    examples = task.examples(split, n=n)
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples in split {split!r}")
    was_training = model.training
    model.eval()
    preds: list[int] = []
    try:
        starts = list(range(0, len(examples), batch_size))
        for s in track(starts, f"accuracy[{task.name}]", progress=progress):
            chunk = examples[s : s + batch_size]
            scores = choice_logprobs(model, tokenizer, [task.prompt(e.text) for e in chunk], task.choices)
            preds.extend(scores.argmax(-1).tolist())
    finally:
        model.train(was_training)
    labels = [e.label for e in examples]
    correct = sum(int(p == y) for p, y in zip(preds, labels))
    return TaskResult(task=task.name, split=split, n=len(examples), accuracy=correct / len(examples), predictions=preds)


@dataclass
class SparsityReport:
    """Zeros per decoder linear layer and in total; ``pattern`` ("N:M") adds a per-group check."""

    layers: list[LayerSparsity]
    pattern: str | None = None

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def global_sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def nm_valid(self) -> bool | None:
        if self.pattern is None:
            return None
        return all(bool(r.nm_valid) for r in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_sparsity": self.global_sparsity,
            "zeros": self.zeros,
            "numel": self.numel,
            "pattern": self.pattern,
            "nm_valid": self.nm_valid,
            "layers": [
r.to_dict() for r in self.layers
            ],
        }


def _dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight of a linear layer as a dense tensor (bitsandbytes 4-bit is dequantized; 8-bit
    int8 codes are returned as they are: a zero code is a zero weight)."""
    w = module.weight
    if getattr(w, "quant_state", None) is not None:
        from adapterlab.quant import dequantize_weight

        return dequantize_weight(module)
    return w


def sparsity_report(model: torch.nn.Module, *, pattern: str | None = None) -> SparsityReport:
    """Per-layer zeros of every linear layer inside the decoder blocks (embeddings/head excluded)."""
    nm = parse_pattern(pattern)
    rows: list[LayerSparsity] = []
    for i, block in enumerate(decoder_layers(model)):
        for name, mod in block.named_modules():
            # peft wraps a layer as `<name>.base_layer`; its adapter factors are not base weights
            if not isinstance(mod, torch.nn.Linear) or "lora_" in name:
                continue
            name = name.removesuffix(".base_layer")
            w = _dense_weight(mod).detach()
            zeros = int((w == 0).sum())
            rows.append(
                LayerSparsity(
                    name=f"layers.{i}.{name}",
                    shape=tuple(w.shape),
                    zeros=zeros,
                    numel=w.numel(),
                    nm_valid=check_nm(w, *nm) if nm else None,
                )
            )
    return SparsityReport(layers=rows, pattern=pattern)
