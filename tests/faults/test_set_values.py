"""Issue 15, class 7: a ``--set`` value that is not valid (safe) YAML is one line naming the key and
the value, exit code 2, and nothing written, through merge, train and run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterlab.cli.app import app

REPO = Path(__file__).resolve().parents[2]
BAD = [
    ("[", r"expected the node content, but found '<stream end>'"),
    (
        '!!python/object/apply:os.system ["echo pwned"]',
        r"could not determine a constructor for the tag 'tag:yaml\.org,2002:python/object/apply:os\.system'",
    ),
    ("{a: 1", r".*"),
]
VERBS = [
    (["merge", str(REPO / "recipes/merge/ties.yaml"), "-o", "{out}", "--dry-run"], "params.density"),
    (["train", str(REPO / "recipes/train/sentiment_lora.yaml"), "--dry-run"], "trainer.max_steps"),
    (["run", str(REPO / "recipes/pipelines/sparse_multitask.yaml"), "--dry-run"], "steps"),
]


@pytest.mark.parametrize("value,reason", BAD, ids=["open-bracket", "python-tag", "open-brace"])
@pytest.mark.parametrize("argv,key", VERBS, ids=["merge", "train", "run"])
def test_bad_set_value_is_one_line_exit_2_nothing_written(argv, key, value, reason, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = [a.format(out=out) for a in argv] + ["--set", f"{key}={value}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert re.fullmatch(
        rf"error: --set {re.escape(key)}={re.escape(value)}: the value is not valid YAML \({reason}\); quote it "
        rf"to pass a string, e\.g\. {re.escape(key)}='{re.escape(value)}'",
        lines[0],
    ), lines[0]
    assert "Traceback" not in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_quoted_value_is_a_string(tmp_path):
    from adapterlab.config import apply_set

    raw: dict = {}
    apply_set(raw, "output.path='['")
    apply_set(raw, "params.density=0.3")
    assert raw == {"output": {"path": "["}, "params": {"density": 0.3}}
