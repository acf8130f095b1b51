"""A small JSON-over-HTTP front end for :class:`AdapterServer` (stdlib only, 127.0.0.1 by default).

Endpoints (OpenAI's completions schema, with ``model`` = adapter name):
    GET  /health                  -> {"status": "ok", "queued": n}
    GET  /v1/adapters             -> {"adapters": [{name, kind, loaded, pinned, rank, source}, ...]}
    GET  /v1/models               -> {"object": "list", "data": [{"id": name, "object": "model"}, ...]}
    POST /v1/completions          {"prompt": str | [ids], "model" or "adapter": name, "max_tokens": 16}
                                  -> {"id", "object", "created", "model", "adapter",
                                      "choices": [{"index", "text", "tokens", "logprobs", "finish_reason"}],
                                      "usage"}
    POST /v1/adapters/load        {"name": ..., "source": folder | "hub:REF" (optional), "pin": false}
    POST /v1/adapters/unload      {"name": ...}

``"model": "base"`` (``base_name``) or ``"adapter": null`` means the base model without an adapter.
Every completion request is validated before it is queued (adapter known, token ids in the
vocabulary, ``max_tokens`` in range, prompt + ``max_tokens`` within the model's context), so a bad
request is answered on its own; the queue is bounded (full -> 503); one worker thread drains it into
batches of up to ``max_batch`` requests, and a request that still fails inside a batch fails only
itself (the batch is retried without it, see :meth:`AdapterServer.generate`).

Errors are JSON ``{"error": message}``: 400 bad request, 404 unknown adapter or route, 408 body not
received within the read timeout, 409 cache full of pinned adapters, 411 chunked body, 413 body too
large, 503 queue full, 504 completion timed out. Errors in the framing (a bad ``Content-Length``, a
body that is too large, too slow, truncated or nested too deeply) also close the connection. Every
socket has a read timeout (``read_timeout_s``, default 30 s): an idle or stalled connection is
closed then, so it does not hold a thread. A client that disconnects early is logged as one debug
line.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from adapterlab.serving.server import AdapterServer, Completion, Request, UnknownAdapterError

__all__ = ["DEFAULT_READ_TIMEOUT_S", "MAX_BODY", "ServingHTTP"]

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20
DEFAULT_READ_TIMEOUT_S = 30.0
COMPLETION_FIELDS = ("prompt", "adapter", "max_tokens", "max_new_tokens", "model")
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)  # the client went away


class HTTPError(Exception):
    """An error answer: ``status`` and a one-line message; ``close`` drops the connection after it."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close


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


