"""Issue 15, class 8: if ``--dry-run`` passes, the run does not fail on its configuration.

A table of bad values, each refused by the recipe schemas (types, ranges, registry names, output and
registry roots) or by the checks that need no weights (the peft config built on a weightless copy of
the base, the trainer arguments, ``resume``, the base folder), through every entry point: the library
(``load_train_recipe`` + ``check_train_recipe``, ``load_pipeline`` + ``check_pipeline``),
``adapterlab train --dry-run`` and ``adapterlab run --dry-run``. Each refusal is exactly one line
naming the key path, exit code 2, and nothing is written (no output folder, no registry root).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapterlab.cli.app import app
from adapterlab.recipe import check_pipeline, check_train_recipe, load_pipeline, load_train_recipe
from tests.recipe._helpers import tiny_base, train_dict, write_yaml

runner = CliRunner()

NAME_RULE = (
    "is not a valid registry name: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit "
    "(no '/', '@', ':' or spaces)"
)
PICKLE_ONLY = (
    "has no .safetensors weights (it holds 'pytorch_model.bin': pickle is not read); safetensors is required: "
    "re-save the model with save_pretrained(..., safe_serialization=True)"
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny base, a pickle-only copy of it, and a plain file."""
    root = tmp_path_factory.mktemp("dry-run-inputs")
    base = tiny_base(root / "tiny")
    pickled = tiny_base(root / "pickled")
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    (root / "a-file").write_text("not a folder\n")
    return {"base": base, "pickled": pickled, "file": root / "a-file"}


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    node = d
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = copy.deepcopy(value)


