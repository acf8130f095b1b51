"""Issue 15, class 5: garbage values in ``adapter_config.json`` (and in a shared-basis bundle's
``compressed_config.json``) are one line naming the file, the key path, the bad value and what is
allowed — never a traceback — through every reader: merge (library, job, CLI), compress (library,
CLI), the adapter resolver, hub put (library, CLI), the bundle loader and hub put --bundle.

All of them validate through one schema, :mod:`adapterlab.adapter_config`. Each case asserts the exact
line, exit code 2 (CLI) or ``ValueError`` (library), and that nothing was written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adapterlab.adapter_config import adapter_config, bundle_config
from adapterlab.cli.app import app
from tests.merging._helpers import make_lora_dirs

runner = CliRunner()
CFG = "adapter_config.json"


def _set(**kv: Any) -> Callable[[dict], Any]:
    def edit(cfg: dict) -> dict:
        cfg.update(kv)
        return cfg

    return edit


#: (id, edit of the parsed config (returns the new JSON value), the message after "{file}: ")
BAD_CONFIGS: list[tuple[str, Callable[[dict], Any], str]] = [
    ("list_not_object", lambda cfg: [cfg], "the config must be a JSON object, got a JSON list"),
    ("string_not_object", lambda cfg: "LORA", "the config must be a JSON object, got a JSON string"),
    ("lora_alpha_null", _set(lora_alpha=None), "key 'lora_alpha' is None; it must be a finite number"),
    ("lora_alpha_text", _set(lora_alpha="8"), "key 'lora_alpha' is '8'; it must be a finite number"),
    (
        "alpha_pattern_string",
        _set(alpha_pattern="x"),
        "key 'alpha_pattern' is 'x'; it must be an object of module pattern -> value",
    ),
    (
        "alpha_pattern_value",
        _set(alpha_pattern={"q_proj": None}),
        "key alpha_pattern.q_proj is None; it must be a finite number",
    ),
    ("r_word", _set(r="four"), "key 'r' is 'four'; it must be a positive integer (the rank)"),
    ("r_negative", _set(r=-4), "key 'r' is -4; it must be a positive integer (the rank)"),
    ("r_bool", _set(r=True), "key 'r' is True; it must be a positive integer (the rank)"),
    (
        "r_missing",
        lambda cfg: {k: v for k, v in cfg.items() if k != "r"},
        "key 'r' is missing; it must be a positive integer (the rank)",
    ),
    (
        "target_modules_number",
        _set(target_modules=5),
        "key 'target_modules' is 5; it must be a string, a list of strings or null",
    ),
    (
        "target_modules_mixed",
        _set(target_modules=["q_proj", 3]),
        "key 'target_modules' is ['q_proj', 3]; it must be a string, a list of strings or null",
    ),
    (
        "rank_pattern_value",
        _set(rank_pattern={"v_proj": "x"}),
        "key rank_pattern.v_proj is 'x'; it must be a positive integer",
    ),
    ("use_rslora_text", _set(use_rslora="yes"), "key 'use_rslora' is 'yes'; it must be true or false"),
    (
        "modules_to_save_string",
        _set(modules_to_save="lm_head"),
        "key 'modules_to_save' is 'lm_head'; it must be a list of strings or null",
    ),
    (
        "peft_type_missing",
        lambda cfg: {k: v for k, v in cfg.items() if k != "peft_type"},
        "key 'peft_type' is missing; a PEFT adapter config names its method (e.g. \"LORA\")",
    ),
]
IDS = [c[0] for c in BAD_CONFIGS]


def snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def cli(*args: str) -> tuple[int, str]:
    res = runner.invoke(app, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    return res.exit_code, lines[0]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_lora_dirs(tmp_path_factory.mktemp("config-in"), 2, r=2, hidden_size=32)


@pytest.fixture
def bad(adapters: list[Path], tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """A copy of adapter 1 with a garbage config: (folder, the message after the caller's prefix)."""
    _, edit, tail = request.param
    folder = tmp_path / "bad"
    shutil.copytree(adapters[1], folder)
    cfg = folder / CFG
    cfg.write_text(json.dumps(edit(json.loads(cfg.read_text()))))
    return folder, f"{cfg}: {tail}"


parametrize_bad = pytest.mark.parametrize("bad", BAD_CONFIGS, ids=IDS, indirect=True)


# ---- the schema --------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "edit", "tail"), BAD_CONFIGS, ids=IDS)
def test_the_schema(adapters: list[Path], case: str, edit: Callable[[dict], Any], tail: str) -> None:
    raw = edit(json.loads((adapters[0] / CFG).read_text()))
    with pytest.raises(ValueError) as err:
        adapter_config(raw, "f.json")
    assert str(err.value) == f"f.json: {tail}"


def test_the_schema_accepts_real_configs(adapters: list[Path]) -> None:
    cfg = adapter_config(json.loads((adapters[0] / CFG).read_text()), "f.json")
    assert cfg.r == 2 and cfg.peft_type == "LORA"
    # another peft type: only the common fields are read (peft checks the rest)
    adapter_config({"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": []}, "f.json")


# ---- merge -------------------------------------------------------------------------------------


@parametrize_bad
def test_merge_and_resolve_library(adapters: list[Path], bad: tuple[Path, str]) -> None:
    from adapterlab.adapters import resolve_adapter
    from adapterlab.merging import merge_adapters

    folder, tail = bad
    with pytest.raises(ValueError) as err:
        merge_adapters([adapters[0], folder], "ties", density=0.5)
    assert str(err.value) == f"adapters[1]: {tail}"
    with pytest.raises(ValueError) as err:
        resolve_adapter(folder, where="adapter")
    assert str(err.value) == f"adapter: {tail}"


@parametrize_bad
def test_merge_job_and_cli(adapters: list[Path], bad: tuple[Path, str], tmp_path: Path) -> None:
    from adapterlab.jobs.merge import merge_folder

    folder, tail = bad
    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: linear\nadapters: [{adapters[0]}, {folder}]\n")
    out = tmp_path / "out" / "merged"
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError) as err:
        merge_folder(cfg, out)
    assert str(err.value) == f"{cfg}: adapters.1: {tail}"
    for extra in ([], ["--dry-run"]):
        code, line = cli("merge", str(cfg), "-o", str(out), *extra)
        assert (code, line) == (2, f"error: {cfg}: adapters.1: {tail}")
    assert list((tmp_path / "out").iterdir()) == []