@dataclass
class _Job:
    request: Request
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None


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
        return f"http://{self._httpd.server_address[0]}:{self.port}"

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
                for job in batch:
                    if not job.done.is_set():
                        job.error = exc
                        job.done.set()

    def _run_batch(self, batch: list[_Job]) -> None:
        ok: list[_Job] = []
        failed: dict[str, BaseException] = {}
        for job in batch:  # load every distinct adapter first: a broken one fails only its requests
            name = job.request.adapter
            if name is not None and name not in failed:
                try:
                    self.server.load(name)
                except Exception as exc:  # noqa: BLE001 - reported to that request
                    failed[name] = exc
            if name in failed:
                job.error = failed[name]
                job.done.set()
            else:
                ok.append(job)
        if not ok:
            return
        # a request that fails inside the batch fails alone: generate retries the rest without it
        results = self.server.generate([j.request for j in ok], return_exceptions=True)
        for job, res in zip(ok, results):
            if isinstance(res, Completion):
                job.result = res
            else:
                job.error = res
            job.done.set()

    # -- request handling ---------------------------------------------------------------------

    def _adapter_of(self, body: dict[str, Any]) -> str | None:
        """The adapter a completion names: ``adapter`` (null = base), else OpenAI's ``model``."""
        model = body.get("model")
        if "model" in body and not isinstance(model, str):
            raise HTTPError(400, f"'model' must be an adapter name (a string) or {self.base_name!r}, got {model!r}")
        as_adapter = None if model == self.base_name else model
        if "adapter" in body:
            adapter = body["adapter"]
            if "model" in body and as_adapter != adapter:
                raise HTTPError(400, f"'adapter' {adapter!r} and 'model' {model!r} disagree; give one of them")
            return adapter
        return as_adapter

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - set(COMPLETION_FIELDS))
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: {list(COMPLETION_FIELDS)}")
        if "prompt" not in body:
            raise HTTPError(400, "missing field 'prompt'")
        n = body.get("max_new_tokens", body.get("max_tokens", 16))
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_new_tokens:
            raise HTTPError(400, f"max_tokens must be an integer in [1, {self.max_new_tokens}], got {n!r}")
        adapter = self._adapter_of(body)
        req = Request(body["prompt"], adapter, n)
        if adapter is not None and not self.server.known(adapter):
            raise UnknownAdapterError(f"unknown adapter {adapter!r}; GET /v1/adapters lists the served ones")
        req = self.server.check(req)  # token ids, context: refused here, never queued with others
        job = _Job(req)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise HTTPError(503, f"the request queue is full ({self.queue.maxsize}); retry later") from None
        if not job.done.wait(self.request_timeout_s):
            raise HTTPError(504, f"the completion did not finish within {self.request_timeout_s:g} s")
        if job.error is not None:
            raise job.error
        res = job.result
        assert res is not None
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": res.adapter if res.adapter is not None else self.base_name,
            "adapter": res.adapter,
            "choices": [
                {
                    "index": 0,
                    "text": res.text,
                    "tokens": res.tokens,
                    "logprobs": None,
                    "finish_reason": res.finish_reason,
                }
            ],
            "usage": {
                "prompt_tokens": res.prompt_tokens,
                "completion_tokens": len(res.tokens),
                "total_tokens": res.prompt_tokens + len(res.tokens),
            },
        }

    def _models(self) -> dict[str, Any]:
        names = [self.base_name] + [row["name"] for row in self.server.adapters() if row["name"] != self.base_name]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "adapterlab"} for n in names],
        }

    def _load(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - {"name", "source", "pin"})
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: ['name', 'source', 'pin']")
        name = body.get("name")
        if not isinstance(name, str):
            raise HTTPError(400, "missing field 'name' (a string)")
        source = body.get("source")
        if source is not None and not isinstance(source, str):
            raise HTTPError(400, "'source' must be a folder path or 'hub:REF'")
        return {"loaded": self.server.load(name, source, pin=bool(body.get("pin", False)))}

    def _unload(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("name")
        if not isinstance(name, str):
            raise HTTPError(400, "missing field 'name' (a string)")
        self.server.unload(name)
        return {"unloaded": name}

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

            def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
                """The stdlib's own refusals (bad request line, 414, 431, 501, ...) as JSON, then close."""
                self.log_error("code %d, message %s", code, message)
                if self.request_version == "HTTP/0.9":  # a garbage request line: still send a status line
                    self.request_version = self.protocol_version
                short = self.responses.get(code, ("error",))[0]
                try:
                    self._send(int(code), {"error": message or short}, close=True)
                except (*_GONE, TimeoutError) as exc:
                    self._gone(exc)

            def _answer(self, route: Callable[[], dict[str, Any]]) -> None:
                """Run ``route`` and send its JSON, or the error it raised; a vanished client is one debug line."""
                close = False
                try:
                    status, payload = 200, route()
                except _GONE as exc:
                    self._gone(exc)
                    return
                except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                    status = _status_of(exc)
                    close = isinstance(exc, HTTPError) and exc.close
                    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                    if status == 500:
                        logger.error("internal error: %s", msg, exc_info=exc)
                    payload = {"error": str(msg).splitlines()[0] if str(msg) else type(exc).__name__}
                try:
                    self._send(status, payload, close=close)
                except (*_GONE, TimeoutError) as exc:
                    self._gone(exc)

            def handle_expect_100(self) -> bool:
                try:
                    self._content_length()  # refuse a bad or too large body before the client sends it
                except HTTPError as exc:
                    try:
                        self._send(exc.status, {"error": str(exc)}, close=True)
                    except (*_GONE, TimeoutError) as gone:
                        self._gone(gone)
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

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                routes = {
                    "/health": lambda: {"status": "ok", "queued": app.queue.qsize()},
                    "/v1/adapters": lambda: {"adapters": app.server.adapters()},
                    "/v1/models": app._models,
                }
                routes["/"] = routes["/health"]
                routes["/adapters"] = routes["/v1/adapters"]

                def route() -> dict[str, Any]:
                    self._raw_body()  # a GET with a body: read it so the connection stays in step
                    if self.path not in routes:
                        raise HTTPError(404, f"no route GET {self.path}; try /v1/adapters, /v1/models or /health")
                    return routes[self.path]()

                self._answer(route)

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                routes = {
                    "/v1/completions": app._complete,
                    "/v1/adapters/load": app._load,
                    "/v1/adapters/unload": app._unload,
                }

                def route() -> dict[str, Any]:
                    handler = routes.get(self.path)
                    if handler is None:
                        self._raw_body()  # drain the body so the connection stays usable
                        raise HTTPError(404, f"no route POST {self.path}; routes: {sorted(routes)}")
                    return handler(self._body())

                self._answer(route)

        return Handler