# (id, {key path: value}, expected message after "RECIPE: " (train) / "RECIPE: steps.0.train." (run));
# "{file}" is a plain file, "{pickled}" a model folder holding only pytorch_model.bin, "{tmp}" the test's folder.
BAD: list[tuple[str, dict[str, Any], str]] = [
    ("put-name-dotdot", {"put.name": "../../evil"}, f"put.name: name '../../evil' {NAME_RULE}"),
    ("put-name-newline", {"put.name": "evil\n"}, f"put.name: name 'evil\\n' {NAME_RULE}"),
    ("put-name-slash", {"put.name": "a/b"}, f"put.name: name 'a/b' {NAME_RULE}"),
    ("put-tag", {"put.tags": ["ok", "../x"]}, f"put.tags.1: tag '../x' {NAME_RULE}"),
    (
        "put-default-name",
        {"output": "{tmp}/bad name", "put": {}},
        f"put.name: name 'bad name' {NAME_RULE} (the default, the output folder's name; set put.name)",
    ),
    ("put-root-file", {"put.root": "{file}"}, "put.root: registry root '{file}' is a file, not a folder"),
    (
        "put-root-under-file",
        {"put.root": "{file}/hub"},
        "put.root: registry root '{file}/hub' cannot be created: '{file}' is a file, not a folder",
    ),
    ("output-file", {"output": "{file}"}, "output: output '{file}' is a file, not a folder"),
    (
        "output-under-file",
        {"output": "{file}/out"},
        "output: output '{file}/out' cannot be created: '{file}' is a file, not a folder",
    ),
    (
        "prune-output-under-file",
        {"prune": {"method": "magnitude", "output": "{file}/pruned"}},
        "prune.output: output '{file}/pruned' cannot be created: '{file}' is a file, not a folder",
    ),
    (
        "max-steps-ten",
        {"trainer.max_steps": "ten"},
        "trainer.max_steps: Input should be a valid integer, unable to parse string as an integer (got 'ten')",
    ),
    (
        "max-steps-fraction",
        {"trainer.max_steps": 2.5},
        "trainer.max_steps: Input should be a valid integer, got a number with a fractional part (got 2.5)",
    ),
    (
        "learning-rate-fast",
        {"trainer.learning_rate": "fast"},
        "trainer.learning_rate: Input should be a valid number, unable to parse string as a number (got 'fast')",
    ),
    (
        "learning-rate-negative",
        {"trainer.learning_rate": -0.1},
        "trainer.learning_rate: Input should be greater than or equal to 0 (got -0.1)",
    ),
    (
        "batch-size-zero",
        {"trainer.per_device_train_batch_size": 0},
        "trainer.per_device_train_batch_size: Input should be greater than or equal to 1 (got 0)",
    ),
    (
        "seed-negative",
        {"trainer.seed": -1},
        "trainer.seed: Input should be greater than or equal to 0 (got -1)",
    ),
    (
        "scheduler-unknown",
        {"trainer.lr_scheduler_type": "sometimes"},
        "trainer: sometimes is not a valid SchedulerType, please select one of ['linear', 'cosine', "
        "'cosine_with_restarts', 'polynomial', 'constant', 'constant_with_warmup', 'inverse_sqrt', "
        "'reduce_lr_on_plateau', 'cosine_with_min_lr', 'cosine_warmup_with_min_lr', 'warmup_stable_decay', 'greedy']",
    ),
    ("r-negative", {"adapter.params.r": -4}, "adapter.params.r: Input should be greater than or equal to 1 (got -4)"),
    (
        "r-fraction",
        {"adapter.params.r": 4.5},
        "adapter.params.r: Input should be a valid integer, got a number with a fractional part (got 4.5)",
    ),
    (
        "alpha-text",
        {"adapter.params.lora_alpha": "big"},
        "adapter.params.lora_alpha: Input should be a valid integer, unable to parse string as an integer (got 'big')",
    ),
    (
        "dropout-2",
        {"adapter.params.lora_dropout": 2.0},
        "adapter.params.lora_dropout: Input should be less than or equal to 1 (got 2.0)",
    ),
    # refused by peft itself, when the dry run builds the adapter on a weightless copy of the base
    ("bias-unknown", {"adapter.params.bias": "some"}, "adapter.params: Requested bias: some, is not implemented."),
    (
        "init-unknown",
        {"adapter.params.init_lora_weights": "magic"},
        "adapter.params: Unknown initialization init_lora_weights='magic'",
    ),
    (
        "callback-arg-type",
        {
            "adapter.method": "lori",
            "adapter.params": {"target_modules": ["q_proj"]},
            "adapter.callbacks": {"LoriCallback": {"switch_step": "soon"}},
        },
        "adapter.callbacks.LoriCallback.switch_step: Input should be a valid integer, unable to parse string as an "
        "integer (got 'soon')",
    ),
    (
        "resume-missing",
        {"resume": "{tmp}/no-checkpoint"},
        "resume: '{tmp}/no-checkpoint' is not a Trainer checkpoint folder (no trainer_state.json)",
    ),
    (
        "resume-true-without-output-dir",
        {"resume": True},
        "resume: true resumes from the last checkpoint in trainer.output_dir; set trainer.output_dir, or give the "
        "checkpoint folder",
    ),
    (
        "prune-scope",
        {"prune": {"method": "wanda", "scope": "galaxy"}},
        "prune.scope: unknown scope 'galaxy'; choose one of: row",
    ),
    (
        "prune-seqlen",
        {"prune": {"method": "wanda", "seqlen": 4096}},
        "prune.seqlen: 4096 exceeds the base's context length 256",
    ),
    ("base-pickle-only", {"base": "{pickled}"}, "base: model folder '{pickled}' " + PICKLE_ONLY),
]


def _fill(value: Any, subs: dict[str, str]) -> Any:
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_fill(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, subs) for k, v in value.items()}
    return value


def _case(folders: dict[str, Path], tmp_path: Path, changes: dict[str, Any], expected: str):
    subs = {"file": str(folders["file"]), "pickled": str(folders["pickled"]), "tmp": str(tmp_path)}
    recipe = train_dict(folders["base"], tmp_path / "out")
    recipe["put"] = {"name": "fine", "root": str(tmp_path / "hub")}
    for key, value in changes.items():
        _set(recipe, key, _fill(value, subs))
    return recipe, _fill(expected, subs)


