"""One bad request never fails the batch it arrives with: validation before queueing, isolation inside.

The HTTP cases send 8 concurrent requests (7 valid + 1 bad) through the real ``openai`` client when it
is installed (it is in the ``[dev]`` extra) and through ``http.client`` always; the 7 answers must
equal the in-process reference and the bad one must be a 400 naming the bad value.
"""

from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from adapterlab.models import tiny_tokenizer
from adapterlab.serving import AdapterServer, Request
from adapterlab.serving.http import ServingHTTP
from tests.serving._helpers import base_model, make_lora

VOCAB = 128  # tiny_llama's vocabulary
CONTEXT = 256  # tiny_llama's max_position_embeddings
SENTINEL = 77  # a token id that makes the patched model.generate fail (a fault inside the batch)

# (prompt, model name, max_tokens): adapters a and b, the base, text and token-id prompts
VALID = [
    ("hello", "a", 4),
    ([5, 6, 7, 8], "b", 3),
    ("the base", "base", 4),
    ([9, 10, 11], "a", 2),
    ("more text", "b", 4),
    ([12, 13], "base", 3),
    ("last one", "a", 4),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_requests")
    server = AdapterServer(
        base_model(),
        tokenizer=tiny_tokenizer(),
        capacity=4,
        adapters={"a": make_lora(root / "a", seed=0), "b": make_lora(root / "b", seed=1, r=2)},
    )
    reference = {
        i: server.generate([Request(p, None if m == "base" else m, n)])[0] for i, (p, m, n) in enumerate(VALID)
    }
    http = ServingHTTP(server, port=0, max_queue=64, max_batch=8, batch_wait_s=0.05).start()
    yield http, reference
    http.shutdown()


def _post(port: int, body: dict) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _eight(bad_prompt) -> list[tuple]:
    """The 7 valid requests with one bad one in the middle (index 3)."""
    reqs = list(VALID)
    reqs.insert(3, (bad_prompt, "a", 4))
    return reqs


def _check_seven(results, reference, bad_index=3):
    valid = [r for i, r in enumerate(results) if i != bad_index]
    for i, got in enumerate(valid):
        want = reference[i]
        assert got["choices"][0]["tokens"] == want.tokens, i
        assert got["choices"][0]["text"] == want.text, i
        assert got["choices"][0]["finish_reason"] == want.finish_reason, i
        assert got["usage"]["prompt_tokens"] == want.prompt_tokens, i


def test_one_bad_token_id_fails_alone_http_client(served):
    http, reference = served
    reqs = _eight([5, 6, 500])
    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda r: _post(http.port, {"model": r[1], "prompt": r[0], "max_tokens": r[2]}), reqs))
    status, body = out[3]
    assert status == 400, body
    assert "500" in body["error"]["message"] and f"0..{VOCAB - 1}" in body["error"]["message"]
    assert all(s == 200 for i, (s, _) in enumerate(out) if i != 3), out
    _check_seven([b for _, b in out], reference)


def test_one_bad_token_id_fails_alone_openai_client(served):
    openai = pytest.importorskip("openai")
    http, reference = served
    client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def send(r):
        try:
            return client.completions.create(model=r[1], prompt=r[0], max_tokens=r[2]).model_dump()
        except openai.BadRequestError as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        out = list(pool.map(send, _eight([5, 6, 500])))
    bad = out[3]
    assert isinstance(bad, openai.BadRequestError) and bad.status_code == 400
    # the error body is OpenAI's {"error": {message, type, param, code}}; the client reads its fields
    assert "500" in bad.message and f"0..{VOCAB - 1}" in bad.message
    assert bad.param == "prompt" and bad.type == "invalid_request_error"
    assert all(isinstance(r, dict) for i, r in enumerate(out) if i != 3), out
    for i, r in enumerate(out):
        if i != 3:
            assert r["object"] == "text_completion" and r["model"] == _eight([0])[i][1]
    _check_seven(out, reference)
    models = {m.id for m in client.models.list()}
    assert {"base", "a", "b"} <= models


def test_prompt_beyond_the_context_is_refused(served):
    http, _ = served
    status, body = _post(http.port, {"prompt": [5] * 8000, "model": "a", "max_tokens": 16})
    assert status == 400
    assert (
        "8000" in body["error"]["message"]
        and str(CONTEXT) in body["error"]["message"]
        and "8016" in body["error"]["message"]
    )
    status, body = _post(http.port, {"prompt": "hi", "model": "a", "max_tokens": 300})  # <= 512, > context
    assert status == 400 and str(CONTEXT) in body["error"]["message"] and "300" in body["error"]["message"]
    status, body = _post(http.port, {"prompt": [5] * 250, "model": "a", "max_tokens": 6})  # exactly fits
    assert status == 200, body
    with pytest.raises(ValueError, match="context of 256 tokens"):
        http.server.check(Request([5] * 8000, "a", 16))


