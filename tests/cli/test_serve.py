"""`adapterlab serve`: bad input exits 2 with one line; --check loads; a real process answers HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from adapterlab.cli.app import app
from tests.serving._helpers import base_model, make_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from adapterlab.models import tiny_tokenizer

    root = tmp_path_factory.mktemp("serve_cli")
    model_dir = root / "model"
    base_model().save_pretrained(str(model_dir))
    tiny_tokenizer().save_pretrained(str(model_dir))
    return model_dir, make_lora(root / "a", seed=0)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--adapter", "noequals"], "write NAME=FOLDER"),
        (["--adapter", "a=/not/a/folder"], "not a PEFT adapter folder"),
        (["--capacity", "0"], "--capacity must be >= 1"),
        (["--host", "0.0.0.0"], "not a loopback address"),
        (["--pin", "ghost"], "unknown adapter 'ghost'"),
    ],
)
def test_bad_input_exit_2(assets, extra, needle):
    model_dir, _ = assets
    res = runner.invoke(app, ["serve", "--model", str(model_dir), "--check", *extra])
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert sum(line.startswith("error:") for line in res.output.splitlines()) == 1


def test_missing_model_exit_2():
    res = runner.invoke(app, ["serve", "--model", "/definitely/not/here", "--check"])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_check_loads_everything(assets):
    model_dir, a = assets
    res = runner.invoke(app, ["serve", "--model", str(model_dir), "--adapter", f"a={a}", "--pin", "a", "--check"])
    assert res.exit_code == 0, res.output
    assert "check passed" in res.output


def test_serve_process_round_trip(assets, tmp_path):
    model_dir, a = assets
    port_file = tmp_path / "port"
    cmd = [
        sys.executable,
        "-c",
        "from adapterlab.cli.app import main; main()",
        "serve",
        "--model",
        str(model_dir),
        "--adapter",
        f"a={a}",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--max-batch",
        "4",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 300  # generous: a loaded 2-core machine starts python slowly
        while time.monotonic() < deadline:
            if port_file.exists() and port_file.read_text().strip():
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.1)
        port = int(port_file.read_text())
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            method="POST",
            data=json.dumps({"prompt": "hi", "adapter": "a", "max_tokens": 3}).encode(),
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = json.loads(resp.read())
        assert body["adapter"] == "a" and len(body["choices"][0]["tokens"]) <= 3
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/adapters", timeout=60) as resp:
            assert [r["name"] for r in json.loads(resp.read())["adapters"]] == ["a"]
        # the real openai client against the real `adapterlab serve` process
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["base", "a"]
        got = client.completions.create(model="a", prompt="hi", max_tokens=3)
        assert got.choices[0].model_extra["tokens"] == body["choices"][0]["tokens"]
        streamed = client.completions.create(model="a", prompt="hi", max_tokens=3, stream=True)
        assert "".join(c.choices[0].text for c in streamed if c.choices) == got.choices[0].text
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="ghost", prompt="hi", max_tokens=3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
