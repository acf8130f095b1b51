from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from adapterlab.evaluate import (
    choice_logprobs,
    perplexity,
    sparsity_report,
    task_accuracy,
)
from adapterlab.models import tiny_llama, tiny_tokenizer
from tests.tolerances import assert_close


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ConstantLM(torch.nn.Module):
    """Returns the same logit vector at every position."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        b, t = input_ids.shape
        return _Out(self.logits.expand(b, t, -1))


def test_perplexity_uniform_model_equals_vocab_size():
    vocab = 37
    model = ConstantLM(torch.zeros(vocab))
    ids = torch.randint(0, vocab, (1000,))
    assert perplexity(model, ids, seqlen=50) == pytest.approx(vocab, rel=1e-5)


def test_perplexity_known_distribution():
    # p(token 0) = 0.5, the rest share 0.5: a stream of only zeros has ppl exactly 2.
    probs = torch.tensor([0.5, 0.125, 0.125, 0.125, 0.125])
    model = ConstantLM(probs.log())
    assert perplexity(model, torch.zeros(100, dtype=torch.long), seqlen=10) == pytest.approx(2.0, rel=1e-6)
    # only token 1: ppl 8
    assert perplexity(model, torch.ones(100, dtype=torch.long), seqlen=10) == pytest.approx(8.0, rel=1e-6)


def test_perplexity_matches_brute_force_loop():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=100)
    ids = torch.randint(0, 100, (333,))
    seqlen = 32
    nll, count = 0.0, 0
    for w in range(ids.numel() // seqlen):
        x = ids[w * seqlen : (w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
        for t in range(1, seqlen):
            nll -= logp[t - 1, x[t]].item()
            count += 1
    expected = math.exp(nll / count)
    assert perplexity(model, ids, seqlen=seqlen, batch_size=3) == pytest.approx(expected, rel=1e-5)
    # max_windows evaluates a prefix of the windows
    first = perplexity(model, ids[:seqlen], seqlen=seqlen)
    assert perplexity(model, ids, seqlen=seqlen, max_windows=1) == pytest.approx(first, rel=1e-6)


def test_perplexity_bad_input():
    model = ConstantLM(torch.zeros(4))
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="at least 16 tokens"):
        perplexity(model, torch.zeros(5, dtype=torch.long), seqlen=16)


def test_choice_logprobs_match_unpadded_brute_force():
    model = tiny_llama(vocab_size=100)
    tok = tiny_tokenizer()
    prompts = ["great film:", "a much longer review text:"]
    choices = [" good", " bad!"]
    got = choice_logprobs(model, tok, prompts, choices)
    for i, p in enumerate(prompts):
        for c, ch in enumerate(choices):
            p_ids = tok(p).input_ids
            c_ids = tok(ch, add_special_tokens=False).input_ids
            x = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            expected = sum(logp[len(p_ids) + k - 1, c_ids[k]].item() for k in range(len(c_ids)))
            assert got[i, c].item() == pytest.approx(expected, abs=1e-4)


@dataclass
class _Ex:
    text: str
    label: int


class _FakeTask:
    name = "fake"
    choices = [" a", " b"]

    def __init__(self, labels):
        self._ex = [_Ex(f"item {i}", y) for i, y in enumerate(labels)]

    def prompt(self, text):
        return text + " ->"

    def examples(self, split="test", n=None, seed=0):
        return self._ex[:n] if n else list(self._ex)


def test_task_accuracy_oracle():
    tok = tiny_tokenizer()
    vocab = 100
    logits = torch.zeros(vocab)
    logits[tok("a", add_special_tokens=False).input_ids[0]] = 5.0  # always prefers " a"
    model = ConstantLM(logits)
    labels = [0, 1, 0, 0, 1, 0, 1, 0]  # 5 of 8 are label 0
    res = task_accuracy(model, tok, _FakeTask(labels), batch_size=3)
    assert res.n == 8
    assert res.accuracy == pytest.approx(5 / 8)
    assert res.predictions == [0] * 8
    assert task_accuracy(model, tok, _FakeTask(labels), n=4).accuracy == pytest.approx(3 / 4)


def test_sparsity_report_counts_exact_zeros_and_nm():
    model = tiny_llama()
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.weight.view(-1, 4)[:, :2] = 0.0  # 2:4 everywhere in this layer: half its entries
    rep = sparsity_report(model)
    row = next(r for r in rep.layers if r.name == "layers.0.self_attn.q_proj")
    assert row.zeros == layer.weight.numel() // 2
    assert row.sparsity == pytest.approx(0.5)
    assert rep.zeros == row.zeros  # random init has no other exact zeros
    assert len(rep.layers) == 2 * 7  # embeddings and lm_head are not counted
    nm = sparsity_report(model, pattern="2:4")
    assert next(r for r in nm.layers if r.name == row.name).nm_valid is True
    assert nm.nm_valid is False  # the other layers are dense
    assert rep.to_dict()["global_sparsity"] == pytest.approx(rep.zeros / rep.numel)


# --- batched scoring vs a brute-force per-example loop (issue 16) -----------------------------


def _brute_force_scores(model, tok, prompts, choices):
    """out[i, c] = sum_t log p(c[t] | p_i + c[:t]): one unpadded forward per (prompt, choice), fp64."""
    out = torch.zeros(len(prompts), len(choices), dtype=torch.float64)
    for i, p in enumerate(prompts):
        p_ids = tok(p).input_ids
        for c, ch in enumerate(choices):
            c_ids = tok(ch, add_special_tokens=False).input_ids
            x = torch.tensor([p_ids + c_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)  # (T, V)
            for k in range(len(c_ids)):
                out[i, c] += logp[len(p_ids) + k - 1, c_ids[k]].item()
    return out


_PROMPTS = [
    "ok:",
    "great film:",
    "a much longer review text that pads the others:",
    "meh",
    "the plot was thin but the acting carried it:",
    "x",
    "fine.",
]
# a single-token choice, a choice that is a prefix of another, and choices of different lengths
_CHOICES = ["y", " go", " good", " bad!", " terrible"]


@pytest.mark.parametrize("batch_size", [None, 1, 2, 3, 16])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_choice_logprobs_batched_equal_per_example_loop(batch_size, padding_side):
    model = tiny_llama(vocab_size=100, seed=1)
    tok = tiny_tokenizer()
    tok.padding_side = padding_side  # choice_logprobs pads by itself: the tokenizer's side must not matter
    expected = _brute_force_scores(model, tok, _PROMPTS, _CHOICES)
    got = choice_logprobs(model, tok, _PROMPTS, _CHOICES, batch_size=batch_size)
    assert got.shape == (len(_PROMPTS), len(_CHOICES)) and got.dtype == torch.float32
    assert_close(got.double(), expected, torch.float32)


def test_choice_logprobs_on_a_peft_model_equal_per_example_loop():
    import peft

    model = tiny_llama(vocab_size=100, seed=2)
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg).eval()
    tok = tiny_tokenizer()
    expected = _brute_force_scores(pm, tok, _PROMPTS, _CHOICES)
    assert_close(choice_logprobs(pm, tok, _PROMPTS, _CHOICES, batch_size=2).double(), expected, torch.float32)


class _KwargsWrapper(torch.nn.Module):
    """A ``**kwargs`` wrapper around a model that takes neither ``use_cache`` nor ``logits_to_keep``."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_choice_logprobs_on_a_model_without_logits_to_keep():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = ConstantLM(torch.randn(100))
    expected = _brute_force_scores(base, tok, _PROMPTS, _CHOICES)
    for model in (base, _KwargsWrapper(base)):
        assert_close(choice_logprobs(model, tok, _PROMPTS, _CHOICES, batch_size=3).double(), expected, torch.float32)


