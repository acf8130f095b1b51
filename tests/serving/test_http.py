"""HTTP round trip on an ephemeral port: completions, adapter list, load/unload, errors, 503."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from adapterlab.models import tiny_tokenizer
from adapterlab.serving import AdapterServer, Request
from adapterlab.serving.http import ServingHTTP
from tests.serving._helpers import base_model, make_lora


def _call(url: str, path: str, body=None, raw: bytes | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        url + path, data=data, method="GET" if data is None else "POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    a, b = make_lora(root / "a", seed=0), make_lora(root / "b", seed=1, r=2)
    broken = make_lora(root / "broken", seed=2)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    server = AdapterServer(base_model(), tokenizer=tiny_tokenizer(), capacity=2, adapters={"a": a, "broken": broken})
    http = ServingHTTP(server, port=0, max_queue=1, max_batch=4).start()
    yield http, {"a": a, "b": b}
    http.shutdown()


def test_round_trip(app):
    http, paths = app
    url = http.url
    assert url.startswith("http://127.0.0.1:")
    status, body = _call(url, "/v1/completions", {"prompt": "hello", "adapter": "a", "max_tokens": 4})
    assert status == 200, body
    want = http.server.generate([Request("hello", "a", 4)])[0]
    assert body["choices"][0]["tokens"] == want.tokens
    assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    status, body = _call(url, "/v1/completions", {"prompt": [5, 6, 7], "adapter": None, "max_new_tokens": 2})
    assert status == 200 and body["adapter"] is None
    status, body = _call(url, "/v1/adapters")
    assert status == 200 and {r["name"] for r in body["adapters"]} >= {"a", "broken"}
    # load / unload over HTTP
    status, body = _call(url, "/v1/adapters/load", {"name": "b", "source": str(paths["b"]), "pin": True})
    assert status == 200 and body["loaded"]["pinned"] is True
    assert _call(url, "/v1/completions", {"prompt": "x", "adapter": "b", "max_tokens": 1})[0] == 200
    assert _call(url, "/v1/adapters/unload", {"name": "b"})[0] == 200
    assert "b" not in http.server.loaded()


def test_errors_keep_serving(app):
    http, _ = app
    url = http.url
    status, body = _call(url, "/v1/completions", {"prompt": "hi", "adapter": "nope"})
    assert status == 404 and "nope" in body["error"]["message"]
    assert _call(url, "/v1/completions", raw=b"{not json")[0] == 400
    status, body = _call(url, "/v1/completions", {"prompt": "hi", "temperature": 1.0})
    assert status == 400 and "temperature" in body["error"]["message"]
    assert _call(url, "/v1/completions", {"prompt": "hi", "max_tokens": 0})[0] == 400
    assert _call(url, "/v1/completions", {"prompt": ""})[0] == 400
    status, body = _call(url, "/v1/completions", {"prompt": "hi", "adapter": "broken", "max_tokens": 2})
    assert status == 400 and "broken" in body["error"]["message"]
    assert _call(url, "/v1/adapters/unload", {"name": "ghost"})[0] == 404
    assert _call(url, "/v1/adapters/load", {"name": "x", "source": "/does/not/exist"})[0] == 400
    assert _call(url, "/v1/nothing")[0] == 404
    # still serving the good adapter
    assert _call(url, "/v1/completions", {"prompt": "hi", "adapter": "a", "max_tokens": 2})[0] == 200


def test_full_queue_answers_503(app):
    http, _ = app
    url = http.url
    results: list[int] = []

    def send():
        results.append(_call(url, "/v1/completions", {"prompt": "q", "adapter": "a", "max_tokens": 1})[0])

    with http.server._lock:  # the worker blocks on the model lock: the queue (size 1) fills up
        t1 = threading.Thread(target=send)
        t1.start()
        for _ in range(200):  # wait until the worker has taken request 1 off the queue
            time.sleep(0.02)
            if http.queue.qsize() == 0 and http.server._lock._is_owned() and results == [] and t1.is_alive():
                break
        time.sleep(0.2)
        t2 = threading.Thread(target=send)
        t2.start()
        for _ in range(200):
            if http.queue.qsize() == 1:
                break
            time.sleep(0.02)
        status, body = _call(url, "/v1/completions", {"prompt": "q", "adapter": "a", "max_tokens": 1})
        assert status == 503 and "queue is full" in body["error"]["message"]
    t1.join(60)
    t2.join(60)
    assert results == [200, 200]
