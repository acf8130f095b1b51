"""An OpenAI-compatible HTTP front end for :class:`AdapterServer` (stdlib only, 127.0.0.1 by default).

``model`` names the adapter (the vLLM / LoRAX convention); the base's served name (``base_name``,
default ``"base"``) means the base model without an adapter. The ``openai`` Python client works
against ``base_url=http://127.0.0.1:PORT/v1``. Endpoints:

    POST /v1/completions          OpenAI's completions: prompt = text | token ids | a list of either (a
                                  batch, one choice per prompt); max_tokens (default 16), stop, stream
    POST /v1/chat/completions     OpenAI's chat: messages through the tokenizer's chat template;
                                  max_tokens / max_completion_tokens (default: until EOS, the server's
                                  max_new_tokens or the context), stop, stream
    GET  /v1/models               OpenAI's model list: the base and every servable adapter
    GET  /v1/models/{name}        one of them (404 ``model_not_found`` otherwise)
    POST /v1/load_lora_adapter    vLLM's {"lora_name", "lora_path" (folder | "hub:REF"), "load_inplace"}
    POST /v1/unload_lora_adapter  vLLM's {"lora_name"}
    POST /v1/adapters/load        {"name", "source" (folder | "hub:REF", optional), "pin": false}
    POST /v1/adapters/unload      {"name"}   (unload = leave the cache; the adapter stays servable)
    GET  /v1/adapters             {"adapters": [{name, kind, loaded, pinned, rank, source}, ...]}
    GET  /health                  {"status": "ok", "queued": n}

Decoding is greedy (:meth:`AdapterServer.generate`); see :mod:`adapterlab.serving.openai_api` for
what each OpenAI field does (``temperature`` > 0, ``n`` > 1, ``logprobs`` ... are refused with a 400,
never ignored). Answers carry two extensions: ``adapter`` (null = the base) and each choice's
``tokens`` (the generated token ids). The older request fields ``adapter`` and ``max_new_tokens`` are
still accepted.

``stream: true`` answers with server-sent events (``data: {chunk}\\n\\n`` ... ``data: [DONE]\\n\\n``,
chunked transfer encoding): tokens are sent as the batch decodes them, not after it; a delta never
ends inside a UTF-8 character or a possible stop sequence, and the deltas concatenate to the
non-streamed text. An error after the stream has started is one ``data: {"error": ...}`` event.

Every completion request is validated before it is queued (adapter known, token ids in the
vocabulary, ``max_tokens`` in range, prompt + ``max_tokens`` within the model's context), so a bad
request is answered on its own; the queue is bounded (full -> 503); one worker thread drains it into
batches of up to ``max_batch`` requests, and a request that still fails inside a batch fails only
itself (the batch is retried without it, see :meth:`AdapterServer.generate`). Requests that arrive
while a batch runs wait for the next batch (no continuous batching). A stop sequence, or a
streaming client that goes away, ends its row of the batch early.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on every route: 400
``invalid_request_error`` (``code`` ``context_length_exceeded`` for prompt + max_tokens beyond the
context), 404 unknown model (``code`` ``model_not_found``) or route (``unknown_url``), 408 body not
received within the read timeout, 409 cache full of pinned adapters, 411 chunked body, 413 body too
large, 503 queue full, 504 completion timed out, 500 ``server_error`` (the message names only the
exception's class; the traceback goes to the log). Errors in the framing (a bad ``Content-Length``,
a body that is too large, too slow, truncated or nested too deeply) also close the connection.
Every socket has a read timeout (``read_timeout_s``, default 30 s): an idle or stalled connection is
closed then, so it does not hold a thread. A client that disconnects early is one debug line.

Why the stdlib ``http.server`` and not starlette/uvicorn: the model runs one batch at a time under
one lock, so an event loop would not serve more; what a front end must get right here (bounded
bodies, read timeouts, 408/411/413 with a closed connection, the listen backlog, SSE) is a few dozen
lines that the framing tests pin down; and ``adapterlab serve`` then needs nothing beyond the core
install (the ``[serve]`` extra stays empty). A thread per connection is fine for a loopback server.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import torch
from torch import Tensor

from adapterlab.serving.openai_api import (
    Choice,
    Generation,
    HTTPError,
    TextStream,
    chat_body,
    chunk,
    completion_body,
    cut_at_stop,
    error_body,
    new_id,
    now,
    parse_chat,
    parse_completion,
)
from adapterlab.serving.server import AdapterServer, Completion, Request, UnknownAdapterError

__all__ = ["DEFAULT_READ_TIMEOUT_S", "MAX_BODY", "HTTPError", "ServingHTTP"]

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20
DEFAULT_READ_TIMEOUT_S = 30.0
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)  # the client went away
_Event = tuple[str, int, Any]  # ("delta", choice, text) | ("done", choice, (Choice, tail)) | ("error", choice, exc)


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, HTTPError):
        return exc.status
    if isinstance(exc, UnknownAdapterError):
        return 404
    if isinstance(exc, (ValueError, KeyError, FileNotFoundError, TypeError)):
        return 400
    if isinstance(exc, RuntimeError) and "cache is full" in str(exc):
        return 409
    return 500


def _error_of(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and OpenAI error body of ``exc``; a 500 names only the exception's class."""
    status = _status_of(exc)
    if status == 500:
        logger.error("internal error: %s", type(exc).__name__, exc_info=exc)
        message = f"internal server error ({type(exc).__name__}); the server log has the details"
    else:
        msg = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        message = msg.splitlines()[0] if msg else type(exc).__name__
    param = exc.param if isinstance(exc, HTTPError) else None
    code = exc.code if isinstance(exc, HTTPError) else None
    if isinstance(exc, UnknownAdapterError):
        param, code = param or "model", "model_not_found"
    elif status == 400 and "exceeds the model's context" in message:
        code = "context_length_exceeded"
    return status, error_body(status, message, param=param, code=code)


