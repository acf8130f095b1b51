"""``adapterlab train`` under a real ``torchrun --nproc_per_node 2 -m adapterlab train`` (gloo, CPU, one thread each).

The launch trains a LoRA on the tiny base with 2 sequences per process (global batch 4) and puts it in a
registry; the test compares it with one process and a batch of 4 in this process. Every file-system write
of the two ranks under the run's folder is recorded by an audit hook (tests/distributed/_audit/
sitecustomize.py): rank 0 must have written the output and the hub entry, rank 1 nothing at all. A second
launch makes rank 0's write fail for real (ENOSPC while it writes train_report.json in the staging folder):
both ranks stop, nothing lands at the output or in the hub, rank 1 prints no traceback.

Each launch takes about 20 s on 2 idle cores (imports and the tiny run; much longer on a loaded machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from adapterlab.io import load_tensors
from tests.recipe._helpers import tiny_base, train_dict, write_yaml
from tests.tolerances import TOL

REPO = Path(__file__).resolve().parents[2]
AUDIT = Path(__file__).resolve().parent / "_audit"
PER_RANK = 2  # global batch 4 = the one-process batch


def _recipe(run: Path, base: Path) -> Path:
    d = train_dict(base, run / "out", put={"name": "launch-a", "root": str(run / "hub")})
    d["trainer"].update({"max_steps": 3, "per_device_train_batch_size": 4, "lr_scheduler_type": "constant"})
    d["eval"] = {"n": 16, "zero_shot": True, "batch_size": 4}
    return write_yaml(run / "r.yaml", d)


def _launch(run: Path, *extra: str, fail: str = "") -> subprocess.CompletedProcess[str]:
    audit = run / "audit"
    audit.mkdir()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONPATH": os.pathsep.join([str(AUDIT), str(REPO)]),
        "ADAPTERLAB_AUDIT_DIR": str(audit),
        "ADAPTERLAB_AUDIT_WATCH": str(run),
        "ADAPTERLAB_AUDIT_FAIL": fail,
    }
    env.pop("ADAPTERLAB_HUB", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--log-dir", str(run.parent / f"{run.name}-logs"), "--redirects", "3"]  # each rank's stdout / stderr
    cmd += [
        "-m",
        "adapterlab",
        "train",
        str(run / "r.yaml"),
        "--set",
        f"trainer.per_device_train_batch_size={PER_RANK}",
    ]
    return subprocess.run([*cmd, *extra], cwd=run, env=env, capture_output=True, text=True, timeout=600)


def _writes(run: Path, rank: int) -> list[dict[str, Any]]:
    log = run / "audit" / f"rank{rank}.jsonl"
    assert log.is_file(), f"the audit hook did not run on rank {rank}"
    return [json.loads(line) for line in log.read_text().splitlines()]


def _console(run: Path, rank: int) -> tuple[str, str]:
    """What rank ``rank`` printed: (stdout, stderr), from torchrun's per-rank files."""
    (out,) = (run.parent / f"{run.name}-logs").glob(f"*/attempt_0/{rank}/stdout.log")
    return out.read_text(), (out.parent / "stderr.log").read_text()


def _under(events: list[dict[str, Any]], folder: Path) -> list[dict[str, Any]]:
    return [e for e in events if any(p == str(folder) or p.startswith(str(folder) + os.sep) for p in e["paths"])]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("launch-base") / "tiny")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory, base: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    run = tmp_path_factory.mktemp("launch")
    _recipe(run, base)
    return run, _launch(run)


@pytest.fixture()
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    yield
    torch.set_num_threads(n)


@pytest.mark.assets
def test_two_processes_train_like_one_and_only_rank0_writes(launched, base, tmp_path, one_thread):
    from adapterlab.recipe import load_train_recipe, train_adapter
    from adapterlab.registry import AdapterRegistry

    run, proc = launched
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = run / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_report.json"} <= {p.name for p in out.iterdir()}
    assert not [p.name for p in run.iterdir() if ".stage-" in p.name or ".old-" in p.name], "staging left behind"

    # the hub entry, written once (two writers would put two objects: the reports differ in their times)
    reg = AdapterRegistry(run / "hub")
    objects = [p for p in (run / "hub" / "objects").iterdir() if p.is_dir()]
    assert len(objects) == 1, objects
    digest = reg.resolve("launch-a")
    assert objects[0].name == digest
    report = json.loads((out / "train_report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 3
    assert reg.show("launch-a")["provenance"]["processes"] == 2

    # who wrote: rank 0 the output folder (staged, renamed in) and the hub; rank 1 nothing under the run folder
    rank0, rank1 = _writes(run, 0), _writes(run, 1)
    assert rank1 == [], f"rank 1 wrote: {rank1[:5]}"
    renames = [e for e in _under(rank0, run) if e["event"] == "os.rename" and e["paths"][-1] == str(out)]
    assert len(renames) == 1, "the output folder did not land once, by rename, on rank 0"
    assert _under(rank0, run / "hub"), "rank 0 did not write the hub entry"
    out0, _ = _console(run, 0)
    out1, err1 = _console(run, 1)
    assert "wrote " in out0 and out1 == "", out1  # only rank 0 prints; rank 1 only warnings, prefixed
    assert "Traceback" not in err1 and "INFO" not in err1, err1[-2000:]

    # one process, batch 4 (the same global batch), the same recipe otherwise
    cfg = load_train_recipe(str(run / "r.yaml"), [f"output={tmp_path / 'one'}"])
    single = train_adapter(cfg, put=False)
    saved, ref = (
        load_tensors(out / "adapter_model.safetensors"),
        load_tensors(tmp_path / "one" / "adapter_model.safetensors"),
    )
    assert set(saved) == set(ref) and saved
    for key, value in saved.items():
        torch.testing.assert_close(value, ref[key], **TOL[torch.float32], msg=lambda m, k=key: f"{k}: {m}")
    assert any("lora_B" in k and value.abs().max() > 0 for k, value in saved.items()), "nothing trained"
    losses = [h["loss"] for h in report["log_history"] if "loss" in h]
    ref_losses = [h["loss"] for h in single.log_history if "loss" in h]
    assert len(losses) == len(ref_losses) == 3
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), **TOL[torch.float32])
    assert report["accuracy"] == single.accuracy and report["zero_shot"] == single.zero_shot


@pytest.mark.assets
def test_a_failed_write_on_rank0_stops_both_and_leaves_nothing(tmp_path, base):
    _recipe(tmp_path, base)
    proc = _launch(tmp_path, "--set", "eval=null", fail="0:train_report.json")
    assert proc.returncode != 0, proc.stdout[-2000:]
    out0, err0 = _console(tmp_path, 0)
    out1, err1 = _console(tmp_path, 1)
    assert "No space left on device (injected by the test)" in err0, err0[-4000:]
    assert not (tmp_path / "out").exists(), "a half-written output landed"
    assert not [p.name for p in tmp_path.iterdir() if ".stage-" in p.name], "staging left behind"
    assert not (tmp_path / "hub" / "refs").is_dir() or not list((tmp_path / "hub" / "refs").iterdir())
    assert _writes(tmp_path, 1) == [], "rank 1 wrote"
    assert _under(_writes(tmp_path, 0), tmp_path), "rank 0 never started writing (the fault was not reached)"
    assert out1 == "" and "Traceback" not in err1, err1[-3000:]  # rank 1 stops quietly: rank 0 said why
