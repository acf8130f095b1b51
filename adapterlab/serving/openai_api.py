"""OpenAI's wire schema for :mod:`adapterlab.serving.http`: requests parsed and checked, answers built.

What this module holds (no sockets, no model):
    * :class:`HTTPError` and :func:`error_body` — every error answer is OpenAI's
      ``{"error": {"message", "type", "param", "code"}}``, so the ``openai`` client raises its own
      classes (``BadRequestError`` for 400, ``NotFoundError`` for 404, ...).
    * :func:`parse_completion` / :func:`parse_chat` — a ``/v1/completions`` or ``/v1/chat/completions``
      body turned into a :class:`Generation`, or a 400 naming the field and what is allowed.
    * :class:`TextStream` — the text of one completion as its tokens arrive: the delta that is safe
      to send (never half a UTF-8 character, never the start of a stop sequence) and where a stop
      sequence ends the completion.
    * the answer builders (:func:`completion_body`, :func:`chat_body`, :func:`chunk`).

Decoding is greedy, as in :meth:`AdapterServer.generate`: ``temperature`` must be 0 or left out
(a value > 0 asks for sampling and is refused with a 400, never ignored); ``top_p`` in (0, 1] is
accepted because it does not change a greedy choice; ``seed`` and ``user`` are accepted and have no
effect. ``n``/``best_of`` > 1, ``logprobs``, ``echo``, ``suffix``, penalties, ``logit_bias``, tools and
non-text ``response_format`` are refused with a 400 naming the field. Other fields are refused too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Generation",
    "HTTPError",
    "TextStream",
    "chat_body",
    "chunk",
    "completion_body",
    "error_body",
    "parse_chat",
    "parse_completion",
]

MAX_STOPS = 4  # OpenAI's limit on stop sequences
_DEFAULT_CODE = {
    404: "unknown_url",
    408: "request_timeout",
    409: "adapter_cache_full",
    411: "length_required",
    413: "request_too_large",
    500: "internal_error",
    503: "queue_full",
    504: "timeout",
}
_COMMON = {"model", "adapter", "max_tokens", "temperature", "top_p", "n", "stop", "stream", "stream_options"}
_COMMON |= {"seed", "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs"}
COMPLETION_FIELDS = tuple(sorted(_COMMON | {"prompt", "max_new_tokens", "echo", "suffix", "best_of"}))
CHAT_FIELDS = tuple(
    sorted(
        _COMMON
        | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice"}
        | {"parallel_tool_calls"}
    )
)
_ROLES = ("system", "developer", "user", "assistant")
# keys a message may carry when the client echoes its own earlier answers back: allowed when empty
_EMPTY_MESSAGE_KEYS = ("tool_calls", "function_call", "refusal", "audio", "annotations")


class HTTPError(Exception):
    """An error answer: ``status``, a one-line message, OpenAI's ``param`` and ``code``.

    ``close`` drops the connection after the answer (errors in the framing).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.close = close
        self.param = param
        self.code = code


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``type`` is ``invalid_request_error`` for 4xx, ``server_error`` for 5xx."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or _DEFAULT_CODE.get(status)}}


