"""Recipe schema and pipeline checks: every packaged recipe validates; bad recipes fail before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adapterlab.recipe import check_pipeline, load_pipeline, load_train_recipe, plan, training
from adapterlab.recipe.schema import (
    VERBS,
    AdapterSpec,
    PipelineRecipe,
    TrainRecipe,
    apply_set,
    as_pipeline,
    validate,
)
from adapterlab.recipe.training import adapter_callbacks, adapter_config, check_train_recipe
from tests.recipe._helpers import tiny_base, train_dict, write_yaml

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL_YAML = sorted(RECIPES.rglob("*.yaml")) + sorted(RECIPES.rglob("*.yml"))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_base(tmp_path_factory.mktemp("recipe-base") / "tiny")


def _check_adapters(step_bodies: list[TrainRecipe]) -> None:
    for body in step_bodies:
        if body.adapter.method in training.available_methods():
            adapter_config(body.adapter)
            adapter_callbacks(body.adapter)


def test_recipes_folder_has_the_expected_recipes():
    names = {p.relative_to(RECIPES).parts[0] for p in ALL_YAML}
    assert {"train", "prune", "extract", "pipelines", "merge"} <= names
    assert len(list((RECIPES / "pipelines").glob("*.yaml"))) >= 2


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_validates_through_the_schema(path: Path):
    kind = path.relative_to(RECIPES).parts[0]
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(raw, dict), path
    if kind == "train":
        recipe = load_train_recipe(str(path))
        _check_adapters([recipe])
    elif kind == "merge":
        from adapterlab.jobs.merge import load_config

        load_config(path)
    elif "steps" in raw or any(k in VERBS for k in raw):
        pipeline = load_pipeline(path)
        assert plan(pipeline)
        _check_adapters([s.train for s in pipeline.steps if s.train is not None])
    else:  # another verb's own format (e.g. compress options): at least a mapping of known verbs' keys
        pytest.skip(f"{path.name}: not a recipe format of adapterlab train / run")


def test_packaged_pipelines_reference_earlier_steps_only():
    for path in sorted((RECIPES / "pipelines").glob("*.yaml")):
        pipeline = load_pipeline(path)
        try:
            check_pipeline(pipeline, path)
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            # only "not installed yet" (perp / compress / registry by other parts) or existing outputs may stop it
            assert "this install does not have" in str(exc) or "not empty" in str(exc), str(exc)


# ---------------------------------------------------------------------------------------------
# typos and overrides


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d["trainer"].update(max_step=3), "r.yaml: trainer.max_step: unknown key"),
        (lambda d: d["adapter"].update(parms={}), "r.yaml: adapter.parms: unknown key"),
        (lambda d: d["data"].update(tsk="x"), "r.yaml: data.tsk: unknown key"),
        (lambda d: d.update(outptu="x"), "r.yaml: outptu: unknown key"),
        (lambda d: d.update(backend="accelerate"), "r.yaml: backend: Input should be 'trainer' or 'sft'"),
    ],
)
def test_typo_in_train_recipe_names_its_key_path(mutate, where, tmp_path):
    d = train_dict("default", tmp_path / "o")
    mutate(d)
    with pytest.raises(ValueError) as err:
        validate(TrainRecipe, d, "r.yaml")
    assert str(err.value).startswith(where)
    assert "\n" not in str(err.value)


def test_typo_in_pipeline_step_names_its_key_path(tmp_path):
    d = {"steps": [{"prune": {"output": "a"}}, {"train": train_dict("${prune}", "b")}]}
    d["steps"][1]["train"]["data"]["tsk"] = "x"
    with pytest.raises(ValueError, match=r"^p.yaml: steps\.1\.train\.data\.tsk: unknown key$"):
        as_pipeline(d, "p.yaml")
    with pytest.raises(ValueError, match=r"^p.yaml: prune\.sparsty: unknown key$"):
        as_pipeline({"prune": {"output": "a", "sparsty": 0.5}}, "p.yaml")
    with pytest.raises(ValueError, match=r"exactly one verb key"):
        as_pipeline({"steps": [{"name": "x"}]}, "p.yaml")
    with pytest.raises(ValueError, match=r"steps\.1\.name: 'a' is used by an earlier step"):
        as_pipeline(
            {"steps": [{"name": "a", "prune": {"output": "x"}}, {"name": "a", "prune": {"output": "y"}}]}, "p.yaml"
        )


def test_set_overrides(tmp_path):
    path = write_yaml(tmp_path / "r.yaml", train_dict("default", tmp_path / "o"))
    recipe = load_train_recipe(
        str(path), ["trainer.max_steps=7", "adapter.params.r=2", "data.task=domain", "eval=null"]
    )
    assert recipe.trainer["max_steps"] == 7 and recipe.adapter.params["r"] == 2
    assert recipe.data.task == "domain" and recipe.eval is None
    with pytest.raises(ValueError, match=r"expected KEY=VALUE"):
        load_train_recipe(str(path), ["trainer.max_steps"])
    with pytest.raises(ValueError, match=r"r.yaml: trainer.max_stesp: unknown key"):
        load_train_recipe(str(path), ["trainer.max_stesp=3"])
    raw = {"steps": [{"train": train_dict("default", "o")}]}
    apply_set(raw, "steps.0.train.trainer.max_steps=9")
    assert as_pipeline(raw, "p").steps[0].train.trainer["max_steps"] == 9


# ---------------------------------------------------------------------------------------------
# methods, params, callbacks


def test_adapter_method_table_and_errors(monkeypatch):
    from peft import LoraConfig

    from adapterlab.tuners import DyLoraConfig, LoriConfig

    assert {"lora", "rslora", "dylora", "lori"} <= set(training.available_methods())
    assert {"shira", "snell", "spp", "lors"} <= set(training.METHODS)
    cfg = adapter_config(AdapterSpec(method="rslora", params={"r": 4}))
    assert isinstance(cfg, LoraConfig) and cfg.use_rslora and cfg.r == 4
    assert isinstance(adapter_config(AdapterSpec(method="dylora", params={"r": 4})), DyLoraConfig)
    assert isinstance(adapter_config(AdapterSpec(method="LoRI", params={"r": 4, "task": "t"})), LoriConfig)
    with pytest.raises(
        ValueError, match=r"adapter.method: unknown adapter method 'lorra'; choose one of: lora, rslora"
    ):
        adapter_config(AdapterSpec(method="lorra"))
    monkeypatch.setitem(training.METHODS, "ghost", training.MethodEntry("adapterlab.tuners", "GhostConfig"))
    with pytest.raises(
        ValueError,
        match=r"'ghost' is not available in this install \(adapterlab.tuners has no GhostConfig\); available: lora",
    ):
        adapter_config(AdapterSpec(method="ghost"))
    with pytest.raises(
        ValueError, match=r"adapter.params.rr: unknown key for LoraConfig \(lora\); allowed: .*lora_alpha"
    ):
        adapter_config(AdapterSpec(method="lora", params={"rr": 4}))
    with pytest.raises(ValueError, match=r"adapter.params: rank range is empty"):
        adapter_config(AdapterSpec(method="dylora", params={"r": 2, "r_min": 3}))


def test_callbacks_by_name_and_automatic_ones():
    from adapterlab.callbacks import DyLoraCallback, LoriCallback

    cbs = adapter_callbacks(AdapterSpec(method="dylora"))
    assert [type(c) for c in cbs] == [DyLoraCallback]
    cbs = adapter_callbacks(AdapterSpec(method="lori", callbacks={"LoriCallback": {"switch_step": 5, "lr_s": 0.1}}))
    assert isinstance(cbs[0], LoriCallback) and cbs[0].switch_step == 5
    with pytest.raises(
        ValueError, match=r"adapter.callbacks.LoriCalback: unknown callback; choose one of: .*LoriCallback"
    ):
        adapter_callbacks(AdapterSpec(method="lori", callbacks={"LoriCalback": {}}))
    with pytest.raises(
        ValueError, match=r"adapter.callbacks.LoriCallback.swich_step: unknown key; allowed: switch_step"
    ):
        adapter_callbacks(AdapterSpec(method="lori", callbacks={"LoriCallback": {"swich_step": 5}}))
    with pytest.raises(ValueError, match=r"adapter.callbacks.LoriCallback: switch_step must be an integer >= 0"):
        adapter_callbacks(AdapterSpec(method="lori", callbacks={"LoriCallback": {"switch_step": -1}}))


def test_train_recipe_checks_before_work(base, tmp_path):
    ok = validate(TrainRecipe, train_dict(base, tmp_path / "o"), "r")
    config, callbacks = check_train_recipe(ok)
    assert config.r == 4 and callbacks == []
    bad = validate(TrainRecipe, train_dict(base, tmp_path / "o", adapter__params__target_modules=["c_attn"]), "r")
    with pytest.raises(ValueError, match=r"adapter.params.target_modules: 'c_attn' match no module of the base model"):
        check_train_recipe(bad)
    with pytest.raises(
        ValueError, match=r"data.task: unknown task 'sentimnt'; choose one of: compare, domain, sentiment"
    ):
        check_train_recipe(validate(TrainRecipe, train_dict(base, tmp_path / "o", data__task="sentimnt"), "r"))
    with pytest.raises(FileNotFoundError, match=r"base: model path .*nothere.* does not exist"):
        check_train_recipe(validate(TrainRecipe, train_dict(tmp_path / "nothere", tmp_path / "o"), "r"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match=r"not empty"):
        check_train_recipe(validate(TrainRecipe, train_dict(base, tmp_path / "full"), "r"))
    with pytest.raises(ValueError, match=r"trainer.max_length: an SFTConfig field; set backend: sft"):
        check_train_recipe(validate(TrainRecipe, train_dict(base, tmp_path / "o", trainer__max_length=8), "r"))
    with pytest.raises(ValueError, match=r"prune: unknown pruning method 'wandaa'"):
        check_train_recipe(validate(TrainRecipe, train_dict(base, tmp_path / "o", prune={"method": "wandaa"}), "r"))
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# pipeline references and inputs


def _pipeline(tmp_path: Path, steps: list[dict]) -> tuple[PipelineRecipe, Path]:
    path = write_yaml(tmp_path / "pipe.yaml", {"steps": steps})
    return load_pipeline(path), path


def test_references_must_name_an_earlier_step_and_a_produced_key(base, tmp_path):
    prune = {"prune": {"model": str(base), "method": "magnitude", "sparsity": 0.5, "output": str(tmp_path / "pruned")}}
    p, path = _pipeline(tmp_path, [prune, {"train": train_dict("${steps.prnue.output}", tmp_path / "a")}])
    with pytest.raises(
        ValueError,
        match=r"steps\.1\.train\.base: \$\{steps\.prnue\.output\} names no earlier step \(earlier steps: prune\)",
    ):
        check_pipeline(p, path)
    p, path = _pipeline(tmp_path, [prune, {"train": train_dict("${steps.prune.accuracy}", tmp_path / "a")}])
    with pytest.raises(ValueError, match=r"a prune step produces output, sparsity, not 'accuracy'"):
        check_pipeline(p, path)
    p, path = _pipeline(tmp_path, [{"train": train_dict("${steps.prune.output}", tmp_path / "a")}, prune])
    with pytest.raises(ValueError, match=r"names no earlier step \(earlier steps: none\)"):
        check_pipeline(p, path)
    p, path = _pipeline(tmp_path, [prune, {"name": "t", "train": train_dict("${prune}", tmp_path / "a")}])
    check_pipeline(p, path)  # ${NAME} is short for ${steps.NAME.output}
    assert not (tmp_path / "pruned").exists() and not (tmp_path / "a").exists()


def test_missing_input_and_misfit_fail_before_any_work(base, tmp_path):
    prune = {"prune": {"model": str(base), "method": "magnitude", "sparsity": 0.5, "output": str(tmp_path / "pruned")}}
    merge = {
        "merge": {
            "method": "linear",
            "adapters": ["${steps.train.output}", str(tmp_path / "missing-adapter")],
            "output_dir": str(tmp_path / "merged"),
        }
    }
    p, path = _pipeline(tmp_path, [prune, {"train": train_dict("${prune}", tmp_path / "a")}, merge])
    with pytest.raises(
        FileNotFoundError, match=r"steps\.2\.merge\.adapters\.1\.path: .*missing-adapter' does not exist"
    ):
        check_pipeline(p, path)
    # the base derives from the prune step's model: the target modules are checked against it before work
    bad = train_dict("${prune}", tmp_path / "a", adapter__params__target_modules=["query"])
    p, path = _pipeline(tmp_path, [prune, {"train": bad}])
    with pytest.raises(ValueError, match=r"steps\.1\.train\.adapter\.params\.target_modules: 'query' match no module"):
        check_pipeline(p, path)
    p, path = _pipeline(tmp_path, [{"prune": {"model": str(tmp_path / "nope"), "output": str(tmp_path / "x")}}])
    with pytest.raises(FileNotFoundError, match=r"steps\.0\.prune\.model: .*nope' does not exist"):
        check_pipeline(p, path)
    p, path = _pipeline(tmp_path, [prune, {"prune": {"model": str(base), "output": str(tmp_path / "pruned")}}])
    with pytest.raises(ValueError, match=r"steps\.1\.prune\.output: .* is also the output of step 'prune'"):
        check_pipeline(p, path)
    assert not any((tmp_path / n).exists() for n in ("pruned", "a", "merged", "x"))


def test_relative_inputs_are_found_next_to_the_recipe(base, tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    monkeypatch.chdir(tmp_path / "recipes")
    link = sub / "mybase"
    link.symlink_to(base, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    p, path = _pipeline(sub, [{"prune": {"model": "mybase", "method": "magnitude", "output": str(tmp_path / "o")}}])
    check_pipeline(p, path)
    assert p.steps[0].prune.model == str(sub / "mybase")
