"""Every command in README.md's ```bash blocks runs, in README order, in a fresh folder, on a tiny model.

The folder holds what a fresh clone has that the commands read (``recipes/``, ``hub/``), so each
command sees only what the earlier README commands wrote. ``ADAPTERLAB_CACHE`` points at a temporary
cache whose ``default`` model is a random 2-layer Llama (width 64, character-level tokenizer) built
from a config, next to a copy of the packaged task data; nothing touches the real cache or network.

Every ``adapterlab`` command runs through the console script's entry point
(``adapterlab.cli.app:main``) in one worker process, so torch and transformers are imported once;
``adapterlab serve`` runs as its own process and the ``curl`` lines run for real against it (the
port is the one the server picked). Long commands get options appended that make them cheap on the
tiny model (``CHEAP``: the last value of an option wins, ``--set`` overrides apply in order).
Commands that cannot run here are listed in ``NOT_RUN`` with the reason. A README command in
neither table fails the test, so a new block cannot slip by unchecked.

The demo runs its first two stages here; the whole tour on a tiny model, through the CLI too, is
tests/test_demo.py. About 40-60 s on 2 idle cores (two Python start-ups, the corpus tokenised by the
commands that calibrate or score perplexity).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
#: What a fresh clone holds that the README's commands read (copied into the working folder).
CLONE_PARTS = ("recipes", "hub")

#: Commands that do not run here, with the reason (exact text after comments are stripped).
NOT_RUN = {
    "pip install torch==2.13.0": "installs packages; CI's set-up runs it (.ci/run)",
    "pip install -e .": "installs packages; CI's set-up runs it (.ci/run)",
    "pip install -e .[dev]": "installs packages; CI's set-up runs it (.ci/run)",
    "ADAPTERLAB_REQUIRE_ASSETS=1 python -m pytest -q": "the test suite itself (.ci/run runs this line verbatim)",
    "torchrun --nproc_per_node 2 -m adapterlab train recipes/train/sentiment_lora.yaml --no-put": (
        "two processes; tests/distributed/test_train_launch.py launches adapterlab train with a real torchrun"
    ),
    "accelerate launch --multi_gpu --num_processes 2 -m adapterlab train recipes/train/sentiment_lora.yaml "
    "--no-put": "two processes; the torchrun launch in tests/distributed/test_train_launch.py covers the same path",
}

_TRAIN_CHEAP = ["--set", "trainer.max_steps=2", "--set", "eval.n=8", "--set", "data.max_examples=16"]
#: Every command that runs, with the options appended to make it cheap ([] = exactly as written).
CHEAP: dict[str, list[str]] = {
    "adapterlab assets": [],
    "adapterlab demo": ["--stages", "dense,prune", "--methods", "magnitude", "--eval-windows", "1", "--task-n", "4"],
    "adapterlab prune --method sparsegpt --pattern 2:4 --nsamples 64 --seqlen 512 -o out/smol-2of4": [
        "--nsamples",
        "2",
        "--seqlen",
        "64",
    ],
    "adapterlab eval --model out/smol-2of4 --task sentiment --n 300": [
        "--n",
        "8",
        "--max-windows",
        "1",
        "--seqlen",
        "64",
    ],
    "adapterlab train recipes/train/sentiment_lora.yaml --set trainer.max_steps=30 --no-put": _TRAIN_CHEAP,
    "adapterlab train recipes/train/domain_lora.yaml --set trainer.max_steps=30 --no-put": _TRAIN_CHEAP,
    "adapterlab train recipes/train/compare_lora.yaml --set trainer.max_steps=30 --no-put": _TRAIN_CHEAP,
    "adapterlab train recipes/train/compare_lori.yaml --dry-run": [],
    "adapterlab run recipes/pipelines/sparse_multitask.yaml --dry-run": [],
    "adapterlab run recipes/prune/wanda_50.yaml": ["--set", "prune.nsamples=2", "--set", "prune.seqlen=64"],
    "adapterlab merge recipes/merge/ties.yaml -o out/ties --dry-run": [],
    "adapterlab merge recipes/merge/ties.yaml -o out/ties --set params.density=0.3": [],
    "adapterlab merge recipes/merge/dare_ties_full.yaml -o out/dare-ties-model": [],
    "adapterlab extract --base default --tuned out/dare-ties-model --energy 0.9 -o out/extracted": [],
    "adapterlab compress out/adapters/sentiment-lora out/adapters/domain-lora out/adapters/compare-lora "
    "--rank 12 -o out/bundle --put bundle": [],
    "adapterlab hub put out/adapters/sentiment-lora --name sentiment --base default --kind trained": [],
    "adapterlab hub ls": [],
    "adapterlab hub show sentiment": [],
    "adapterlab hub verify": [],
    "adapterlab merge recipes/merge/ties.yaml -o out/merged --put merged": [],
    "adapterlab hub rm merged": [],
    "adapterlab hub gc": [],
    # serve: --port 8000 becomes --port 0 (any free port) --port-file; the curl lines use that port
    "adapterlab serve --adapter sst=out/adapters/sentiment-lora --bundle hub:bundle --hub hub --capacity 32 "
    "--port 8000": [],
    "curl -s localhost:8000/v1/completions -d "
    """'{"prompt": "Great movie!", "adapter": "sst", "max_tokens": 8}'""": [],
    "curl -s localhost:8000/v1/adapters": [],
    "curl -s localhost:8000/v1/adapters/load -d "
    """'{"name": "sentiment", "source": "hub:sentiment", "pin": true}'""": [],
}

#: Runs in the worker: build the tiny cache (first call), then each command through the console script's
#: entry point, its stdout/stderr in a log file of its own; results (exit code, seconds) as JSON.
_WORKER = r"""
import contextlib, json, os, shutil, sys, time
from pathlib import Path
plan = json.loads(Path(sys.argv[1]).read_text())
setup = plan["setup"]
if setup:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from adapterlab.models import DEFAULT_MODEL_ID, tiny_tokenizer
    cache = Path(setup["cache"])
    shutil.copytree(Path(setup["real_cache"]) / "data", cache / "data")
    target = cache / "models" / DEFAULT_MODEL_ID
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(target)
    tiny_tokenizer().save_pretrained(target)
