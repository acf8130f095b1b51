"""Issue 15: validation regexes are full matches, so a trailing newline never passes (``"name\\n"``):
``$`` in ``re.match(r"^...$")`` matches before a final newline. Checked for the tuner names of the peft
shim and adapter names of the server (library, HTTP, ``serve --adapter``); recipe step and registry
names are in ``test_dry_run.py``."""

from __future__ import annotations

import http.client
import json

import pytest
from typer.testing import CliRunner

from adapterlab import peft_compat
from adapterlab.cli.app import app
from adapterlab.models import tiny_tokenizer
from adapterlab.serving import AdapterServer
from adapterlab.serving.http import ServingHTTP
from tests._dummy_tuner import PREFIX, DummyConfig, DummyModel
from tests.serving._helpers import base_model, make_lora

ADAPTER_RULE = "is invalid; use 1-200 characters from letters, digits and ._:/@+- (starting with a letter or digit)"


def test_tuner_name_with_a_trailing_newline_is_refused():
    with pytest.raises(ValueError) as err:
        peft_compat.register_tuner("adapterlab_nl\n", DummyConfig, DummyModel, prefix=PREFIX)
    assert str(err.value) == (
        "tuner name 'adapterlab_nl\\n' must be lower case letters, digits and '_', start with a letter and not end "
        "with '_' (the prefix is passed separately), e.g. 'adapterlab_shira'"
    )
    assert "adapterlab_nl\n" not in peft_compat.registered_tuners()


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("full-match") / "a", seed=0)


def test_server_adapter_name_with_a_trailing_newline_is_refused(lora):
    server = AdapterServer(base_model(), tokenizer=tiny_tokenizer())
    for bad in ("a\n", "a\nb", "\na"):
        with pytest.raises(ValueError) as err:
            server.register(bad, lora)
        assert str(err.value) == f"adapter name {bad!r} {ADAPTER_RULE}"
    assert [r["name"] for r in server.adapters()] == []
    server.register("a", lora)  # the same name without the newline is fine
    assert [r["name"] for r in server.adapters()] == ["a"]


def test_http_load_with_a_trailing_newline_is_a_400(lora):
    server = AdapterServer(base_model(), tokenizer=tiny_tokenizer())
    app_ = ServingHTTP(server, port=0).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", app_.port, timeout=30)
        conn.request("POST", "/v1/adapters/load", json.dumps({"name": "a\n", "source": str(lora)}))
        resp = conn.getresponse()
        body = json.loads(resp.read())
        conn.close()
    finally:
        app_.shutdown()
    assert resp.status == 400
    assert body["error"]["message"] == f"adapter name 'a\\n' {ADAPTER_RULE}"
    assert server.adapters() == []


def test_serve_adapter_option_with_a_trailing_newline_is_one_line(lora, tmp_path):
    model_dir = tmp_path / "model"
    base_model().save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    result = CliRunner().invoke(app, ["serve", "--model", str(model_dir), "--adapter", f"a\n={lora}", "--check"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [f"error: adapter name 'a\\n' {ADAPTER_RULE}"]