def _tree(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")} | {str(r) for r in roots if r.exists()}


def _one_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("changes,expected", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_dry_run_refuses_each_bad_value_with_its_key_path(folders, tmp_path, monkeypatch, changes, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "env-hub"))
    recipe, message = _case(folders, tmp_path, changes, expected)
    train_yaml = write_yaml(tmp_path / "r.yaml", recipe)
    run_yaml = write_yaml(tmp_path / "p.yaml", {"steps": [{"name": "train", "train": recipe}]})
    before = _tree(tmp_path, folders["file"].parent)

    # the library: load + check (the schema's errors name the file, the checks' do not)
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as err:
        check_train_recipe(load_train_recipe(str(train_yaml)))
    assert str(err.value).removeprefix(f"{train_yaml}: ") == message
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as err:
        check_pipeline(load_pipeline(run_yaml), run_yaml)
    assert str(err.value) == f"{run_yaml}: steps.0.train.{message}"

    # the CLI
    assert _one_line(runner.invoke(app, ["train", str(train_yaml), "--dry-run"])) == f"error: {train_yaml}: {message}"
    assert _one_line(runner.invoke(app, ["run", str(run_yaml), "--dry-run"])) == (
        f"error: {run_yaml}: steps.0.train.{message}"
    )
    assert _tree(tmp_path, folders["file"].parent) == before  # nothing written: no output, no hub


def test_the_same_recipe_without_the_bad_value_passes_and_numbers_in_strings_become_numbers(folders, tmp_path):
    recipe, _ = _case(folders, tmp_path, {"trainer.learning_rate": "1e-3", "adapter.params.r": "8"}, "")
    path = write_yaml(tmp_path / "r.yaml", recipe)
    result = runner.invoke(app, ["train", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    cfg = load_train_recipe(str(path))
    config, _ = check_train_recipe(cfg)
    assert cfg.trainer["learning_rate"] == 0.001 and config.r == 8  # YAML reads 1e-3 as a string
    assert not (tmp_path / "out").exists() and not (tmp_path / "hub").exists()


@pytest.mark.parametrize(
    "method,params",
    [
        ("spp", {"target_modules": ["q_proj"]}),
        ("lors", {"target_modules": ["q_proj"]}),
        ("shira", {"r": 4, "mask_type": "wm", "target_modules": ["q_proj"]}),
        ("lora", {"r": 4, "init_lora_weights": "pissa_niter_2", "target_modules": ["q_proj"]}),
    ],
    ids=["spp", "lors", "shira-wm", "lora-pissa"],
)
def test_methods_that_read_the_base_weights_pass_the_dry_run(folders, tmp_path, method, params):
    """Their layers read the weights (patterns, masks, SVD): built on placeholder values, not refused."""
    recipe, _ = _case(folders, tmp_path, {"adapter": {"method": method, "params": params}}, "")
    config, _ = check_train_recipe(load_train_recipe(str(write_yaml(tmp_path / "r.yaml", recipe))))
    assert type(config).__name__.lower().startswith(method)


def _pipeline_inputs(tmp_path: Path) -> dict[str, str]:
    for name in ("a1", "a2", "bad name"):
        (tmp_path / name).mkdir()
    return {"a1": str(tmp_path / "a1"), "a2": str(tmp_path / "a2"), "bad": str(tmp_path / "bad name")}


# (id, one step, expected message after "RECIPE: steps.0.")
PIPELINE_BAD: list[tuple[str, dict[str, Any], str]] = [
    ("put-name", {"put": {"src": "{a1}", "name": "../evil"}}, f"put.name: name '../evil' {NAME_RULE}"),
    ("put-name-newline", {"put": {"src": "{a1}", "name": "ok\n"}}, f"put.name: name 'ok\\n' {NAME_RULE}"),
    ("put-tag", {"put": {"src": "{a1}", "tags": ["../t"]}}, f"put.tags.0: tag '../t' {NAME_RULE}"),
    (
        "put-default-name",
        {"put": {"src": "{bad}"}},
        f"put.name: name 'bad name' {NAME_RULE} (the default, the folder's name; set name)",
    ),
    (
        "put-root-file",
        {"put": {"src": "{a1}", "root": "{file}"}},
        "put.root: registry root '{file}' is a file, not a folder",
    ),
    (
        "put-base-pickle",
        {"put": {"src": "{a1}", "base": "{pickled}"}},
        "put.base: model folder '{pickled}' " + PICKLE_ONLY,
    ),
    (
        "compress-put",
        {"compress": {"adapters": ["{a1}", "{a2}"], "rank": 2, "output": "{tmp}/bundle", "put": "../evil"}},
        f"compress.put: name '../evil' {NAME_RULE}",
    ),
    (
        "compress-output",
        {"compress": {"adapters": ["{a1}", "{a2}"], "rank": 2, "output": "{file}/bundle"}},
        "compress.output: output '{file}/bundle' cannot be created: '{file}' is a file, not a folder",
    ),
    (
        "prune-output",
        {"prune": {"model": "{base}", "method": "magnitude", "output": "{file}/p"}},
        "prune.output: output '{file}/p' cannot be created: '{file}' is a file, not a folder",
    ),
    (
        "prune-model-pickle",
        {"prune": {"model": "{pickled}", "method": "magnitude", "output": "{tmp}/p"}},
        "prune.model: model folder '{pickled}' " + PICKLE_ONLY,
    ),
    (
        "extract-tuned-pickle",
        {"extract": {"base": "{base}", "tuned": "{pickled}", "rank": 2, "output": "{tmp}/x"}},
        "extract.tuned: model folder '{pickled}' " + PICKLE_ONLY,
    ),
    (
        "evaluate-model-pickle",
        {"evaluate": {"model": "{pickled}", "task": "sentiment"}},
        "evaluate.model: model folder '{pickled}' " + PICKLE_ONLY,
    ),
    (
        "perp-steps-text",
        {"perp": {"model": "{base}", "steps": "many", "output": "{tmp}/perp"}},
        "perp.steps: Input should be a valid integer, unable to parse string as an integer",
    ),
]


@pytest.mark.parametrize("step,expected", [c[1:] for c in PIPELINE_BAD], ids=[c[0] for c in PIPELINE_BAD])
def test_run_dry_run_refuses_bad_pipeline_values(folders, tmp_path, monkeypatch, step, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERLAB_HUB", str(tmp_path / "env-hub"))
    subs = {
        **_pipeline_inputs(tmp_path),
        "file": str(folders["file"]),
        "pickled": str(folders["pickled"]),
        "base": str(folders["base"]),
        "tmp": str(tmp_path),
    }
    path = write_yaml(tmp_path / "p.yaml", {"steps": [_fill(step, subs)]})
    message = f"{path}: steps.0.{_fill(expected, subs)}"
    before = _tree(tmp_path, folders["file"].parent)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        check_pipeline(load_pipeline(path), path)
    assert str(err.value) == message
    assert _one_line(runner.invoke(app, ["run", str(path), "--dry-run"])) == f"error: {message}"
    assert _tree(tmp_path, folders["file"].parent) == before


def test_step_names_are_full_matches(tmp_path):
    path = write_yaml(tmp_path / "p.yaml", {"steps": [{"name": "prune\n", "prune": {"output": str(tmp_path / "o")}}]})
    line = _one_line(runner.invoke(app, ["run", str(path), "--dry-run"]))
    assert line == f"error: {path}: steps.0: step name 'prune\\n' must be letters, digits, '_' or '-'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
