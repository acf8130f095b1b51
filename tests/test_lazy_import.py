"""``import adapterlab`` is cheap, every public name still resolves, and peft learns the tuners
whenever it is imported (before or after adapterlab), checked in fresh interpreters."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import adapterlab
from adapterlab import _lazy

REPO_ROOT = Path(__file__).resolve().parents[1]
#: What ``import adapterlab`` (and the CLI's ``--help``) must not pull in.
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "trl")


def run_fresh(script: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new interpreter from the repository root (offline), capturing its output."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def last_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_adapterlab_imports_no_heavy_module() -> None:
    proc = run_fresh(
        f"""
        import json, sys
        import adapterlab
        from adapterlab._lazy import PeftImportHook
        print(json.dumps({{
            "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules),
            "tuners": "adapterlab.tuners" in sys.modules,
            "hook": any(isinstance(f, PeftImportHook) for f in sys.meta_path),
        }}))
        """
    )
    assert last_json(proc) == {"heavy": [], "tuners": False, "hook": True}


def test_every_public_name_resolves_to_its_module() -> None:
    assert set(adapterlab._EXPORTS) == set(adapterlab.__all__)
    assert len(adapterlab.__all__) == len(set(adapterlab.__all__))
    for name in adapterlab.__all__:
        obj = getattr(adapterlab, name)
        assert obj is getattr(importlib.import_module(adapterlab._EXPORTS[name]), name), name
    assert set(adapterlab.__all__) <= set(dir(adapterlab))


def test_star_import_and_from_import_in_a_fresh_process() -> None:
    proc = run_fresh(
        """
        import json
        import adapterlab
        ns = {}
        exec("from adapterlab import *", ns)
        from adapterlab import ShiraConfig, merge, AdapterRegistry
        missing = [n for n in adapterlab.__all__ if n not in ns]
        print(json.dumps({"missing": missing, "shira": ShiraConfig.__module__, "merge": merge.__module__}))
        """
    )
    assert last_json(proc) == {
        "missing": [],
        "shira": "adapterlab.tuners.shira.config",
        "merge": "adapterlab.folding",
    }


def test_unknown_attribute_names_the_value_and_submodules_resolve() -> None:
    with pytest.raises(AttributeError, match=r"module 'adapterlab' has no attribute 'no_such_name'"):
        adapterlab.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="_private"):
        adapterlab._private  # noqa: B018
    assert adapterlab.quant is sys.modules["adapterlab.quant"]


_ORDERS = {
    # user code: ``import adapterlab`` first, peft later (the post-import hook registers)
    "adapterlab_then_peft": "import adapterlab\nimport peft",
    # peft already imported: ``import adapterlab`` registers at once
    "peft_then_adapterlab": "import peft\nimport adapterlab",
    # a peft sub-module first (its parent package ``peft`` fires the hook)
    "peft_submodule": "import adapterlab\nfrom peft.tuners.lora import LoraConfig",
    # every module ``adapterlab.tuners`` depends on imported before peft: no import cycle
    "tuner_deps_first": "import adapterlab.peft_compat, adapterlab.quant, adapterlab.models, adapterlab._paths, adapterlab.io\nimport peft",
}


@pytest.mark.parametrize("order", sorted(_ORDERS))
def test_tuners_are_registered_as_soon_as_peft_is_imported(order: str) -> None:
    proc = run_fresh(
        "import json, sys\n"
        + _ORDERS[order]
        + """
registered_on_import = "adapterlab.tuners" in sys.modules
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from adapterlab._lazy import PeftImportHook
from adapterlab.peft_compat import registered_tuners
names = sorted(registered_tuners())
print(json.dumps({
    "registered_on_import": registered_on_import,
    "names": names,
    "in_peft": all(n.upper() in PEFT_TYPE_TO_CONFIG_MAPPING and n.upper() in PEFT_TYPE_TO_TUNER_MAPPING for n in names),
    "hook_left": any(isinstance(f, PeftImportHook) for f in sys.meta_path),
}))
"""
    )
    got = last_json(proc)
    assert got["registered_on_import"] is True
    assert {
        "adapterlab_dylora",
        "adapterlab_lori",
        "adapterlab_lors",
        "adapterlab_shira",
        "adapterlab_snell",
        "adapterlab_spp",
    } <= set(got["names"])
    assert got["in_peft"] is True and got["hook_left"] is False


def test_hook_only_handles_peft_and_is_installed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = _lazy.PeftImportHook()
    assert hook.find_spec("json", None) is None
    assert hook.find_spec("peft.tuners", None) is None
    spec = hook.find_spec("peft", None)  # found by the other finders, only its loader's exec_module is chained
    assert spec is not None and Path(spec.origin).parent.name == "peft"
    assert spec.loader.exec_module.__name__ == "exec_then_register"
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _lazy.PeftImportHook)])
    monkeypatch.delitem(sys.modules, "peft")  # pretend peft is not imported yet; the tuners are, so nothing imports
    _lazy.register_tuners_with_peft()
    _lazy.register_tuners_with_peft()
    assert sum(isinstance(f, _lazy.PeftImportHook) for f in sys.meta_path) == 1
    _lazy.remove_peft_hook()
    assert not any(isinstance(f, _lazy.PeftImportHook) for f in sys.meta_path)