class _TaskOf:
    name = "oracle"

    def __init__(self, texts, labels, choices):
        self._ex = [_Ex(t, y) for t, y in zip(texts, labels)]
        self.choices = choices

    def prompt(self, text):
        return text + " ->"

    def examples(self, split="test", n=None, seed=0):
        return self._ex[:n] if n else list(self._ex)


@pytest.mark.parametrize("choices", [["a", "b", "c"], [" yes", " no", " maybe"]])
def test_task_accuracy_equals_brute_force_argmax(choices):
    model = tiny_llama(vocab_size=100, seed=3)
    tok = tiny_tokenizer()
    texts = [f"review {i}: " + "so good " * (i % 5) for i in range(23)]
    labels = [i % len(choices) for i in range(23)]
    task = _TaskOf(texts, labels, choices)
    expected = _brute_force_scores(model, tok, [task.prompt(t) for t in texts], choices)  # (23, C)
    top2 = expected.topk(2, dim=-1).values
    assert bool(((top2[:, 0] - top2[:, 1]) > 1e-3).all())  # no near-ties: the argmax is well defined
    want = expected.argmax(-1).tolist()
    want_acc = sum(int(p == y) for p, y in zip(want, labels)) / len(labels)
    for batch_size in (1, 4, 16, 64):
        res = task_accuracy(model, tok, task, batch_size=batch_size)
        assert res.predictions == want  # example order, whatever the length-sorted batches were
        assert res.accuracy == pytest.approx(want_acc)


