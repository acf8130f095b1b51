"""Issue 15, accepted silently: ``merge`` with ``format: full`` wrote ``hub:`` adapters into a base other
than the one the registry recorded for them (``hub put --base``). Now the base is fingerprinted
(:func:`adapterlab.io.base_fingerprint`: shapes, quantization, zero pattern) and compared with each
registry adapter's recorded fingerprint before anything is merged — through ``merge_adapters``, the merge
job (including ``--dry-run``) and the CLI; the right base is accepted, and adapters put without a base or
given as folders are not checked (there is nothing recorded to compare).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from adapterlab.cli.app import app
from adapterlab.io import base_fingerprint
from adapterlab.models import load_model, tiny_llama
from adapterlab.registry import AdapterRegistry
from adapterlab.registry.manifest import describe_base
from tests.merging._helpers import make_lora_dirs

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base ``a`` (dense), base ``b`` (a's shapes, q_proj of layer 0 half pruned), two adapters and a hub
    where ``x`` and ``y`` were put with ``--base a`` (and a second hub where ``free`` was put without one)."""
    root = tmp_path_factory.mktemp("fingerprint")
    tiny_llama(hidden_size=32).save_pretrained(root / "a")
    pruned = tiny_llama(hidden_size=32)
    with torch.no_grad():
        w = pruned.model.layers[0].self_attn.q_proj.weight
        w[:, : w.shape[1] // 2] = 0
    pruned.save_pretrained(root / "b")
    dirs = make_lora_dirs(root / "in", 2, r=2, hidden_size=32)
    reg = AdapterRegistry(root / "hub")
    base_a = load_model(str(root / "a"))
    reg.put(dirs[0], "x", base=base_a)
    reg.put(dirs[1], "y", base=base_a)
    AdapterRegistry(root / "hub2").put(dirs[1], "free")  # put without --base: no recorded base
    return {"root": root, "a": root / "a", "b": root / "b", "t0": dirs[0], "t1": dirs[1], "hub": root / "hub"}


def _line(world: dict[str, Path], where: str, name: str) -> str:
    want = AdapterRegistry(world["hub"]).show(name)["base"]
    have = base_fingerprint(load_model(str(world["b"])))
    return (
        f"{where} ({name!r}, hub:{name}): the registry recorded it for base {describe_base(want)}, but the base to "
        f"merge into is {describe_base(have)}; merge it into the base it was made for (output: full writes the "
        f"adapter into this base)"
    )


def test_fingerprints_differ_but_shapes_do_not(world: dict[str, Path]) -> None:
    fa, fb = (base_fingerprint(load_model(str(world[k]))) for k in ("a", "b"))
    assert fa["shapes_digest"] == fb["shapes_digest"] and fa["mask_digest"] != fb["mask_digest"]


def test_merge_adapters_refuses_another_base(world: dict[str, Path]) -> None:
    from adapterlab.merging import merge_adapters

    reg = AdapterRegistry(world["hub"])
    with pytest.raises(ValueError) as err:
        merge_adapters(["hub:x", "hub:y"], "linear", output="full", base=str(world["b"]), registry=reg)
    assert str(err.value) == _line(world, "adapters[0]", "x")
    with pytest.raises(ValueError) as err:  # a folder first: the registry adapter is still checked
        merge_adapters([world["t0"], "hub:y"], "linear", output="full", base=str(world["b"]), registry=reg)
    assert str(err.value) == _line(world, "adapters[1]", "y")


def test_merge_adapters_accepts_the_recorded_base_and_unrecorded_adapters(world: dict[str, Path]) -> None:
    from adapterlab.merging import merge_adapters

    reg = AdapterRegistry(world["hub"])
    res = merge_adapters(["hub:x", "hub:y"], "linear", output="full", base=str(world["a"]), registry=reg)
    assert res.model is not None
    folders = merge_adapters([world["t0"], world["t1"]], "linear", output="full", base=str(world["b"]))
    assert folders.model is not None  # folders carry no recorded base
    reg2 = AdapterRegistry(world["root"] / "hub2")
    assert reg2.show("free")["base"] is None
    merge_adapters(["hub:free", world["t0"]], "linear", output="full", base=str(world["b"]), registry=reg2)
    # a LoRA output does not write into a base: nothing to compare
    merge_adapters(["hub:x", "hub:y"], "linear", base=str(world["b"]), registry=reg)


def test_merge_job_and_cli_refuse_another_base(world: dict[str, Path], tmp_path: Path) -> None:
    from adapterlab.jobs.merge import check_merge, merge_folder

    cfg = tmp_path / "m.yaml"
    cfg.write_text(f"method: linear\nbase: {world['b']}\noutput: {{format: full}}\nadapters: [hub:x, hub:y]\n")
    line = _line(world, f"{cfg}: adapters.0", "x")
    out = tmp_path / "out" / "merged"
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError) as err:
        check_merge(cfg, out, hub=world["hub"])
    assert str(err.value) == line
    with pytest.raises(ValueError) as err:
        merge_folder(cfg, out, hub=world["hub"])
    assert str(err.value) == line
    for extra in ([], ["--dry-run"]):
        res = runner.invoke(app, ["merge", str(cfg), "-o", str(out), "--hub", str(world["hub"]), *extra])
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        lines = [x for x in res.output.splitlines() if x.strip()]
        assert res.exit_code == 2 and lines == [f"error: {line}"], res.output
    assert list((tmp_path / "out").iterdir()) == []
    good = tmp_path / "good.yaml"
    good.write_text(cfg.read_text().replace(str(world["b"]), str(world["a"])))
    res = runner.invoke(app, ["merge", str(good), "-o", str(out), "--hub", str(world["hub"])])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file()