# ---- compress ----------------------------------------------------------------------------------


@parametrize_bad
def test_compress_library_and_cli(adapters: list[Path], bad: tuple[Path, str], tmp_path: Path) -> None:
    from adapterlab.compression import compress_adapters

    folder, tail = bad
    with pytest.raises(ValueError) as err:
        compress_adapters([adapters[0], folder], rank=2)
    assert str(err.value) == f"adapters[1]: {tail}"
    bundle = compress_adapters([adapters[0]], rank=2)
    with pytest.raises(ValueError) as err:
        bundle.project(folder, "new")
    assert str(err.value) == f"adapter: {tail}"
    out = tmp_path / "out" / "bundle"
    (tmp_path / "out").mkdir()
    code, line = cli("compress", str(adapters[0]), str(folder), "--rank", "2", "-o", str(out))
    assert (code, line) == (2, f"error: adapters[1]: {tail}")
    assert list((tmp_path / "out").iterdir()) == []


# ---- hub put -----------------------------------------------------------------------------------


@parametrize_bad
def test_hub_put_library_and_cli(adapters: list[Path], bad: tuple[Path, str], tmp_path: Path) -> None:
    from adapterlab.registry import AdapterRegistry

    folder, tail = bad
    hub = tmp_path / "hub"
    AdapterRegistry(hub).put(adapters[0], "good")
    before = snapshot(hub)
    with pytest.raises(ValueError) as err:
        AdapterRegistry(hub).put(folder, "bad")
    assert str(err.value) == f"put: {tail}"
    code, line = cli("hub", "--hub", str(hub), "put", str(folder), "--name", "bad")
    assert (code, line) == (2, f"error: put: {tail}")
    assert snapshot(hub) == before


# ---- shared-basis bundles ----------------------------------------------------------------------

