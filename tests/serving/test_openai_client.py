"""The real ``openai`` client against ``ServingHTTP`` on 127.0.0.1: completions, chat, streaming, errors,
the model list, vLLM's load/unload aliases, and a mixed concurrent batch that answers token for token
what :meth:`AdapterServer.generate` answers in-process."""

from __future__ import annotations

import http.client as _http_client
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapterlab.models import tiny_tokenizer
from adapterlab.serving import AdapterServer, Request
from adapterlab.serving.http import ServingHTTP
from adapterlab.serving.openai_api import TextStream
from tests.serving._helpers import base_model, make_lora

openai = pytest.importorskip("openai")

# a chat template for the character-level test tokenizer (every character is a token)
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    server = AdapterServer(
        base_model(),
        tokenizer=tok,
        capacity=4,
        adapters={"a": make_lora(root / "a", seed=0), "b": make_lora(root / "b", seed=1, r=2)},
    )
    http = ServingHTTP(server, port=0, max_queue=64, max_batch=16, batch_wait_s=0.02).start()
    client = openai.OpenAI(base_url=f"{http.url}/v1", api_key="x", max_retries=0, timeout=60)
    yield http, client, make_lora(root / "c", seed=3)
    http.shutdown()


def _want(server: AdapterServer, prompt, model: str, n: int):
    return server.generate([Request(prompt, None if model == "base" else model, n)])[0]


def _chat_ids(server: AdapterServer, messages) -> list[int]:
    out = server.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def test_completions_equal_in_process(served):
    http, client, _ = served
    server = http.server
    resp = client.completions.create(model="a", prompt="hello", max_tokens=8)
    want = _want(server, "hello", "a", 8)
    assert resp.object == "text_completion" and resp.model == "a" and resp.id.startswith("cmpl-")
    (choice,) = resp.choices
    assert choice.text == want.text and choice.finish_reason == want.finish_reason and choice.index == 0
    assert choice.model_extra["tokens"] == want.tokens and choice.logprobs is None
    assert resp.usage.prompt_tokens == want.prompt_tokens
    assert resp.usage.completion_tokens == len(want.tokens)
    assert resp.usage.total_tokens == want.prompt_tokens + len(want.tokens)
    # token ids, and a list of prompts = a batch with one choice per prompt, in order
    resp = client.completions.create(model="base", prompt=[[5, 6, 7], [9, 10]], max_tokens=5)
    wants = [_want(server, p, "base", 5) for p in ([5, 6, 7], [9, 10])]
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.model_extra["tokens"] for c in resp.choices] == [w.tokens for w in wants]
    assert resp.usage.prompt_tokens == 5 and resp.usage.completion_tokens == sum(len(w.tokens) for w in wants)
    assert resp.model == "base" and resp.model_extra["adapter"] is None
    resp = client.completions.create(model="b", prompt=["one", "two"], max_tokens=4, temperature=0, seed=3)
    assert [c.text for c in resp.choices] == [_want(server, p, "b", 4).text for p in ("one", "two")]


def test_chat_uses_the_chat_template(served):
    http, client, _ = served
    server = http.server
    resp = client.chat.completions.create(model="b", messages=CHAT, max_tokens=10)
    ids = _chat_ids(server, CHAT)
    want = _want(server, ids, "b", 10)
    assert resp.object == "chat.completion" and resp.model == "b" and resp.id.startswith("chatcmpl-")
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert choice.model_extra["tokens"] == want.tokens and choice.finish_reason == want.finish_reason
    assert resp.usage.prompt_tokens == len(ids) == want.prompt_tokens
    # text parts and 'developer' (= system) are accepted; max_completion_tokens is max_tokens' new name
    parts = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ]
    again = client.chat.completions.create(model="b", messages=parts, max_completion_tokens=10)
    assert again.choices[0].message.content == want.text


