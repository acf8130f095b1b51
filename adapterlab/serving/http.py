"""A small JSON-over-HTTP front end for :class:`AdapterServer` (stdlib only, 127.0.0.1 by default).

Endpoints:
    GET  /health                  -> {"status": "ok", "queued": n}
    GET  /v1/adapters             -> {"adapters": [{name, kind, loaded, pinned, rank, source}, ...]}
    POST /v1/completions          {"prompt": str | [ids], "adapter": name | null, "max_tokens": 16}
                                  -> {"adapter", "choices": [{"text", "tokens", "finish_reason"}], "usage"}
    POST /v1/adapters/load        {"name": ..., "source": folder | "hub:REF" (optional), "pin": false}
    POST /v1/adapters/unload      {"name": ...}

Completion requests go into a bounded queue (full -> 503); one worker thread drains it into
batches of up to ``max_batch`` requests and runs each batch as one :meth:`AdapterServer.generate`.
Errors are JSON ``{"error": message}``: 400 bad request, 404 unknown adapter, 409 cache full of
pinned adapters, 413 body too large, 503 queue full. A failing adapter fails only its own requests.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from adapterlab.serving.server import AdapterServer, Completion, Request, UnknownAdapterError

__all__ = ["ServingHTTP"]

logger = logging.getLogger(__name__)

MAX_BODY = 1 << 20
COMPLETION_FIELDS = ("prompt", "adapter", "max_tokens", "max_new_tokens", "model")


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


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
    """

    def __init__(
        self, server: AdapterServer, *, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 64,
        max_batch: int | None = None, batch_wait_s: float = 0.01, max_new_tokens: int = 512,
        request_timeout_s: float = 600.0,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.server = server
        self.max_batch = max_batch or server.max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_new_tokens = max_new_tokens
        self.request_timeout_s = request_timeout_s
        self.queue: queue.Queue[_Job] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
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
                continue
            try:
                results = self.server.generate([j.request for j in ok])
                for job, res in zip(ok, results):
                    job.result = res
            except Exception as exc:  # noqa: BLE001 - reported to every request of the batch
                logger.exception("batch of %d failed", len(ok))
                for job in ok:
                    job.error = exc
            for job in ok:
                job.done.set()

    # -- request handling ---------------------------------------------------------------------

    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(body) - set(COMPLETION_FIELDS))
        if unknown:
            raise HTTPError(400, f"unknown field(s) {unknown}; allowed: {list(COMPLETION_FIELDS)}")
        if "prompt" not in body:
            raise HTTPError(400, "missing field 'prompt'")
        n = body.get("max_new_tokens", body.get("max_tokens", 16))
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_new_tokens:
            raise HTTPError(400, f"max_tokens must be an integer in [1, {self.max_new_tokens}], got {n!r}")
        adapter = body.get("adapter")
        req = Request(body["prompt"], adapter, n)
        if adapter is not None and not self.server.known(adapter):
            raise UnknownAdapterError(f"unknown adapter {adapter!r}; GET /v1/adapters lists the served ones")
        job = _Job(req)
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise HTTPError(503, f"the request queue is full ({self.queue.maxsize}); retry later") from None
        if not job.done.wait(self.request_timeout_s):
            raise HTTPError(504, "the completion did not finish in time")
        if job.error is not None:
            raise job.error
        res = job.result
        assert res is not None
        return {
            "object": "text_completion",
            "adapter": res.adapter,
            "choices": [{"index": 0, "text": res.text, "tokens": res.tokens, "finish_reason": res.finish_reason}],
            "usage": {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
                      "total_tokens": res.prompt_tokens + len(res.tokens)},
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

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                logger.debug("%s " + format, self.address_string(), *args)

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _fail(self, exc: BaseException) -> None:
                status = _status_of(exc)
                msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
                if status == 500:
                    logger.exception("internal error", exc_info=exc)
                self._send(status, {"error": str(msg).splitlines()[0] if str(msg) else type(exc).__name__})

            def do_GET(self) -> None:  # noqa: N802 - stdlib name
                try:
                    if self.path in ("/health", "/"):
                        self._send(200, {"status": "ok", "queued": app.queue.qsize()})
                    elif self.path in ("/v1/adapters", "/adapters"):
                        self._send(200, {"adapters": app.server.adapters()})
                    else:
                        raise HTTPError(404, f"no route GET {self.path}; try /v1/adapters or /health")
                except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                    self._fail(exc)

            def _body(self) -> dict[str, Any]:
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    raise HTTPError(400, "bad Content-Length header") from None
                if length > MAX_BODY:
                    raise HTTPError(413, f"request body of {length} bytes exceeds {MAX_BODY}")
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise HTTPError(400, f"request body is not valid JSON ({exc})") from None
                if not isinstance(body, dict):
                    raise HTTPError(400, "request body must be a JSON object")
                return body

            def do_POST(self) -> None:  # noqa: N802 - stdlib name
                routes = {"/v1/completions": app._complete, "/v1/adapters/load": app._load,
                          "/v1/adapters/unload": app._unload}
                try:
                    route = routes.get(self.path)
                    if route is None:
                        self._body()  # drain the body so the connection stays usable
                        raise HTTPError(404, f"no route POST {self.path}; routes: {sorted(routes)}")
                    self._send(200, route(self._body()))
                except Exception as exc:  # noqa: BLE001 - every error becomes a JSON answer
                    self._fail(exc)

        return Handler
