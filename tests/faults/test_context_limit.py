"""Issue 15 (accepted silently before): a prompt + ``max_tokens`` beyond the model's context
(``max_position_embeddings``) is a 400 naming the numbers, for that request alone: the other requests
of the batch it arrived with still answer, equal to the in-process reference."""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapterlab.models import tiny_tokenizer
from adapterlab.serving import AdapterServer, Request
from adapterlab.serving.http import ServingHTTP
from tests.serving._helpers import base_model, make_lora

CONTEXT = 256  # tiny_llama's max_position_embeddings
VALID = [([5, 6, 7], "a", 4), ("hello", None, 3), ([9, 10], "a", 2), ("text", "a", 4), ([11] * 200, None, 5)]


def _message(n_prompt: int, n_new: int) -> str:
    return (
        f"prompt ({n_prompt} tokens) + {n_new} new tokens (max_tokens) = {n_prompt + n_new} tokens exceeds the "
        f"model's context of {CONTEXT} tokens; shorten the prompt or ask for fewer tokens"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    server = AdapterServer(
        base_model(), tokenizer=tiny_tokenizer(), adapters={"a": make_lora(tmp_path_factory.mktemp("ctx") / "a")}
    )
    assert server.context_length == CONTEXT  # read from the model's config
    reference = [server.generate([Request(p, m, n)])[0] for p, m, n in VALID]
    app = ServingHTTP(server, port=0, max_queue=64, max_batch=8, batch_wait_s=0.05).start()
    yield app, reference
    app.shutdown()


def _post(port: int, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize(
    "prompt,max_tokens,n_prompt",
    [([5] * 8000, 16, 8000), ([5] * 250, 7, 250), ("x" * 300, 1, 300)],
    ids=["8000-tokens", "one-over", "long-text"],
)
def test_over_the_context_fails_alone_in_its_batch(served, prompt, max_tokens, n_prompt):
    app, reference = served
    bodies = [{"prompt": p, "model": m or "base", "max_tokens": n} for p, m, n in VALID]
    bodies.insert(2, {"prompt": prompt, "model": "a", "max_tokens": max_tokens})
    with ThreadPoolExecutor(len(bodies)) as pool:
        out = list(pool.map(lambda b: _post(app.port, b), bodies))
    status, body = out.pop(2)
    assert status == 400 and body["error"]["message"] == _message(n_prompt, max_tokens)
    for (status, got), want in zip(out, reference):
        assert status == 200, got
        assert got["choices"][0]["tokens"] == want.tokens


def test_exactly_the_context_is_served_and_the_library_refuses_one_more(served):
    app, _ = served
    status, body = _post(app.port, {"prompt": [5] * 250, "model": "a", "max_tokens": 6})
    assert status == 200, body
    with pytest.raises(ValueError) as err:
        app.server.check(Request([5] * 250, "a", 7))
    assert str(err.value) == _message(250, 7)
    out = app.server.generate([Request([5] * 250, "a", 7), Request([5, 6, 7], "a", 4)], return_exceptions=True)
    assert isinstance(out[0], ValueError) and str(out[0]) == _message(250, 7)
    assert out[1].tokens == app.server.generate([Request([5, 6, 7], "a", 4)])[0].tokens
