"""Evaluation: windowed perplexity on held-out text, task accuracy, and a per-layer sparsity report.

All three work on plain ``transformers`` models and on peft-wrapped or quantized models.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from adapterlab.models import decoder_layers
from adapterlab.progress import ProgressFactory, track
from adapterlab.pruning.functional import check_nm, parse_pattern
from adapterlab.pruning.pruner import LayerSparsity


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _check_batch_size(batch_size: int | None) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _lm_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    keep: int | None = None,
) -> torch.Tensor:
    """Logits of the last ``keep`` positions (all positions when None) from one forward pass.

    Where the model takes them, passes ``use_cache=False`` (no KV cache is built) and
    ``logits_to_keep=keep`` (the LM head runs on the kept positions only); any other model is
    called with ``input_ids``/``attention_mask`` alone and sliced afterwards.

    Returns:
        Tensor of shape (b, keep or T, V) in the model's dtype.
    """
    extra: dict[str, Any] = {}
    if _accepts(model, "use_cache"):
        extra["use_cache"] = False
    if keep is not None and _accepts(model, "logits_to_keep"):
        extra["logits_to_keep"] = keep
    kwargs: dict[str, Any] = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    try:
        logits = model(**kwargs, **extra).logits  # (b, keep or T, V)
    except TypeError as err:  # a **kwargs wrapper around a model that takes neither keyword
        if not extra or "unexpected keyword" not in str(err):
            raise
        logits = model(**kwargs).logits  # (b, T, V)
    if keep is not None and logits.shape[1] != keep:
        logits = logits[:, -keep:]  # (b, T, V) -> (b, keep, V)
    return logits


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

    Each batch of windows is one forward pass (no KV cache); a token's NLL is
    ``logsumexp(logits) - logits[target]``, so no (b, seqlen, V) log-softmax copy is written, and
    the NLL is summed in fp64.

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
    _check_batch_size(batch_size)
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
            logits = _lm_logits(model, batch)[:, :-1].float()  # (b, seqlen-1, V)
            target = batch[:, 1:].unsqueeze(-1)  # (b, seqlen-1, 1)
            nll = torch.logsumexp(logits, dim=-1) - logits.gather(-1, target).squeeze(-1)  # (b, seqlen-1)
            total_nll += nll.double().sum().cpu()
    finally:
        model.train(was_training)
    return math.exp(total_nll.item() / (n_windows * (seqlen - 1)))


class TaskLike(Protocol):
    """What :func:`task_accuracy` needs from a task (see :class:`adapterlab.data.Task`)."""

    name: str
    choices: list[str]

    def prompt(self, text: str) -> str: ...

    def examples(self, split: str = "test", n: int | None = None, seed: int = 0) -> list[Any]: ...


@dataclass
class _ScorePlan:
    """The model inputs that score every (prompt, choice) pair, and where each answer token is read.

    ``rows`` are the distinct inputs ``prompt + choice[:-1]`` that are not a prefix of another
    input of the same prompt (causal attention: a prefix's logits are the longer row's first
    logits), so single-token choices of a prompt share one row, the prompt itself. Target ``j``
    is answer token ``tok[j]`` predicted by the logits of ``rows[row[j]]`` at position
    ``col[j]``; it adds to score ``pair[j] = prompt * C + choice``.
    """

    rows: list[list[int]]
    first_col: torch.Tensor  # (R,) the first position of each row whose logits are read
    row: torch.Tensor  # (J,)
    col: torch.Tensor  # (J,)
    tok: torch.Tensor  # (J,)
    pair: torch.Tensor  # (J,)


def _score_plan(prompt_ids: Sequence[list[int]], choice_ids: Sequence[list[int]]) -> _ScorePlan:
    """Build the :class:`_ScorePlan` of P tokenized prompts and C tokenized choices.

    Args:
        prompt_ids: P token lists, each at least one token.
        choice_ids: C token lists, each at least one token.

    Returns:
        The rows to run and, per answer token, where its logits are read.
    """
    rows: list[list[int]] = []
    first_col: list[int] = []
    row: list[int] = []
    col: list[int] = []
    tok: list[int] = []
    pair: list[int] = []
    n_choices = len(choice_ids)
    for i, p in enumerate(prompt_ids):
        needs = [p + c[:-1] for c in choice_ids]
        own: dict[tuple[int, ...], int] = {}  # maximal input of this prompt -> row index
        for c, (need, c_ids) in enumerate(zip(needs, choice_ids)):
            host = max((m for m in needs if m[: len(need)] == need), key=len)
            key = tuple(host)
            if key not in own:
                own[key] = len(rows)
                rows.append(host)
                first_col.append(len(p) - 1)
            r = own[key]
            row += [r] * len(c_ids)
            col += range(len(p) - 1, len(p) - 1 + len(c_ids))
            tok += c_ids
            pair += [i * n_choices + c] * len(c_ids)
    first_t, row_t, col_t, tok_t, pair_t = (torch.tensor(v, dtype=torch.long) for v in (first_col, row, col, tok, pair))
    return _ScorePlan(rows, first_t, row_t, col_t, tok_t, pair_t)


@torch.no_grad()
def _choice_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int | None,
    progress: ProgressFactory | None = None,
    description: str = "scoring",
) -> torch.Tensor:
    """:func:`choice_logprobs` in length-sorted batches of ``batch_size`` rows (all rows when None)."""
    _check_batch_size(batch_size)
    if not choices:
        raise ValueError("choices must name at least one answer string, got none")
    if not prompts:
        return torch.zeros(0, len(choices))
    prompt_ids = [list(x) for x in tokenizer(list(prompts)).input_ids]
    choice_ids = [list(x) for x in tokenizer(list(choices), add_special_tokens=False).input_ids]
    if any(len(c) == 0 for c in choice_ids):
        raise ValueError(f"every choice must tokenize to at least one token: {list(choices)!r}")
    if any(len(p) == 0 for p in prompt_ids):
        empty = [p for p, ids in zip(prompts, prompt_ids) if not ids]
        raise ValueError(f"every prompt must tokenize to at least one token (it predicts the answer): {empty[:3]!r}")
    plan = _score_plan(prompt_ids, choice_ids)
    lengths = torch.tensor([len(r) for r in plan.rows], dtype=torch.long)  # (R,)
    order = torch.argsort(lengths, stable=True)  # (R,) rows by length: little padding per batch
    step = batch_size or len(plan.rows)
    batches = [order[s : s + step] for s in range(0, len(order), step)]
    batch_of = torch.empty(len(order), dtype=torch.long)  # (R,) batch index of each row
    slot = torch.empty(len(order), dtype=torch.long)  # (R,) position inside its batch
    for b, idx in enumerate(batches):
        batch_of[idx] = b
        slot[idx] = torch.arange(len(idx))
    target_batch = batch_of[plan.row]  # (J,)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = _model_device(model)
    scores = torch.zeros(len(prompts) * len(choices), dtype=torch.float32)  # (P*C,)
    for b, idx in enumerate(track(batches, description, progress=progress)):
        lens = lengths[idx]  # (b,)
        width = int(lens.max())
        # right padding: every real token keeps position 0..len-1, so no model needs position_ids
        input_ids = torch.nn.utils.rnn.pad_sequence(
            [torch.tensor(plan.rows[r], dtype=torch.long) for r in idx.tolist()], batch_first=True, padding_value=pad
        )  # (b, width)
        attn = (torch.arange(width)[None, :] < lens[:, None]).long()  # (b, width)
        keep = width - int(plan.first_col[idx].min())  # logits are read only in the last `keep` columns
        logits = _lm_logits(model, input_ids.to(device), attn.to(device), keep=keep)  # (b, keep, V)
        vocab = logits.shape[-1]
        j = (target_batch == b).nonzero().squeeze(-1)  # (J_b,) targets read from this batch
        flat = slot[plan.row[j]] * keep + plan.col[j] - (width - keep)  # (J_b,) index into b*keep
        uniq, inv = torch.unique(flat, return_inverse=True)  # (U,), (J_b,): choices share positions
        sel = logits.reshape(-1, vocab)[uniq.to(device)].float().cpu()  # (U, V)
        tok_lp = sel[inv, plan.tok[j]] - torch.logsumexp(sel, dim=-1)[inv]  # (J_b,) log p(answer token)
        scores.index_add_(0, plan.pair[j], tok_lp)
    return scores.view(len(prompts), len(choices))  # (P, C)


def choice_logprobs(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Summed log-probability of each answer string after each prompt, in batched forwards.

    The inputs are ``prompt + choice[:-1]`` (the last answer token is never an input), deduplicated
    by prefix, so all single-token choices of a prompt are read from one forward over the prompt.
    Inputs are sorted by length and right-padded (positions stay 0..len-1 without ``position_ids``);
    the LM head runs only on the last columns that hold answer positions where the model takes
    ``logits_to_keep``; answer-token log-probabilities are gathered in one pass per batch.

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer: its tokenizer; prompts get special tokens, choices do not.
        prompts: P prompt strings.
        choices: C answer strings, each at least one token.
        batch_size: inputs per forward pass; None puts every input in one forward.

    Returns:
        Tensor of shape (len(prompts), len(choices)), fp32.

    Semantics:
        out[i, c] = sum_t log p(choice_c[t] | prompt_i + choice_c[:t])
    """
    was_training = model.training
    model.eval()
    try:
        return _choice_scores(model, tokenizer, prompts, choices, batch_size=batch_size)
    finally:
        model.train(was_training)


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

    All examples are scored by :func:`choice_logprobs`'s batching: inputs sorted by length across
    the whole split, ``batch_size`` inputs per forward pass (one input per example when every
    label word is one token), predictions returned in example order.

    Args:
        model: a causal LM returning ``.logits``.
        tokenizer: its tokenizer.
        task: a task object or a registered task name (:func:`adapterlab.data.get_task`).
        split: the task split to score ("test" by default).
        n: score only the first ``n`` examples of the split (fixed order).
        batch_size: inputs (prompt + label-word prefix) per forward pass.
        progress: optional progress factory (see :mod:`adapterlab.progress`).

    Returns:
        A :class:`TaskResult` with the accuracy and the per-example predicted choice indices.
    """
    _check_batch_size(batch_size)
    if isinstance(task, str):
        from adapterlab.data import get_task

        task = get_task(task)
    examples = task.examples(split, n=n)
    if not examples:
        raise ValueError(f"task {task.name!r} has no examples in split {split!r}")
    was_training = model.training
    model.eval()
    try:
        scores = _choice_scores(
            model,
            tokenizer,
            [task.prompt(e.text) for e in examples],
            task.choices,
            batch_size=batch_size,
            progress=progress,
            description=f"accuracy[{task.name}]",
        )  # (n, C)
    finally:
        model.train(was_training)
    preds: list[int] = scores.argmax(-1).tolist()
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
            "layers": [r.to_dict() for r in self.layers],
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