class _RecordingLM(ConstantLM):
    """A constant LM that records the shape of every forward."""

    def __init__(self, logits):
        super().__init__(logits)
        self.shapes: list[tuple[int, int]] = []

    def forward(self, input_ids, attention_mask=None):
        self.shapes.append(tuple(input_ids.shape))
        return super().forward(input_ids, attention_mask)


def test_task_accuracy_one_forward_per_batch_one_row_per_example():
    tok = tiny_tokenizer()
    model = _RecordingLM(torch.zeros(100))
    task = _TaskOf([f"item {i}" + "!" * i for i in range(10)], [0] * 10, ["a", "b"])  # single-token choices
    task_accuracy(model, tok, task, batch_size=4)
    assert [b for b, _ in model.shapes] == [4, 4, 2]  # both choices are read from one row per example
    # rows are sorted by length: each batch is padded only to its own longest prompt
    widths = [w for _, w in model.shapes]
    assert widths == sorted(widths) and widths[0] < widths[-1]


def test_perplexity_on_a_peft_model_matches_brute_force_loop():
    import peft

    torch.manual_seed(0)
    model = peft.get_peft_model(
        tiny_llama(vocab_size=100), peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    )
    ids = torch.randint(0, 100, (200,))
    nll, count = 0.0, 0
    for w in range(ids.numel() // 40):
        x = ids[w * 40 : (w + 1) * 40]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), -1)
        for t in range(1, 40):
            nll -= logp[t - 1, x[t]].item()
            count += 1
    assert perplexity(model, ids, seqlen=40, batch_size=2) == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_batch_size_is_validated(bad):
    model = ConstantLM(torch.zeros(100))
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        perplexity(model, torch.zeros(64, dtype=torch.long), seqlen=8, batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        task_accuracy(model, tok, _FakeTask([0, 1]), batch_size=bad)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        choice_logprobs(model, tok, ["p"], ["a"], batch_size=bad)


def test_choice_logprobs_bad_prompts_and_choices():
    model = ConstantLM(torch.zeros(100))
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="at least one token"):
        choice_logprobs(model, tok, ["p"], [""])
    with pytest.raises(ValueError, match="every prompt must tokenize"):
        choice_logprobs(model, tok, ["", "p"], ["a"])  # the char tokenizer adds no BOS
    with pytest.raises(ValueError, match="at least one answer string"):
        choice_logprobs(model, tok, ["p"], [])
    assert choice_logprobs(model, tok, [], ["a", "b"]).shape == (0, 2)