from adapterlab.cli.app import main
results = []
for i, argv in enumerate(plan["commands"]):
    log = Path(plan["logs"]) / f"{plan['first'] + i}.log"
    t, c = time.perf_counter(), time.process_time()
    with open(log, "w") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        sys.argv = ["adapterlab", *argv]
        try:
            main()
            rc = 0
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    results.append({"rc": rc, "seconds": round(time.perf_counter() - t, 2), "cpu": round(time.process_time() - c, 2)})
    if rc != 0:
        break
Path(plan["results"]).write_text(json.dumps(results))
"""


def _key(words: list[str]) -> str:
    return " ".join(shlex.quote(w) if (" " in w or '"' in w) else w for w in words)


def _split(text: str) -> list[list[str]]:
    """Commands of the bash blocks as argument lists, split at ``&&`` / ``;``, comments dropped."""
    out: list[list[str]] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.splitlines():
            words: list[str] = []
            for tok in shlex.split(line.replace("&&", " ; ").replace(";", " ; "), comments=True):
                if tok == ";":
                    if words:
                        out.append(words)
                    words = []
                else:
                    words.append(tok)
            if words:
                out.append(words)
    return out


def test_readme_commands_are_split_as_the_shell_would():
    text = "```bash\na --x 1 && b 'c d' ; e  # comment && f\n```\n```python\nnot_bash\n```\n"
    assert _split(text) == [["a", "--x", "1"], ["b", "c d"], ["e"]]
    assert _key(["curl", "-d", '{"a": 1}']) == """curl -d '{"a": 1}'"""


def test_every_readme_command_is_run_or_listed_with_a_reason():
    keys = [_key(words) for words in _split(README.read_text(encoding="utf-8"))]
    unknown = [k for k in keys if k not in CHEAP and k not in NOT_RUN]
    assert not unknown, (
        "README.md has commands this test does not know; add each to CHEAP (how to run it cheaply) "
        f"or NOT_RUN (why it cannot run here): {unknown}"
    )
    stale = [k for k in list(CHEAP) + list(NOT_RUN) if k not in keys]
    assert not stale, f"CHEAP / NOT_RUN list commands README.md no longer has: {stale}"


def _run_worker(commands: list[list[str]], first: int, env: dict, cwd: Path, logs: Path, setup: dict | None) -> None:
    plan_file = logs / f"plan-{first}.json"
    results_file = logs / f"results-{first}.json"
    plan = {"commands": commands, "first": first, "logs": str(logs), "results": str(results_file), "setup": setup}
    plan_file.write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER, str(plan_file)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads(results_file.read_text())
    for i, res in enumerate(results):
        if res["rc"] != 0:
            log = (logs / f"{first + i}.log").read_text(errors="replace")
            pytest.fail(f"`adapterlab {' '.join(commands[i])}` exited {res['rc']}:\n{log[-4000:]}")
    assert len(results) == len(commands)


def _curl(argv: list[str], key: str) -> str:
    """Run a README ``curl -s URL [-d JSON]`` line: with curl where it is installed, else the same request
    through urllib (a POST when ``-d`` is given, as curl does)."""
    if shutil.which("curl"):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{key}: curl exited {proc.returncode}: {proc.stderr}"
        return proc.stdout
    url = next(a for a in argv[1:] if "/v1/" in a)
    data = argv[argv.index("-d") + 1].encode() if "-d" in argv else None
    req = urllib.request.Request(url if "://" in url else "http://" + url, data=data)
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read().decode()


def _wait_for_port(proc: subprocess.Popen, port_file: Path, log: Path, timeout: float = 180.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"adapterlab serve exited {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        text = port_file.read_text().strip() if port_file.is_file() else ""
        if text:
            port = int(text)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return port
            except OSError:
                pass
        time.sleep(0.3)
    pytest.fail(f"adapterlab serve did not come up in {timeout:.0f} s:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.mark.assets
def test_readme_commands_run_in_order_in_a_fresh_folder(tmp_path):
    from adapterlab._paths import cache_dir

    if not (cache_dir() / "data" / "vader").is_dir():
        message = "the packaged task data is missing: run `adapterlab assets`"
        if os.environ.get("ADAPTERLAB_REQUIRE_ASSETS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    work, logs, cache = tmp_path / "clone", tmp_path / "logs", tmp_path / "cache"
    work.mkdir()
    logs.mkdir()
    for part in CLONE_PARTS:
        shutil.copytree(REPO / part, work / part)
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERLAB_HUB",)}
    env.update(
        ADAPTERLAB_CACHE=str(cache),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        COLUMNS="120",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        TOKENIZERS_PARALLELISM="false",
    )
    setup: dict | None = {"cache": str(cache), "real_cache": str(cache_dir())}
    exe = shutil.which("adapterlab")
    serve_cmd = [sys.executable, "-c", "from adapterlab.cli.app import main; main()"] if exe is None else [exe]

    pending: list[list[str]] = []
    first = 0
    server: subprocess.Popen | None = None
    port: int | None = None

    def flush() -> None:
        nonlocal pending, first, setup
        if pending or setup:
            _run_worker(pending, first, env, work, logs, setup)
            setup = None
        first += len(pending)
        pending = []

    try:
        for words in _split(README.read_text(encoding="utf-8")):
            key = _key(words)
            if key in NOT_RUN:
                continue
            argv = words + CHEAP[key]
            if argv[0] == "adapterlab" and argv[1] != "serve":
                pending.append(argv[1:])
            elif argv[0] == "adapterlab":  # serve: a real process on a free port
                flush()
                i = argv.index("--port")
                port_file = logs / "serve.port"
                argv = argv[:i] + ["--port", "0", "--port-file", str(port_file)] + argv[i + 2 :]
                log = logs / "serve.log"
                with open(log, "w") as fh:
                    server = subprocess.Popen(serve_cmd + argv[1:], cwd=work, env=env, stdout=fh, stderr=fh)
                port = _wait_for_port(server, port_file, log)
            elif argv[0] == "curl":
                flush()
                assert port is not None, "a curl line comes before `adapterlab serve`"
                argv = [re.sub(r"localhost:8000", f"127.0.0.1:{port}", a) for a in argv]
                body = json.loads(_curl(argv, key))
                assert "error" not in body, f"{key}: the server answered {body}"
            else:
                pytest.fail(f"no runner for {key!r}")
        flush()
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    # what the chain wrote (each from the command that the README says writes it)
    for path in (
        "out/smol-2of4/masks.safetensors",
        "out/ties/adapter_config.json",
        "out/extracted/adapter_config.json",
    ):
        assert (work / path).is_file(), path
    assert (work / "out/adapters/compare-lora/adapter_config.json").is_file()
