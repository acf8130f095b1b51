"""Issue 15, class 9 (merge part): an adapter holding NaN or Inf is refused when its tensor is read,
with one line naming the adapter and the tensor, by every merge method and the merge CLI (exit 2,
nothing written)."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from adapterlab.io import load_tensors, save_tensors
from adapterlab.merging import merge_adapters
from tests.merging._helpers import make_lora_dirs


@pytest.fixture(params=["nan", "inf"])
def poisoned(request, tmp_path):
    dirs = make_lora_dirs(tmp_path / "in", 2, r=4)
    f = dirs[1] / "adapter_model.safetensors"
    tensors = load_tensors(f)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key][0, 0] = float(request.param)
    save_tensors(f, tensors, allow_nonfinite=True)  # a poisoned input on purpose
    return dirs, key


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "rmm"])
def test_every_method_refuses_a_non_finite_adapter(poisoned, method):
    dirs, key = poisoned
    with pytest.raises(ValueError) as exc:
        merge_adapters(dirs, method, **({"K": 1} if method == "rmm" else {}))
    msg = str(exc.value)
    assert "\n" not in msg
    assert re.fullmatch(
        rf"adapters\[1\] 'task1': tensor {re.escape(repr(key))} holds NaN or Inf; nothing was merged or written", msg
    ), msg


def test_merge_cli_refuses_a_non_finite_adapter(poisoned, tmp_path):
    from adapterlab.cli.app import app

    dirs, key = poisoned
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: linear\nadapters: [{dirs[0]}, {dirs[1]}]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["merge", str(cfg), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert (
        f"adapters.1 'task1': tensor {key!r} holds NaN or Inf; nothing was merged or written"
        in result.output.replace("\n", "")
    )
    assert "Traceback" not in result.output
    assert not out.exists()
