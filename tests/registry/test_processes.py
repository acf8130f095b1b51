"""Registry writes across processes: a put killed mid-write, two puts of one adapter at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapterlab.registry import AdapterRegistry
from tests.registry._helpers import lora_dir

REPO = Path(__file__).resolve().parents[2]

# Waits for a "go" file (so several writers start together), then puts SRC as NAME. The package
# __init__ (every tuner, transformers, peft) is skipped so that the interpreters start in seconds
# on a loaded machine; the registry modules themselves are the real ones.
SCRIPT = """
import sys, time, types
from pathlib import Path
root, src, name, ready, go, repo = sys.argv[1:7]
pkg = types.ModuleType("adapterlab")
pkg.__path__ = [str(Path(repo) / "adapterlab")]
pkg.__version__ = "test"
sys.modules["adapterlab"] = pkg
from adapterlab.registry import AdapterRegistry
Path(ready).touch()
while not Path(go).exists():
    time.sleep(0.02)
print(AdapterRegistry(root).put(src, name))
"""


def _spawn(tmp: Path, root: Path, src: Path, name: str, fault: str | None) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("ADAPTERLAB_HUB_FAULT", None)
    if fault:
        env["ADAPTERLAB_HUB_FAULT"] = fault
    ready = tmp / f"ready-{name}"
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(root), str(src), name, str(ready), str(tmp / "go"), str(REPO)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, ready


def _wait(pred, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return lora_dir(tmp_path_factory.mktemp("proc") / "task", seed=3)


def test_processes(adapter: Path, tmp_path: Path) -> None:
    """Both scenarios in one test so the three interpreters start in parallel (imports dominate)."""
    kill_root, race_root = tmp_path / "hub-kill", tmp_path / "hub-race"
    victim, v_ready = _spawn(tmp_path, kill_root, adapter, "victim", "sleep:60")
    racers = [_spawn(tmp_path, race_root, adapter, f"r{i}", "sleep:0.3") for i in range(2)]
    try:
        _wait(lambda: v_ready.exists() and all(r.exists() for _, r in racers))
        (tmp_path / "go").touch()

        # --- a put killed mid-write leaves no half object visible ------------------------------
        tmp_dir = kill_root / "tmp"
        _wait(lambda: tmp_dir.is_dir() and any(any(s.iterdir()) for s in tmp_dir.iterdir()))
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        reg = AdapterRegistry(kill_root)
        assert list((kill_root / "objects").iterdir()) == []
        assert reg.ls(all=True) == [] and reg.verify() == []
        with pytest.raises(KeyError):
            reg.get("victim")
        assert len(list(tmp_dir.iterdir())) == 1  # the dead writer's staging folder ...
        assert reg.gc() == [] and list(tmp_dir.iterdir()) == []  # ... which gc removes
        d = reg.put(adapter, "victim")
        assert reg.get("victim") == kill_root / "objects" / d

        # --- two processes putting the same adapter at once give one object ----------------------
        outs = []
        for proc, _ in racers:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-2000:]
            outs.append(out.strip().splitlines()[-1])
        race = AdapterRegistry(race_root)
        assert outs[0] == outs[1] == d
        assert [p.name for p in (race_root / "objects").iterdir()] == [d]
        assert race.resolve("r0") == race.resolve("r1") == d
        assert race.verify() == [] and list((race_root / "tmp").iterdir()) == []
    finally:
        for proc in [victim] + [p for p, _ in racers]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
