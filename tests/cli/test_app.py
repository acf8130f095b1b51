from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from adapterlab.cli.app import app

runner = CliRunner()


def test_help_lists_the_verbs():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for verb in ("assets", "demo", "prune", "eval"):
        assert verb in res.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["demo", "--methods", "bogus"], "unknown pruning method 'bogus'"),
        (["demo", "--sparsity", "1.5"], "sparsity"),
        (["demo", "--pattern", "5:4"], "5:4"),
        (["eval", "--corpus", "nope"], "unknown corpus 'nope'"),
        (["eval", "--task", "nope"], "unknown task 'nope'"),
        (["eval", "--bits", "3"], "--bits must be 4 or 8"),
        (["eval", "--model", "/definitely/not/here"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    out = tmp_path / "out"
    res = runner.invoke(app, args + (["-o", str(out)] if args[0] == "demo" else []))
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert res.output.strip().count("\n") == 0 or "error:" in res.output.splitlines()[0]
    assert not out.exists()


@pytest.mark.assets
def test_eval_cli_on_the_embedded_model(tmp_path):
    out = tmp_path / "eval.json"
    res = runner.invoke(
        app, ["eval", "--task", "sentiment", "--n", "8", "--max-windows", "1", "--seqlen", "128", "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert 1.0 < data["perplexity"]["wiki"] < 200.0
    assert data["tasks"]["sentiment"]["n"] == 8


@pytest.mark.assets
def test_demo_runs_end_to_end_small(tmp_path):
    """The main job on the embedded model with tiny settings: dense row + a magnitude-pruned row."""
    res = runner.invoke(
        app,
        [
            "demo",
            "--stages",
            "dense,prune",
            "--methods",
            "magnitude",
            "--eval-windows",
            "1",
            "--task-n",
            "8",
            "-o",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "magnitude 50%"]
    assert rows[1]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert rows[1]["perplexity"] > rows[0]["perplexity"]  # pruning half the weights hurts


#: The verbs DESIGN.md §2 promises (``hub`` with its sub-commands); the fresh-process help check
#: below must reach each of them.
VERBS = {"assets", "demo", "prune", "eval", "train", "merge", "extract", "compress", "hub", "serve", "run", "bench"}
HUB_VERBS = {"put", "get", "resolve", "ls", "show", "verify", "tag", "rm", "gc"}

_HELP_SCRIPT = """
import json, sys
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "trl")
sys.argv = ["adapterlab", "--help"]
from adapterlab.cli.app import app, main   # what the console script imports
try:
    main()
except SystemExit as exc:
    top_code = exc.code
heavy = {"--help": sorted(m for m in HEAVY if m in sys.modules)}
from typer.main import get_command
from typer.testing import CliRunner
runner = CliRunner()
group = get_command(app)
invoked, bad = [], {}
for name, cmd in sorted(group.commands.items()):
    argvs = [[name, "--help"]] + [[name, sub, "--help"] for sub in sorted(getattr(cmd, "commands", {}))]
    for argv in argvs:
        res = runner.invoke(app, argv)
        key = " ".join(argv[:-1])
        invoked.append(key)
        if res.exit_code != 0 or "Usage" not in res.output:
            bad[key] = [res.exit_code, res.output[-300:]]
        heavy[key] = sorted(m for m in HEAVY if m in sys.modules)
print(json.dumps({"top_code": top_code, "invoked": invoked, "bad": bad, "heavy": heavy}))
"""


def test_help_of_every_verb_imports_no_heavy_library():
    """`adapterlab --help` and every `VERB --help` (hub's sub-commands too) in one fresh interpreter:
    torch, transformers, peft, bitsandbytes, datasets and trl stay unimported (they load inside the
    commands that need them, which is what makes `--help` fast)."""
    from tests.test_lazy_import import last_json, run_fresh

    got = last_json(run_fresh(_HELP_SCRIPT))
    assert got["top_code"] == 0
    assert got["bad"] == {}
    assert VERBS | {f"hub {v}" for v in HUB_VERBS} <= set(got["invoked"])
    assert {k: v for k, v in got["heavy"].items() if v} == {}


def test_a_command_that_imports_bitsandbytes_prints_no_third_party_noise(tmp_path):
    """A real `adapterlab merge` on tiny LoRA adapters (it imports peft, hence bitsandbytes) through the
    console-script entry point: no bitsandbytes `kernels-community` line, no `is_gradient_checkpointing`
    FutureWarning on stderr."""
    import yaml

    from tests.merging._helpers import make_lora_dirs
    from tests.test_lazy_import import last_json, run_fresh

    adapters = make_lora_dirs(tmp_path / "adapters", 2)
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "method": "ties",
                "adapters": [str(p) for p in adapters],
                "params": {"density": 0.5},
                "output": {"rank": 4},
            }
        )
    )
    out = tmp_path / "out"
    proc = run_fresh(
        f"""
        import json, sys
        sys.argv = ["adapterlab", "merge", {str(cfg)!r}, "-o", {str(out)!r}]
        from adapterlab.cli.app import main
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        print(json.dumps({{"code": code, "bnb": "bitsandbytes" in sys.modules}}))
        """
    )
    got = last_json(proc)
    assert got == {"code": 0, "bnb": True}, proc.stderr[-3000:]
    assert (out / "adapter_config.json").is_file()
    assert "kernels-community" not in proc.stderr, proc.stderr[-3000:]
    assert "is_gradient_checkpointing" not in proc.stderr, proc.stderr[-3000:]


def test_fail_prints_brackets_in_messages_verbatim(capsys):
    """A message such as 'must be [r=4, d_in]' or a path with [abc] is not eaten as rich markup."""
    import typer

    from adapterlab.cli._common import fail

    with pytest.raises(typer.Exit) as exc:
        fail("lora_A must be [r=4, d_in]; see /x/[abc]/y")
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert "lora_A must be [r=4, d_in]; see /x/[abc]/y" in err.replace("\n", "")
