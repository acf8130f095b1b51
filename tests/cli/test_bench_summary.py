"""`adapterlab bench --summary` shows each result's headline values (oracle: the values written here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from adapterlab.cli import _common
from adapterlab.cli.app import app
from adapterlab.cli.bench import HEADLINE_LIMIT, headline_values

runner = CliRunner()

#: A result shaped like bench/perp.py's: a goal, labelled rows, raw samples, machine and settings.
PERP_LIKE = {
    "benchmark": "perp",
    "command": "python bench/perp.py --quick",
    "settings": {"nsamples": 128, "eval_windows": 40},
    "rows": [
        {"pattern": None, "arm": "dense", "ppl": 31.324519, "trainable": 0},
        {"pattern": "unstructured", "arm": "pruned", "ppl": 68.920785, "seconds": 108.05},
        {"pattern": "unstructured", "arm": "perp", "ppl": 51.992413, "gap_closed": 0.4502673},
    ],
    "wall_seconds": 2474.6498,
    "goal": {"gap_closed_unstructured": 0.4502673, "target": 0.6, "met": False},
    "times_s": [9.1, 9.3, 9.2],
    "machine": {"cpu_count": 97531, "loadavg_at_start": [0.5, 0.4, 0.3], "versions": {"torch": "2.13.0"}},
}


def test_headline_values_of_a_known_result() -> None:
    assert headline_values(PERP_LIKE) == [
        ("goal.gap_closed_unstructured", "0.4503"),
        ("goal.target", "0.6"),
        ("goal.met", "false"),
        ("rows[dense].ppl", "31.32"),
        ("rows[unstructured/pruned].ppl", "68.92"),
        ("rows[unstructured/perp].ppl", "51.99"),
        ("rows[unstructured/perp].gap_closed", "0.4503"),
        ("wall_seconds", "2475"),
    ]


def test_an_explicit_headline_object_is_the_whole_answer() -> None:
    data = {
        "headline": {"speedup_vs_peft": 2.62, "zeros_kept": True, "per_task": {"sentiment": 0.925}},
        "rows": [{"impl": "a", "ratio": 9.0}],
        "derived": {"gain_ratio": 0.5},
    }
    assert headline_values(data) == [
        ("speedup_vs_peft", "2.62"),
        ("zeros_kept", "true"),
        ("per_task.sentiment", "0.925"),
    ]
    # rows without a field that tells them apart are numbered; integers are printed whole
    rows = {"rows": [{"acc": 0.5, "n": 3}, {"acc": 0.75, "n": 3}], "median_s": {"peft": 12}}
    assert headline_values(rows) == [("rows[0].acc", "0.5"), ("rows[1].acc", "0.75"), ("median_s.peft", "12")]
    assert headline_values([1, 2]) == [] and headline_values({"machine": {"wall_s": 1.0}}) == []


def _bench(tmp_path: Path, results: dict[str, object]) -> Path:
    bench = tmp_path / "bench"
    (bench / "results").mkdir(parents=True)
    (bench / "_common.py").write_text("")
    for name, data in results.items():
        text = data if isinstance(data, str) else json.dumps(data)
        (bench / "results" / f"{name}.json").write_text(text)
    return bench


def _cells(output: str, column: int) -> str:
    """The text of one table column, the cells' lines joined with spaces."""
    return " ".join(
        line.split("│")[column].strip() for line in output.splitlines() if line.startswith("│") and "│" in line[1:]
    )


def test_summary_table_shows_the_values_at_80_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    many = {"derived": {f"ratio_{i}": i / 8 for i in range(HEADLINE_LIMIT + 3)}}
    bench = _bench(
        tmp_path,
        {
            "perp": PERP_LIKE,
            "many": many,
            "nothing": {"machine": {"cpu_count": 2}},
            "broken": "{not json",
        },
    )
    monkeypatch.setattr(_common.console, "_width", 80)
    res = runner.invoke(app, ["bench", "--summary", "--dir", str(bench)])
    assert res.exit_code == 0, res.output
    assert "…" not in res.output and max(len(line) for line in res.output.splitlines()) <= 80
    text = " ".join(res.output.split())
    for _key, value in headline_values(PERP_LIKE):
        assert value in text
    assert "goal.met false" in text and "31.32" in text and "68.92" in text and "0.4503" in text
    assert "97531" not in text and "9.3" not in text  # machine facts and raw samples are not headline values
    assert f"ratio_{HEADLINE_LIMIT - 1} {(HEADLINE_LIMIT - 1) / 8:.4g}" in text
    assert f"ratio_{HEADLINE_LIMIT}" not in text and "+3 more in the JSON" in text
    assert "no headline values" in text and "unreadable" in text
    made_by = _cells(res.output, 1)
    assert "perp.json" in made_by and "python bench/perp.py --quick" in made_by and "torch 2.13.0" in made_by