def _bad(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, message, param=param)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class Generation:
    """One parsed completion or chat request.

    Attributes:
        kind: ``completion`` (``/v1/completions``) or ``chat`` (``/v1/chat/completions``).
        model: the name answers carry (the adapter, or the base's served name).
        adapter: the adapter to run (None = the base model).
        prompts: completions: one entry per prompt (text or token ids); chat: empty.
        messages: chat: the messages for the chat template (``role``, ``content`` as text).
        max_tokens: new tokens per prompt; None = as many as fit (chat's default).
        stop: stop sequences (the answer ends before the first one; it is not included).
        stream: answer with server-sent events.
        include_usage: with ``stream``: a last chunk with ``usage`` (``stream_options``).
    """

    kind: Literal["completion", "chat"]
    model: str
    adapter: str | None
    prompts: list[str | list[int]]
    messages: list[dict[str, Any]]
    max_tokens: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _int_field(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{key} must be an integer in [{low}, {high}], got {_short(value)}", key)
    return value


def _number(body: Mapping[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(f"{key} must be a number, got {_short(value)}", key)
    return float(value)


def _check_greedy(body: Mapping[str, Any]) -> None:
    """Refuse what greedy decoding cannot honour; accept what does not change a greedy answer."""
    temperature = _number(body, "temperature")
    if temperature is not None and temperature != 0:
        raise _bad(
            f"temperature {temperature:g} asks for sampling; adapterlab serve decodes greedily only: give "
            f"temperature 0 or leave it out",
            "temperature",
        )
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise _bad(f"top_p must be in (0, 1], got {top_p:g}", "top_p")
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or value != 1):
            raise _bad(
                f"{key} {_short(value)} is not supported: adapterlab serve decodes greedily and answers one "
                f"choice per prompt; give {key} 1 (or send a list of prompts for a batch)",
                key,
            )
    for key in ("presence_penalty", "frequency_penalty"):
        value = _number(body, key)
        if value not in (None, 0):
            raise _bad(f"{key} {value:g} is not supported; give 0 or leave it out", key)
    if body.get("logit_bias") not in (None, {}):
        raise _bad("logit_bias is not supported; leave it out", "logit_bias")
    if body.get("logprobs") not in (None, False):
        raise _bad(f"logprobs {_short(body['logprobs'])} is not supported; leave it out", "logprobs")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"seed must be an integer, got {_short(seed)}", "seed")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad(f"user must be a string, got {_short(user)}", "user")


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or len(items) > MAX_STOPS or not all(isinstance(s, str) and s for s in items):
        raise _bad(
            f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got {_short(stop)}", "stop"
        )
    return tuple(dict.fromkeys(items))


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad(f"stream must be true or false, got {_short(stream)}", "stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise _bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad(f"stream_options must be {{'include_usage': true|false}}, got {_short(options)}", "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _bad(f"stream_options.include_usage must be true or false, got {_short(usage)}", "stream_options")
    return True, usage


def _model(body: Mapping[str, Any], base_name: str) -> tuple[str, str | None]:
    """(the name answers carry, the adapter): ``model`` names the adapter (the base's name = none);
    the older ``adapter`` field (null = the base) is still accepted when it agrees."""
    model = body.get("model")
    if "model" in body and not isinstance(model, str):
        raise _bad(f"'model' must be an adapter name (a string) or {base_name!r}, got {_short(model)}", "model")
    as_adapter = None if model in (None, base_name) else model
    if "adapter" in body:
        adapter = body["adapter"]
        if adapter is not None and not isinstance(adapter, str):
            raise _bad(f"'adapter' must be an adapter name (a string) or null, got {_short(adapter)}", "adapter")
        if "model" in body and as_adapter != adapter:
            raise _bad(f"'adapter' {adapter!r} and 'model' {model!r} disagree; give one of them", "adapter")
        as_adapter = adapter
    return (as_adapter if as_adapter is not None else base_name), as_adapter


def _unknown(body: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; allowed: {list(allowed)}", unknown[0])


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms: a string, token ids, a list of strings, a list of token-id lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(type(t) is int for t in prompt):
            return [prompt]
        if all(isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p)) for p in prompt):
            return list(prompt)
    raise _bad(
        f"prompt must be a string, a list of token ids, or a non-empty list of either (a batch), got {_short(prompt)}",
        "prompt",
    )


def parse_completion(body: Mapping[str, Any], *, base_name: str, max_new_tokens: int) -> Generation:
    """A ``/v1/completions`` body (OpenAI's schema; ``max_new_tokens`` is the older name of ``max_tokens``).

    Raises:
        HTTPError: 400 naming the bad field and what is allowed.
    """
    _unknown(body, COMPLETION_FIELDS)
    if "prompt" not in body:
        raise _bad("missing field 'prompt'", "prompt")
    _check_greedy(body)
    for key, empty in (("echo", False), ("suffix", None)):
        if body.get(key) not in (None, empty):
            raise _bad(f"{key} {_short(body[key])} is not supported; leave it out", key)
    if "max_new_tokens" in body and "max_tokens" in body and body["max_new_tokens"] != body["max_tokens"]:
        raise _bad("max_tokens and max_new_tokens (its older name) disagree; give one of them", "max_tokens")
    key = "max_new_tokens" if "max_new_tokens" in body else "max_tokens"
    n = body.get(key, 16)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= max_new_tokens:
        raise _bad(f"max_tokens must be an integer in [1, {max_new_tokens}], got {_short(n)}", key)
    model, adapter = _model(body, base_name)
    stream, usage = _stream(body)
    return Generation("completion", model, adapter, _prompts(body["prompt"]), [], n, _stops(body), stream, usage)


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(
                    f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                    f"got {_short(part)}",
                    "messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts, got {_short(content)}", "messages")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _bad(
            f"messages must be a non-empty list of {{'role', 'content'}} objects, got {_short(value)}", "messages"
        )
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with 'role' and 'content', got {_short(m)}", "messages")
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role {_short(role)} is not supported; allowed: {list(_ROLES)}", "messages")
        extra = sorted(k for k in set(m) - {"role", "content", "name"} if not (k in _EMPTY_MESSAGE_KEYS and not m[k]))
        if extra:
            raise _bad(f"messages[{i}]: field(s) {extra} are not supported (tools are not served)", "messages")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _content(m, i)}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def parse_chat(body: Mapping[str, Any], *, base_name: str, max_new_tokens: int) -> Generation:
    """A ``/v1/chat/completions`` body. Without ``max_tokens`` / ``max_completion_tokens`` the answer may
    run until EOS, the server's ``max_new_tokens`` or the model's context, whichever comes first.

    Raises:
        HTTPError: 400 naming the bad field and what is allowed.
    """
    _unknown(body, CHAT_FIELDS)
    if "messages" not in body:
        raise _bad("missing field 'messages'", "messages")
    _check_greedy(body)
    if body.get("top_logprobs") not in (None, 0):
        raise _bad("top_logprobs is not supported; leave it out", "top_logprobs")
    if body.get("tools") not in (None, []) or body.get("tool_choice") not in (None, "none"):
        raise _bad("tools are not supported; leave 'tools' and 'tool_choice' out", "tools")
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise _bad(f"response_format {_short(fmt)} is not supported; only {{'type': 'text'}}", "response_format")
    a = _int_field(body, "max_tokens", 1, max_new_tokens)
    b = _int_field(body, "max_completion_tokens", 1, max_new_tokens)
    if a is not None and b is not None and a != b:
        raise _bad(f"max_tokens {a} and max_completion_tokens {b} disagree; give one of them", "max_tokens")
    model, adapter = _model(body, base_name)
    stream, usage = _stream(body)
    messages = _messages(body["messages"])
    return Generation("chat", model, adapter, [], messages, a if a is not None else b, _stops(body), stream, usage)