def _stream_text(events, chat: bool) -> tuple[list[str], list, object]:
    deltas, finishes, usage = [], [], None
    for ev in events:
        if ev.usage is not None:
            usage = ev.usage
        for c in ev.choices:
            piece = c.delta.content if chat else c.text
            if piece:
                deltas.append(piece)
            if c.finish_reason is not None:
                finishes.append(c.finish_reason)
    return deltas, finishes, usage


def test_streaming_deltas_concatenate_to_the_answer(served):
    http, client, _ = served
    plain = client.completions.create(model="a", prompt="stream me", max_tokens=12)
    events = client.completions.create(
        model="a", prompt="stream me", max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    deltas, finishes, usage = _stream_text(events, chat=False)
    text = plain.choices[0].text
    assert "".join(deltas) == text and finishes == [plain.choices[0].finish_reason]
    # the character-level tokenizer makes one character per token: one event per token, as decoded
    assert len(deltas) == len(text) > 1
    assert usage is not None and usage.model_dump() == plain.usage.model_dump()
    chat = client.chat.completions.create(model="b", messages=CHAT, max_tokens=10)
    events = list(client.chat.completions.create(model="b", messages=CHAT, max_tokens=10, stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert all(ev.object == "chat.completion.chunk" and ev.model == "b" for ev in events)
    deltas, finishes, _ = _stream_text(events, chat=True)
    assert "".join(deltas) == chat.choices[0].message.content
    assert finishes == [chat.choices[0].finish_reason]


def test_stop_sequences_end_the_answer(served):
    http, client, _ = served
    full = client.completions.create(model="a", prompt="stop here", max_tokens=16).choices[0]
    assert len(full.text) >= 8, full.text  # the fixture's model writes enough characters to cut
    stop = full.text[4:6]
    cut = full.text[: full.text.find(stop)]
    got = client.completions.create(model="a", prompt="stop here", max_tokens=16, stop=[stop, "\x7f never"])
    assert got.choices[0].text == cut and got.choices[0].finish_reason == "stop"
    events = client.completions.create(model="a", prompt="stop here", max_tokens=16, stop=stop, stream=True)
    deltas, finishes, _ = _stream_text(events, chat=False)
    assert "".join(deltas) == cut and finishes == ["stop"]
    # the stop ended the row: the tokens stop with the one that completed the stop sequence
    tokens = got.choices[0].model_extra["tokens"]
    assert tokens == full.model_extra["tokens"][: len(tokens)] and len(tokens) < len(full.model_extra["tokens"])


def test_unknown_model_is_404_model_not_found(served):
    _, client, _ = served
    for call in (
        lambda: client.completions.create(model="ghost", prompt="hi", max_tokens=2),
        lambda: client.chat.completions.create(model="ghost", messages=CHAT, stream=True),
        lambda: client.models.retrieve("ghost"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.status_code == 404 and err.value.code == "model_not_found"
        assert "ghost" in err.value.message and "Traceback" not in err.value.message


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"temperature": 0.7}, "temperature"),
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 2}, "logprobs"),
        ({"extra_body": {"nonsense": 1}}, "nonsense"),
        ({"prompt": [5, 500]}, "prompt"),
        ({"prompt": [5] * 300}, "prompt"),
    ],
)
def test_bad_requests_are_400_naming_the_field(served, kwargs, param):
    _, client, _ = served
    args = {"model": "a", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(**args)
    assert err.value.status_code == 400 and err.value.param == param
    assert err.value.type == "invalid_request_error"
    if len(args["prompt"]) == 300:
        assert err.value.code == "context_length_exceeded" and "context of 256 tokens" in err.value.message


def test_chat_bad_requests(served):
    _, client, _ = served
    with pytest.raises(openai.BadRequestError, match="temperature 1 asks for sampling"):
        client.chat.completions.create(model="a", messages=CHAT, temperature=1)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="a", messages=[{"role": "tool", "content": "x"}])
    assert err.value.param == "messages" and "'tool'" in err.value.message