@dataclass
class _Job:
    """One prompt of a request in the queue; the worker reports to ``sink`` (shared by the request's prompts)."""

    request: Request
    index: int = 0
    sink: queue.Queue[_Event] = field(default_factory=queue.Queue)
    text: TextStream | None = None  # decoded step by step: the request streams or has stop sequences
    stream: bool = False
    cancelled: bool = False
    halt: tuple[Tensor, int] | None = None  # (the running batch's stop mask, this job's row in it)

    def cancel(self) -> None:
        """Nobody waits for this job any more: skip it, or end its row of the running batch."""
        self.cancelled = True
        halt = self.halt
        if halt is not None:
            halt[0][halt[1]] = True


@dataclass
class _Stream:
    """A streamed answer: its events (None = ``[DONE]``) and its jobs, cancelled when it is closed
    (also when it never started: a generator that never ran would not run its ``finally``)."""

    events: Iterator[dict[str, Any] | None]
    jobs: list[_Job]

    def close(self) -> None:
        close = getattr(self.events, "close", None)
        if close is not None:
            close()
        for job in self.jobs:
            job.cancel()  # a finished job only gets the flag


class _HTTPServer(ThreadingHTTPServer):
    """The listener: daemon handler threads; errors a handler did not answer are logged, not printed."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        host = client_address[0] if isinstance(client_address, tuple) and client_address else client_address
        if isinstance(exc, (*_GONE, TimeoutError)):
            logger.debug("%s: connection dropped (%s)", host, type(exc).__name__)
        else:
            logger.error("unhandled error on a connection from %s", host, exc_info=exc)


class ServingHTTP:
    """Run an :class:`AdapterServer` behind HTTP.

    Args:
        server: the adapter server.
        host: bind address (default ``127.0.0.1``, loopback only).
        port: TCP port; 0 picks a free one (see :attr:`port` after :meth:`start`).
        max_queue: queued completion requests before answering 503.
        max_batch: requests per batched generate (default: the server's ``max_batch_size``).
        batch_wait_s: how long the worker waits to fill a batch after the first request.
        max_new_tokens: upper bound a request may ask for.
        request_timeout_s: how long a request waits for its completion before 504.
        read_timeout_s: socket read (and write) timeout of every connection, in seconds: a request
            whose headers or body stall that long gets 408 (or is closed), and an idle keep-alive
            connection is closed after it (default :data:`DEFAULT_READ_TIMEOUT_S`, 30 s).
        max_body_bytes: largest request body; a larger ``Content-Length`` is answered 413.
        backlog: the listen backlog (``request_queue_size``); default ``max(128, 2 * max_queue)``, so
            a burst of connections as large as the queue is accepted rather than reset.
        base_name: the ``model`` name that means the base model without an adapter.
    """

    def __init__(
        self,
        server: AdapterServer,
        *,
        host: str = "127.0.0.1",
        port: int = 8000,
        max_queue: int = 64,
        max_batch: int | None = None,
        batch_wait_s: float = 0.01,
        max_new_tokens: int = 512,
        request_timeout_s: float = 600.0,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        max_body_bytes: int = MAX_BODY,
        backlog: int | None = None,
        base_name: str = "base",
    ) -> None:
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        for opt, value in (("read_timeout_s", read_timeout_s), ("request_timeout_s", request_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{opt} must be a number of seconds > 0, got {value!r}")
        if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 2:
            raise ValueError(f"max_body_bytes must be an integer >= 2, got {max_body_bytes!r}")
        backlog = max(128, 2 * max_queue) if backlog is None else backlog
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be an integer >= 1, got {backlog!r}")
        self.server = server
        self.max_batch = max_batch or server.max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_new_tokens = max_new_tokens
        self.request_timeout_s = float(request_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.max_body_bytes = max_body_bytes
        self.base_name = base_name
        self.queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self._put_lock = threading.Lock()
        self.created = int(time.time())  # the "created" of every entry of /v1/models
        self._stop = threading.Event()
        self._httpd = _HTTPServer((host, port), self._handler_class(), bind_and_activate=False)
        self._httpd.request_queue_size = backlog  # listen(backlog) in server_activate
        try:
            self._httpd.server_bind()
            self._httpd.server_activate()
        except BaseException:
            self._httpd.server_close()
            raise
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self._httpd.server_address[0]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{self.port}"

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ServingHTTP:
        """Start the batching worker and the HTTP listener in background threads."""
        worker = threading.Thread(target=self._worker, name="adapterlab-batcher", daemon=True)
        http = threading.Thread(target=self._httpd.serve_forever, name="adapterlab-http", daemon=True)
        worker.start()
        http.start()
        self._threads = [worker, http]
        logger.info("serving on %s", self.url)
        return self

    def serve_forever(self) -> None:
        """Start and block until interrupted (Ctrl-C) or :meth:`shutdown`."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        if self._stop.is_set() and not self._threads:
            return
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []
        self.server.close()

    def __enter__(self) -> ServingHTTP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- the batching worker ------------------------------------------------------------------

    def _next_batch(self) -> list[_Job]:
        try:
            first = self.queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self.queue.get(timeout=max(left, 0)) if left > 0 else self.queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _worker(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the worker never dies and no request is left waiting
                logger.exception("the batching worker failed on %d requests", len(batch))
                for job in batch:  # a second report of a job already answered is never read
                    job.sink.put(("error", job.index, exc))

    def _run_batch(self, batch: list[_Job]) -> None:
        ok: list[_Job] = []
        failed: dict[str, BaseException] = {}
        for job in batch:  # load every distinct adapter first: a broken one fails only its requests
            if job.cancelled:
                continue
            name = job.request.adapter
            if name is not None and name not in failed:
                try:
                    self.server.load(name)
                except Exception as exc:  # noqa: BLE001 - reported to that request
                    failed[name] = exc
            if name in failed:
                job.sink.put(("error", job.index, failed[name]))
            else:
                ok.append(job)
        if not ok:
            return
        halt = torch.zeros(len(ok), dtype=torch.bool)  # [N] rows to end now (stop sequence, client gone)
        for pos, job in enumerate(ok):
            job.halt = (halt, pos)
            if job.cancelled:
                halt[pos] = True
        # a request that fails inside the batch fails alone: generate retries the rest without it
        results = self.server.generate(
            [j.request for j in ok], return_exceptions=True, on_step=self._step_hook(ok, halt)
        )
        for job, res in zip(ok, results):
            job.halt = None
            if isinstance(res, Completion):
                job.sink.put(("done", job.index, self._finish(job, res)))
            else:
                job.sink.put(("error", job.index, res))

    @staticmethod
    def _step_hook(jobs: list[_Job], halt: Tensor) -> Callable[[Sequence[int], int, Tensor, Tensor], Tensor | None]:
        """The :data:`~adapterlab.serving.server.StepHook` of one batch: feeds each watched job's
        :class:`TextStream` (streamed deltas go to its sink) and answers ``halt`` for the batch's rows."""
        plans: dict[tuple[int, ...], tuple[Tensor, list[tuple[int, int, _Job]]]] = {}

        def on_step(indices: Sequence[int], step: int, tokens: Tensor, live: Tensor) -> Tensor:
            key = tuple(indices)
            if key not in plans:  # a retried half of the batch has its own rows
                watched = [(b, i, jobs[i]) for b, i in enumerate(key) if jobs[i].text is not None]
                plans[key] = (torch.tensor(key, dtype=torch.long), watched)
            rows, watched = plans[key]
            if watched:
                toks, alive = tokens.tolist(), live.tolist()
                for b, i, job in watched:
                    text = job.text
                    if text is None or not alive[b] or job.cancelled:
                        continue
                    try:
                        delta = text.push(step, toks[b])
                    except Exception:  # noqa: BLE001 - never fail the batch; the final text is sent at the end
                        logger.exception("decoding a streamed token failed")
                        continue
                    if delta and job.stream:
                        job.sink.put(("delta", job.index, delta))
                    if text.stopped:
                        halt[i] = True
            return halt[rows]  # [B]

        return on_step

    @staticmethod
    def _finish(job: _Job, res: Completion) -> tuple[Choice, str]:
        """The job's final choice (a stop sequence cuts the text before it) and the text not streamed yet."""
        text, finish = res.text or "", res.finish_reason
        stream = job.text
        if stream is not None:
            if stream.stopped:
                text, finish = stream.text, "stop"
            elif stream.stops:
                text, hit = cut_at_stop(text, stream.stops)
                finish = "stop" if hit else finish
        tail = stream.tail(text) if stream is not None and job.stream else ""
        if stream is not None and job.stream and stream.sent and not text.startswith(stream.sent):
            logger.warning("the streamed text is not a prefix of the final text; the tokenizer rewrote it")
        return Choice(job.index, text, res.tokens, finish, res.prompt_tokens), tail

    # -- request handling ---------------------------------------------------------------------

    def _checked(self, prompt: str | Sequence[int], adapter: str | None, n: int, param: str) -> Request:
        try:
            return self.server.check(Request(prompt, adapter, n))  # token ids, context: refused here
        except UnknownAdapterError:
            raise
        except ValueError as exc:
            _, body = _error_of(exc)
            raise HTTPError(400, str(exc).splitlines()[0], param=param, code=body["error"]["code"]) from None

    def _generate(self, kind: str, body: dict[str, Any]) -> dict[str, Any] | _Stream:
        """A completion or chat request: parse, validate, queue; the answer, or its stream of events."""
        parse = parse_chat if kind == "chat" else parse_completion
        gen = parse(body, base_name=self.base_name, max_new_tokens=self.max_new_tokens)
        if gen.adapter is not None and not self.server.known(gen.adapter):
            raise UnknownAdapterError(
                f"the model {gen.adapter!r} does not exist; GET /v1/models lists the served ones "
                f"({self.base_name!r} is the base model)"
            )
        needs = [what for what, on in (("chat", kind == "chat"), ("stream", gen.stream), ("stop", gen.stop)) if on]
        if needs and self.server.tokenizer is None:
            raise HTTPError(400, f"{needs[0]} needs the model's tokenizer; this server has none", param=needs[0])
        if kind == "chat":
            try:
                ids = self.server.chat_prompt(gen.messages)
            except ValueError as exc:
                raise HTTPError(400, str(exc).splitlines()[0], param="messages") from None
            n = gen.max_tokens
            if n is None:  # as many as fit: the server's cap, the model's context
                room = self.server.context_length - len(ids) if self.server.context_length else self.max_new_tokens
                n = max(1, min(self.max_new_tokens, room))
            reqs = [self._checked(ids, gen.adapter, n, "messages")]
        else:
            if len(gen.prompts) > self.queue.maxsize:
                raise HTTPError(
                    400,
                    f"a batch of {len(gen.prompts)} prompts is more than the request queue holds "
                    f"({self.queue.maxsize}); send fewer prompts per request",
                    param="prompt",
                )
            assert gen.max_tokens is not None
            reqs = [self._checked(p, gen.adapter, gen.max_tokens, "prompt") for p in gen.prompts]
        sink: queue.Queue[_Event] = queue.Queue()
        watch = gen.stream or bool(gen.stop)
        jobs = [
            _Job(r, i, sink, TextStream(self.server.decode, gen.stop, stream=gen.stream) if watch else None, gen.stream)
            for i, r in enumerate(reqs)
        ]
        with self._put_lock:  # all prompts of a request are queued, or none
            if self.queue.maxsize - self.queue.qsize() < len(jobs):
                raise HTTPError(503, f"the request queue is full ({self.queue.maxsize}); retry later")
            for job in jobs:
                self.queue.put_nowait(job)
        if gen.stream:
            return _Stream(self._events(gen, jobs, sink), jobs)
        choices = self._collect(jobs, sink)
        build = chat_body if kind == "chat" else completion_body
        return build(gen, new_id(kind), now(), choices)

    def _collect(self, jobs: list[_Job], sink: queue.Queue[_Event]) -> list[Choice]:
        deadline = time.monotonic() + self.request_timeout_s
        done: dict[int, Choice] = {}
        try:
            while len(done) < len(jobs):
                left = deadline - time.monotonic()
                try:
                    kind, index, payload = sink.get(timeout=left) if left > 0 else sink.get_nowait()
                except queue.Empty:
                    raise HTTPError(504, f"the completion did not finish within {self.request_timeout_s:g} s") from None
                if kind == "error":
                    raise payload
                if kind == "done":
                    done[index] = payload[0]
        finally:
            for job in jobs:
                if job.index not in done:
                    job.cancel()
        return [done[i] for i in range(len(jobs))]

    def _events(self, gen: Generation, jobs: list[_Job], sink: queue.Queue[_Event]) -> Iterator[dict[str, Any] | None]:
        """The server-sent events of a streamed answer; None is ``[DONE]``. Closing it cancels the jobs."""
        rid, created = new_id(gen.kind), now()
        deadline = time.monotonic() + self.request_timeout_s
        done: dict[int, Choice] = {}
        try:
            if gen.kind == "chat":
                for job in jobs:
                    yield chunk(gen, rid, created, job.index, role=True)
            while len(done) < len(jobs):
                left = deadline - time.monotonic()
                try:
                    kind, index, payload = sink.get(timeout=left) if left > 0 else sink.get_nowait()
                except queue.Empty:
                    msg = f"the completion did not finish within {self.request_timeout_s:g} s"
                    yield error_body(504, msg)
                    break
                if kind == "delta":
                    yield chunk(gen, rid, created, index, payload)
                elif kind == "done":
                    choice, tail = payload
                    done[index] = choice
                    yield chunk(gen, rid, created, index, tail, finish_reason=choice.finish_reason)
                else:
                    yield _error_of(payload)[1]
                    break
            else:
                if gen.include_usage:
                    yield chunk(gen, rid, created, None, usage_of=[done[i] for i in range(len(jobs))])
            yield None
        finally:
            for job in jobs:
                if job.index not in done:
                    job.cancel()

    def _model_entry(self, name: str) -> dict[str, Any]:
        parent = None if name == self.base_name else self.base_name
        return {"id": name, "object": "model", "created": self.created, "owned_by": "adapterlab", "parent": parent}

    def _models(self) -> dict[str, Any]:
        names = [self.base_name] + [row["name"] for row in self.server.adapters() if row["name"] != self.base_name]
        return {"object": "list", "data": [self._model_entry(n) for n in names]}

    def _model(self, name: str) -> dict[str, Any]:
        if name != self.base_name and not self.server.known(name):
            raise UnknownAdapterError(f"the model {name!r} does not exist; GET /v1/models lists the served ones")
        return self._model_entry(name)

    @staticmethod
    def _fields(body: dict[str, Any], allowed: Sequence[str], required: str) -> None:
        unknown = sorted(set(body) - set(allowed))
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: {list(allowed)}", param=unknown[0])
        if not isinstance(body.get(required), str):
            raise HTTPError(400, f"missing field {required!r} (a string)", param=required)

    def _load(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("name", "source", "pin"), "name")
        source = body.get("source")
        if source is not None and not isinstance(source, str):
            raise HTTPError(400, "'source' must be a folder path or 'hub:REF'", param="source")
        return {"loaded": self.server.load(body["name"], source, pin=bool(body.get("pin", False)))}

    def _unload(self, body: dict[str, Any]) -> dict[str, Any]:
        self._fields(body, ("name",), "name")
        self.server.unload(body["name"])
        return {"unloaded": body["name"]}

    def _load_lora(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's ``/v1/load_lora_adapter``: a name already served is refused unless ``load_inplace``."""
        self._fields(body, ("lora_name", "lora_path", "load_inplace"), "lora_name")
        name, path, inplace = body["lora_name"], body.get("lora_path"), body.get("load_inplace", False)
        if not isinstance(path, str):
            raise HTTPError(400, "missing field 'lora_path' (an adapter folder or 'hub:REF')", param="lora_path")
        if not isinstance(inplace, bool):
            raise HTTPError(400, f"load_inplace must be true or false, got {inplace!r}", param="load_inplace")
        if not inplace and (name == self.base_name or self.server.known(name)):
            raise HTTPError(
                400, f"the adapter {name!r} is already served; pass load_inplace: true to replace it", param="lora_name"
            )
        info = self.server.load(name, path)
        return {"loaded": info, "message": f"Success: LoRA adapter '{name}' added successfully."}

    def _unload_lora(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's ``/v1/unload_lora_adapter`` (as ``/v1/adapters/unload``: it leaves the cache)."""
        self._fields(body, ("lora_name",), "lora_name")
        self.server.unload(body["lora_name"])
        return {"unloaded": body["lora_name"], "message": f"Success: LoRA adapter '{body['lora_name']}' removed."}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "adapterlab-serve"
            timeout = app.read_timeout_s  # StreamRequestHandler.setup: socket.settimeout

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                logger.debug("%s " + format, self.address_string(), *args)

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()  # a read timeout there closes the connection
                except _GONE as exc:
                    self._gone(exc)

            def _gone(self, exc: BaseException) -> None:
                logger.debug("%s: client disconnected (%s)", self.address_string(), type(exc).__name__)
                self.close_connection = True

            def _send(self, status: int, payload: dict[str, Any], *, close: bool = False) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if close:
                    self.send_header("Connection", "close")  # also sets self.close_connection
                self.end_headers()
                self.wfile.write(data)

            def _send_error(self, exc: BaseException) -> None:
                status, payload = _error_of(exc)
                try:
                    self._send(status, payload, close=isinstance(exc, HTTPError) and exc.close)
                except (*_GONE, TimeoutError) as gone:
                    self._gone(gone)

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                """The stdlib's own refusals (bad request line, 414, 431, 501, ...) as JSON, then close."""
                self.log_error("code %d, message %s", code, message)
                if self.request_version == "HTTP/0.9":  # a garbage request line: still send a status line
                    self.request_version = self.protocol_version
                short = self.responses.get(code, ("error",))[0]
                self._send_error(HTTPError(int(code), message or short, close=True))

            def _answer(self, route: Callable[[], dict[str, Any] | _Stream]) -> None:
                """Run ``route`` and send its JSON or its event stream, or the error it raised."""
                try:
                    result = route()
                except _GONE as exc:
                    self._gone(exc)
                    return
                except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                    self._send_error(exc)
                    return
                if not isinstance(result, dict):
                    self._stream(result)
                    return
                try:
                    self._send(200, result)
                except (*_GONE, TimeoutError) as exc:
                    self._gone(exc)

            def _stream(self, stream: _Stream) -> None:
                """Server-sent events, one chunk of the chunked body each (HTTP/1.0: until close)."""
                chunked = self.request_version != "HTTP/1.0"
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                    self.send_header("Cache-Control", "no-cache")
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                    else:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    for event in stream.events:
                        data = b"data: " + (b"[DONE]" if event is None else json.dumps(event).encode()) + b"\n\n"
                        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data) if chunked else data)
                    if chunked:
                        self.wfile.write(b"0\r\n\r\n")
                except (*_GONE, TimeoutError) as exc:
                    self._gone(exc)
                except Exception:  # noqa: BLE001 - the status line is out: log it and drop the connection
                    logger.exception("a streamed answer failed")
                    self.close_connection = True
                finally:
                    stream.close()  # cancels the jobs still running

            def handle_expect_100(self) -> bool:
                try:
                    self._content_length()  # refuse a bad or too large body before the client sends it
                except HTTPError as exc:
                    self._send_error(exc)
                    return False
                return super().handle_expect_100()

            def _content_length(self) -> int:
                te = self.headers.get("Transfer-Encoding")
                if te is not None:
                    raise HTTPError(
                        411,
                        f"Transfer-Encoding {te[:40]!r} is not supported; send the body with a Content-Length header",
                        close=True,
                    )
                values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
                if not values:
                    return 0
                if len(values) > 1:
                    raise HTTPError(
                        400, f"conflicting Content-Length headers {sorted(v[:20] for v in values)}", close=True
                    )
                text = values.pop()
                if not (text.isascii() and text.isdigit()):
                    raise HTTPError(
                        400,
                        f"Content-Length {text[:40]!r} is not a byte count; "
                        f"give an integer in [0, {app.max_body_bytes}]",
                        close=True,
                    )
                length = int(text) if len(text) <= 18 else app.max_body_bytes + 1
                if length > app.max_body_bytes:
                    raise HTTPError(
                        413,
                        f"request body of {text[:40]} bytes exceeds the limit of {app.max_body_bytes} bytes",
                        close=True,
                    )
                return length

            def _raw_body(self) -> bytes:
                length = self._content_length()
                if not length:
                    return b""
                try:
                    raw = self.rfile.read(length)
                except TimeoutError:
                    raise HTTPError(
                        408,
                        f"the request body ({length} bytes announced) did not arrive within "
                        f"the read timeout of {app.read_timeout_s:g} s",
                        close=True,
                    ) from None
                if len(raw) < length:
                    raise HTTPError(
                        400, f"the request body ended after {len(raw)} of {length} announced bytes", close=True
                    )
                return raw

            def _body(self) -> dict[str, Any]:
                raw = self._raw_body()
                try:
                    body = json.loads(raw or b"{}")
                except RecursionError:
                    raise HTTPError(
                        400,
                        f"request body is not valid JSON: it nests deeper than {sys.getrecursionlimit()} levels",
                        close=True,
                    ) from None
                except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
                    raise HTTPError(400, f"request body is not valid JSON ({exc})") from None
                if not isinstance(body, dict):
                    raise HTTPError(400, "request body must be a JSON object")
                return body

            def _path(self) -> str:
                return unquote(urlsplit(self.path).path)

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                routes: dict[str, Callable[[], dict[str, Any]]] = {
                    "/health": lambda: {"status": "ok", "queued": app.queue.qsize()},
                    "/v1/adapters": lambda: {"adapters": app.server.adapters()},
                    "/v1/models": app._models,
                }
                routes["/"] = routes["/health"]
                routes["/adapters"] = routes["/v1/adapters"]

                def route() -> dict[str, Any]:
                    self._raw_body()  # a GET with a body: read it so the connection stays in step
                    path = self._path()
                    if path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
                        return app._model(path[len("/v1/models/") :])
                    if path not in routes:
                        raise HTTPError(404, f"no route GET {path}; try /v1/models, /v1/adapters or /health")
                    return routes[path]()

                self._answer(route)

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                routes: dict[str, Callable[[dict[str, Any]], Any]] = {
                    "/v1/completions": lambda body: app._generate("completion", body),
                    "/v1/chat/completions": lambda body: app._generate("chat", body),
                    "/v1/adapters/load": app._load,
                    "/v1/adapters/unload": app._unload,
                    "/v1/load_lora_adapter": app._load_lora,
                    "/v1/unload_lora_adapter": app._unload_lora,
                }

                def route() -> Any:
                    handler = routes.get(self._path())
                    if handler is None:
                        self._raw_body()  # drain the body so the connection stays usable
                        raise HTTPError(404, f"no route POST {self._path()}; routes: {sorted(routes)}")
                    return handler(self._body())

                self._answer(route)

        return Handler