class TextStream:
    """The text of one completion as its tokens arrive (one per step, in order).

    :meth:`push` returns the new text that is safe to send: decoded from all tokens so far, without a
    trailing incomplete UTF-8 character (U+FFFD) and, when there are stop sequences, without the last
    ``len(longest stop) - 1`` characters, which could be the start of one. When a stop sequence
    appears, the text ends just before it and :attr:`stopped` is set. The deltas concatenate to the
    final text (:meth:`tail` returns what is left of it).

    Args:
        decode: token ids -> text (the server's tokenizer, special tokens skipped).
        stops: stop sequences.
        stream: compute deltas (False: only look for stop sequences).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str], *, stream: bool) -> None:
        self.decode = decode
        self.stops = tuple(stops)
        self.stream = stream
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = ""
        self.text = ""
        self.stopped = False

    def push(self, step: int, token: int) -> str:
        """Take the token of decoding step ``step`` (a replay of an earlier step is ignored); return the delta."""
        if self.stopped or step != len(self.tokens):
            return ""
        self.tokens.append(token)
        before = len(self.text)
        text = self.text = self.decode(self.tokens)
        if self.stops:
            start = max(0, before - self.hold - 1)
            hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text, self.stopped = text[: min(hits)], True
                return self._advance(self.text) if self.stream else ""
        if not self.stream:
            return ""
        return self._advance(text[: len(text) - self.hold].rstrip("\ufffd"))

    def _advance(self, safe: str) -> str:
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""  # nothing new, or the decoder rewrote earlier text: wait for the end
        delta, self.sent = safe[len(self.sent) :], safe
        return delta

    def tail(self, final: str) -> str:
        """What is left to send of the final text ``final`` (the completion's text)."""
        return final[len(self.sent) :] if final.startswith(self.sent) else ""


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop sequence (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


@dataclass
class Choice:
    """One finished answer: its text, tokens (an adapterlab extension in the JSON), finish reason."""

    index: int
    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage(choices: Sequence[Choice]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in choices)
    done = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def completion_body(gen: Generation, rid: str, created: int, choices: Sequence[Choice]) -> dict[str, Any]:
    """``object: text_completion``; ``adapter`` and each choice's ``tokens`` are adapterlab extensions."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": gen.model,
        "adapter": gen.adapter,
        "choices": [
            {"index": c.index, "text": c.text, "tokens": c.tokens, "logprobs": None, "finish_reason": c.finish_reason}
            for c in choices
        ],
        "usage": usage(choices),
    }


def chat_body(gen: Generation, rid: str, created: int, choices: Sequence[Choice]) -> dict[str, Any]:
    """``object: chat.completion`` with one ``assistant`` message per choice."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": gen.model,
        "adapter": gen.adapter,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "tokens": c.tokens,
                "logprobs": None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": usage(choices),
    }


def chunk(
    gen: Generation,
    rid: str,
    created: int,
    index: int | None,
    text: str | None = None,
    *,
    finish_reason: str | None = None,
    role: bool = False,
    usage_of: Sequence[Choice] | None = None,
) -> dict[str, Any]:
    """One server-sent event of a streamed answer (OpenAI's chunk format).

    ``index=None`` with ``usage_of``: the last chunk of ``stream_options.include_usage`` (no choices).
    Chat chunks carry ``delta`` (``role`` on the first one), completion chunks carry ``text``.
    """
    choices: list[dict[str, Any]] = []
    if index is not None:
        if gen.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choices.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        else:
            choices.append({"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason})
    out: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if gen.kind == "chat" else "text_completion",
        "created": created,
        "model": gen.model,
        "choices": choices,
    }
    if gen.include_usage:
        out["usage"] = usage(usage_of) if usage_of is not None else None
    return out


def now() -> int:
    return int(time.time())