def test_models_list(served):
    http, client, _ = served
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"base", "a", "b"}
    assert all(
        m.object == "model" and m.owned_by == "adapterlab" and m.created == http.created for m in models.values()
    )
    assert models["a"].model_extra["parent"] == "base" and models["base"].model_extra["parent"] is None
    assert client.models.retrieve("b").id == "b"


def _post(url: str, path: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_vllm_load_and_unload_aliases(served):
    http, client, c_path = served
    status, body = _post(http.url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(c_path)})
    assert status == 200 and body["loaded"]["name"] == "c", body
    got = client.completions.create(model="c", prompt="hi", max_tokens=4).choices[0]
    assert got.model_extra["tokens"] == _want(http.server, "hi", "c", 4).tokens
    status, body = _post(http.url, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(c_path)})
    assert status == 400 and "load_inplace" in body["error"]["message"]
    body = {"lora_name": "c", "lora_path": str(c_path), "load_inplace": True}
    assert _post(http.url, "/v1/load_lora_adapter", body)[0] == 200
    assert _post(http.url, "/v1/unload_lora_adapter", {"lora_name": "c"})[0] == 200
    assert "c" not in http.server.loaded()
    status, body = _post(http.url, "/v1/unload_lora_adapter", {"lora_name": "ghost"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = _post(http.url, "/v1/load_lora_adapter", {"lora_name": "d", "lora_path": "/not/here"})
    assert status == 400 and "/not/here" in body["error"]["message"]


def test_internal_errors_are_500_without_a_traceback(served, monkeypatch):
    http, client, _ = served

    def boom():
        raise RuntimeError("secret detail /internal/path")

    monkeypatch.setattr(http.server, "adapters", boom)
    with pytest.raises(openai.InternalServerError) as err:
        client.models.list()
    assert err.value.status_code == 500 and err.value.type == "server_error"
    assert "RuntimeError" in err.value.message and "secret" not in err.value.message


def test_mixed_concurrent_batch_equals_in_process(served):
    http, client, _ = served
    server = http.server
    jobs = [
        ("completion", "a", "first", 6),
        ("completion", "b", [5, 6, 7, 8], 5),
        ("chat", "a", CHAT, 7),
        ("completion", "base", "third one", 6),
        ("stream", "b", "streamed", 8),
        ("completion", "a", [9, 10, 11], 4),
        ("chat", "base", CHAT[1:], 5),
        ("completion", "b", "last", 6),
    ]
    wants = [_want(server, _chat_ids(server, p) if kind == "chat" else p, model, n) for kind, model, p, n in jobs]

    def send(job):
        kind, model, prompt, n = job
        if kind == "chat":
            c = client.chat.completions.create(model=model, messages=prompt, max_tokens=n).choices[0]
            return c.message.content, c.model_extra["tokens"]
        if kind == "stream":
            deltas, _, _ = _stream_text(
                client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True), False
            )
            return "".join(deltas), None
        c = client.completions.create(model=model, prompt=prompt, max_tokens=n).choices[0]
        return c.text, c.model_extra["tokens"]

    # hold the model while the requests arrive: the worker sits on a first request, the 8 queue up
    # and then run together (2 batches at most, with the first request's)
    before = server.stats["batches"]
    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        with server._lock:
            blocker = pool.submit(lambda: client.completions.create(model="a", prompt="x", max_tokens=1))
            time.sleep(0.2)
            futures = [pool.submit(send, j) for j in jobs]
            for _ in range(1000):
                if http.queue.qsize() >= len(jobs):
                    break
                time.sleep(0.01)
        got = [f.result(timeout=120) for f in futures]
        blocker.result(timeout=120)
    for (text, tokens), want, job in zip(got, wants, jobs):
        assert text == want.text, job
        assert tokens is None or tokens == want.tokens, job
    assert server.stats["batches"] - before <= 2


def test_text_stream_oracle():
    """Deltas never split a UTF-8 character or the start of a stop sequence; they concatenate to the text."""

    def decode(ids):  # one byte per token, like a byte-level BPE on single bytes
        return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(decode, (), stream=True)
    got = [s.push(i, t) for i, t in enumerate(b"a\xc3\xa9b")]
    assert got == ["a", "", "\u00e9", "b"] and s.tail("a\u00e9b") == ""
    assert s.push(1, 0x41) == "" and s.tokens == list(b"a\xc3\xa9b")  # a replayed step is ignored
    s = TextStream(decode, ("xyz", "q"), stream=True)
    got = [s.push(i, t) for i, t in enumerate(b"abxyxyz!")]
    # with stops, the last len("xyz") - 1 = 2 characters wait; "xyz" ends the text before it
    assert got == ["", "", "a", "b", "x", "y", "", ""] and s.stopped and s.text == "abxy"
    assert "".join(got) == s.text and s.push(8, 0x41) == ""
    s = TextStream(decode, ("q",), stream=False)
    assert [s.push(i, t) for i, t in enumerate(b"abqc")] == ["", "", "", ""] and s.text == "ab" and s.stopped


def test_an_error_after_the_stream_started_is_one_error_event(served, tmp_path):
    http, client, _ = served
    broken = make_lora(tmp_path / "broken", seed=4)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    http.server.register("broken", broken)  # known, so the request is queued; it fails when loaded
    with pytest.raises(openai.APIError) as err:
        list(client.completions.create(model="broken", prompt="hi", max_tokens=4, stream=True))
    assert "broken" in err.value.message and err.value.body["type"] == "invalid_request_error"
    assert client.completions.create(model="a", prompt="hi", max_tokens=2).choices[0].text is not None


def test_step_hook_sees_every_token_and_ends_rows(served):
    """``generate(on_step=)``: the live tokens it is told are the completions (oracle: a run without the
    hook); a row it stops ends with that step's token and ``finish_reason="stop"``, the others are unchanged."""
    server = served[0].server
    reqs = [Request("hook one", "a", 6), Request([5, 6, 7], "b", 9), Request("third", None, 4)]
    want = server.generate(reqs)
    seen: dict[int, list[int]] = {i: [] for i in range(len(reqs))}

    def record(indices, step, tokens, live):
        for b, i in enumerate(indices):
            if bool(live[b]):
                assert step == len(seen[i])
                seen[i].append(int(tokens[b]))
        return None

    got = server.generate(reqs, on_step=record)
    assert [c.tokens for c in got] == [w.tokens for w in want]
    assert [seen[i] for i in range(len(reqs))] == [w.tokens for w in want]

    def stop_row_1_at_step_2(indices, step, tokens, live):
        import torch

        return torch.tensor([i == 1 and step == 2 for i in indices])

    got = server.generate(reqs, on_step=stop_row_1_at_step_2)
    assert got[1].tokens == want[1].tokens[:3] and got[1].finish_reason == "stop"
    assert [got[i].tokens for i in (0, 2)] == [want[i].tokens for i in (0, 2)]


def test_a_client_that_leaves_a_stream_ends_its_row(served, monkeypatch):
    http, _, _ = served
    want = _want(http.server, "go on", "a", 200)
    assert want.finish_reason == "length" and len(want.tokens) == 200  # runs to the budget when nobody leaves
    finished = []
    finish = http._finish
    monkeypatch.setattr(http, "_finish", lambda job, res: finished.append(res) or finish(job, res))
    conn = _http_client.HTTPConnection("127.0.0.1", http.port, timeout=60)
    body = {"model": "a", "prompt": "go on", "max_tokens": 200, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    assert resp.fp.readline()  # the first chunk's size line: the stream has started
    conn.sock.shutdown(2)
    conn.close()
    for _ in range(1000):
        if finished:
            break
        time.sleep(0.01)
    (res,) = finished
    assert res.finish_reason == "stop" and len(res.tokens) < 200
    assert res.tokens == want.tokens[: len(res.tokens)]