def test_model_and_adapter_fields(served):
    http, reference = served
    status, body = _post(http.port, {"prompt": "hello", "adapter": "a", "model": "a", "max_tokens": 4})
    assert status == 200 and body["choices"][0]["tokens"] == reference[0].tokens
    status, body = _post(http.port, {"prompt": "hello", "adapter": "a", "model": "b"})
    assert status == 400 and "disagree" in body["error"]["message"]
    status, body = _post(http.port, {"prompt": "hello", "model": 3})
    assert status == 400 and "'model'" in body["error"]["message"]
    status, body = _post(http.port, {"prompt": "hello", "model": "ghost"})
    assert status == 404 and "ghost" in body["error"]["message"]
    status, body = _post(http.port, {"prompt": [5, -1], "model": "a"})
    assert status == 400


def _poison(server: AdapterServer, monkeypatch) -> None:
    """model.generate fails for any batch holding SENTINEL (a fault only the whole batch can show)."""
    original = server.model.generate

    def generate(*args, **kwargs):
        if bool((kwargs["input_ids"] == SENTINEL).any()):
            raise ValueError(f"kernel fault on token {SENTINEL}")
        return original(*args, **kwargs)

    monkeypatch.setattr(server.model, "generate", generate)


def test_failure_inside_a_batch_fails_only_its_request(served, monkeypatch):
    http, reference = served
    server = http.server
    _poison(server, monkeypatch)
    reqs = [Request(p, None if m == "base" else m, n) for p, m, n in _eight([5, SENTINEL, 6])]
    before = server.stats["batches"]
    out = server.generate(reqs, return_exceptions=True)
    assert isinstance(out[3], ValueError) and str(SENTINEL) in str(out[3])
    for i, c in enumerate(o for j, o in enumerate(out) if j != 3):
        assert c.tokens == reference[i].tokens, i
    assert server.stats["batches"] - before <= 4  # halves, not one retry per request
    with pytest.raises(ValueError, match="kernel fault"):
        server.generate(reqs)  # without return_exceptions the error is raised
    # the same over HTTP: 7 answers, 1 error
    with ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda r: _post(http.port, {"model": r[1], "prompt": r[0], "max_tokens": r[2]}),
                _eight([5, SENTINEL, 6]),
            )
        )
    assert got[3][0] == 400 and str(SENTINEL) in got[3][1]["error"]["message"]
    assert all(s == 200 for i, (s, _) in enumerate(got) if i != 3), got
    _check_seven([b for _, b in got], reference)


def test_in_process_validation_names_the_value():
    server = AdapterServer(base_model(), tokenizer=tiny_tokenizer(), context_length=32)
    with pytest.raises(ValueError, match=r"token id 128 \(position 1\).*0\.\.127"):
        server.check(Request([5, 128], None, 2))
    with pytest.raises(ValueError, match="context of 32 tokens"):
        server.check(Request([5] * 30, None, 3))
    with pytest.raises(ValueError, match=r"prompt item -3 \(position 1\).*ints >= 0"):
        Request([5, -3], None, 2)
    with pytest.raises(ValueError, match="got 5"):
        Request(5, None, 2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="request fields"):
        server.check({"prompt": [5], "temperature": 1})
    checked = server.check(Request("hi", None, 2))
    assert checked.prompt == tiny_tokenizer()("hi")["input_ids"]
    out = server.generate([Request([5, 128], None, 2), Request([5, 6], None, 2)], return_exceptions=True)
    assert isinstance(out[0], ValueError) and out[1].tokens == server.generate([Request([5, 6], None, 2)])[0].tokens
    with pytest.raises(ValueError, match="context_length"):
        AdapterServer(base_model(), context_length=0)


def test_eos_and_length_cut_per_request():
    """The vectorised EOS / budget cut equals the plain per-request rule."""
    server = AdapterServer(base_model())
    reqs = [Request([5 + i, 9, 13], None, n) for i, n in enumerate((1, 3, 8, 5))]
    got = server.generate(reqs)
    for r, c in zip(reqs, got):
        seq = server.model.generate(
            input_ids=torch.tensor([r.prompt]),
            max_new_tokens=r.max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
        want = seq[0, len(r.prompt) :].tolist()
        stop = next((i for i, t in enumerate(want) if t == 2), None)
        assert c.tokens == (want if stop is None else want[:stop])
        assert c.finish_reason == ("length" if stop is None else "stop")