#: (id, edit of compressed_config.json, message after "{file}: ")
BAD_BUNDLES: list[tuple[str, Callable[[dict], Any], str]] = [
    ("names_number", _set(names=5), "key 'names' is 5; it must be a list of adapter names (strings)"),
    (
        "names_missing",
        lambda c: {k: v for k, v in c.items() if k != "names"},
        "key 'names' is missing; it must be a list of adapter names (strings)",
    ),
    ("not_an_object", lambda c: [c], "the config must be a JSON object, got a JSON list"),
    ("type_other", _set(type="rmm"), "key 'type' is 'rmm'; it must be 'shared_basis'"),
    ("mode_other", _set(mode="sparse"), "key 'mode' is 'sparse'; it must be 'full' or 'diagonal'"),
    ("rank_text", _set(rank_c="2"), "key 'rank_c' is '2'; it must be a positive integer"),
    (
        "module_names_string",
        _set(module_names="q_proj"),
        "key 'module_names' is 'q_proj'; it must be a list of module names (strings)",
    ),
    (
        "clusters_list",
        _set(clusters=[[0, 1]]),
        "key 'clusters' is [[0, 1]]; it must be an object of cluster id -> adapter indices",
    ),
    ("clusters_index", _set(clusters={"0": [0, 7]}), "key clusters.0 holds 7; adapter indices must be in [0, 2)"),
    ("shape_short", lambda c: {**c, "shapes": {m: [4] for m in c["shapes"]}}, None),  # message built below
]


def _bundle_tail(case: str, cfg: dict, tail: str | None) -> str:
    if tail is not None:
        return tail
    first = list(cfg["shapes"])[0]  # the first module, in the file's order
    return f"key shapes.{first} is [4]; it must be [d_out, d_in] (two positive integers)"


@pytest.fixture(scope="module")
def bundle(adapters: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapterlab.compression import compress_adapters

    root = tmp_path_factory.mktemp("bundle") / "good"
    compress_adapters(adapters, rank=2).save(root)
    return root


@pytest.mark.parametrize(("case", "edit", "tail"), BAD_BUNDLES, ids=[c[0] for c in BAD_BUNDLES])
def test_bundle_load_and_put(
    bundle: Path, tmp_path: Path, case: str, edit: Callable[[dict], Any], tail: str | None
) -> None:
    from adapterlab.compression import SharedBasisBundle
    from adapterlab.registry import AdapterRegistry

    root = tmp_path / "bundle"
    shutil.copytree(bundle, root)
    cfg_path = root / "compressed_config.json"
    raw = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(edit(raw)))
    line = f"{cfg_path}: {_bundle_tail(case, raw, tail)}"
    with pytest.raises(ValueError) as err:
        SharedBasisBundle.load(root)
    assert str(err.value) == line
    with pytest.raises(ValueError) as err:
        bundle_config(json.loads(cfg_path.read_text()), str(cfg_path))
    assert str(err.value) == line
    hub = tmp_path / "hub"
    with pytest.raises(ValueError) as err:
        AdapterRegistry(hub).put_bundle(root, "b")
    assert str(err.value) == f"put: {line}"
    code, out = cli("hub", "--hub", str(hub), "put", "--bundle", str(root), "--name", "b")
    assert (code, out) == (2, f"error: put: {line}")
    assert not hub.exists()


def test_a_good_bundle_still_loads_and_puts(bundle: Path, tmp_path: Path) -> None:
    from adapterlab.compression import SharedBasisBundle
    from adapterlab.registry import AdapterRegistry

    loaded = SharedBasisBundle.load(bundle)
    assert loaded.names == ["task0", "task1"] and loaded.rank == 2
    reg = AdapterRegistry(tmp_path / "hub")
    reg.put_bundle(bundle, "b")
    assert SharedBasisBundle.load("hub:b", registry=reg).names == loaded.names
    assert reg.show("b")["rank"] == 2


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda c: c.pop("K"), "no key or tensor 'K'"),
        (lambda c: c.update(modules=5), "'int' object has no attribute 'items'"),
        (lambda c: c.update(tasks=None), "'NoneType' object is not iterable"),
    ],
    ids=["K_missing", "modules_number", "tasks_null"],
)
def test_rmm_bundle_with_garbage_config(adapters: list[Path], tmp_path: Path, edit: Callable, why: str) -> None:
    from adapterlab.merging import merge_adapters
    from adapterlab.merging.rmm import CONFIG_FILE, RMMBundle

    root = tmp_path / "rmm"
    merge_adapters(adapters, "rmm", K=1).save(root)
    cfg_path = root / CONFIG_FILE
    raw = json.loads(cfg_path.read_text())
    edit(raw)
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        RMMBundle.load(root)
    assert str(err.value) == (
        f"{cfg_path}: not an RMM bundle adapterlab can read ({why}); re-save it with MergeResult.save"
    )
