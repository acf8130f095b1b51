"""What a completion request and its answer are, and the checks every request passes before it runs.

A request is refused on its own, naming the bad value and what is allowed, before it can join a
batch: token ids inside the model's vocabulary, prompt + new tokens within the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["Completion", "Request", "check_context", "check_token_ids", "context_length_of", "vocab_size_of"]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Request:
    """One completion request.

    Attributes:
        prompt: text (needs the server's tokenizer) or token ids.
        adapter: adapter name (None = the base model).
        max_new_tokens: greedy tokens to generate, >= 1.
    """

    prompt: str | Sequence[int]
    adapter: str | None = None
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.prompt, str):
            if not self.prompt:
                raise ValueError("prompt is empty; give a non-empty string or token ids")
        elif not isinstance(self.prompt, Sequence) or not self.prompt:
            raise ValueError(
                f"prompt must be a non-empty string or a non-empty list of token ids (ints >= 0), "
                f"got {_short(self.prompt)}"
            )
        elif not all(type(t) is int and t >= 0 for t in self.prompt):  # one pass; bool is not int here
            pos, bad = next((i, t) for i, t in enumerate(self.prompt) if not (type(t) is int and t >= 0))
            raise ValueError(f"prompt item {_short(bad)} (position {pos}) is not a token id; token ids are ints >= 0")
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ValueError(f"adapter must be a string or None, got {type(self.adapter).__name__}")


@dataclass
class Completion:
    """The result of one :class:`Request`."""

    adapter: str | None
    tokens: list[int]
    text: str | None
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"


def context_length_of(model: nn.Module) -> int | None:
    """The longest sequence ``model`` is configured for (``max_position_embeddings`` and kin), or None."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def vocab_size_of(model: nn.Module) -> int | None:
    """Rows of the input embedding (else ``config.vocab_size``): valid token ids are ``0..size-1``."""
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except (AttributeError, NotImplementedError, TypeError):
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        return vocab if isinstance(vocab, int) else None


def check_token_ids(ids: Sequence[int], vocab: int | None) -> None:
    """Raise ValueError naming the first out-of-vocabulary id (ids are already known to be ints >= 0).

    Args:
        ids: the prompt's token ids (non-empty).
        vocab: the vocabulary size, or None to skip the check.
    """
    if vocab is None:
        return
    top = max(ids)  # one C-level pass over the ids
    if top >= vocab:
        pos = list(ids).index(top)
        raise ValueError(
            f"prompt token id {top} (position {pos}) is outside the vocabulary; allowed ids are 0..{vocab - 1}"
        )


def check_context(n_prompt: int, n_new: int, context: int | None) -> None:
    """Raise ValueError when ``n_prompt + n_new`` tokens do not fit in ``context`` (None = no limit)."""
    if context is not None and n_prompt + n_new > context:
        raise ValueError(
            f"prompt ({n_prompt} tokens) + {n_new} new tokens (max_tokens) = {n_prompt + n_new} tokens exceeds "
            f"the model's context of {context} tokens; shorten the prompt or ask for fewer tokens"
        )
