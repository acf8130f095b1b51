"""The PeftType shim: a tuner peft does not know works through peft's whole public API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import adapterlab  # noqa: F401  (after this, importing peft registers adapterlab's tuners)
from adapterlab import peft_compat
from adapterlab.io import load_tensors
from adapterlab.models import tiny_llama
from tests._dummy_tuner import NAME, PREFIX, DummyConfig, DummyModel

REPO_ROOT = Path(__file__).resolve().parents[1]


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (2, 12), generator=g)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x).logits


def _trained(tmp_path: Path):
    """A dummy-tuner PeftModel after one AdamW step, saved to tmp_path/adapter."""
    from peft import get_peft_model

    x = _batch()
    base_logits = _logits(tiny_llama(), x)
    pm = get_peft_model(tiny_llama(), DummyConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    init_logits = _logits(pm, x)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    pm(x, labels=x).loss.backward()
    opt.step()
    out = tmp_path / "adapter"
    pm.save_pretrained(out)
    return pm, x, base_logits, init_logits, out


def test_peft_type_member_added():
    from peft.utils.peft_types import PeftType

    member = peft_compat.peft_type(NAME)
    assert member is PeftType[NAME.upper()] is PeftType(NAME.upper())
    assert member == NAME.upper() and member in list(PeftType)
    assert json.dumps({"peft_type": member}) == json.dumps({"peft_type": NAME.upper()})
    info = peft_compat.registered_tuners()[NAME]
    assert info.prefix == PREFIX and info.model_cls is DummyModel


def test_register_is_idempotent():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_MIXED_MODEL_MAPPING
    from peft.utils.peft_types import PeftType

    n = len(list(PeftType))
    m1 = peft_compat.register_tuner(NAME, DummyConfig, DummyModel, prefix=PREFIX)
    m2 = peft_compat.register_tuner(NAME, DummyConfig, DummyModel, prefix=PREFIX)
    assert m1 is m2 and len(list(PeftType)) == n
    assert PEFT_TYPE_TO_CONFIG_MAPPING[NAME.upper()] is DummyConfig
    assert m1 not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING


def test_register_rejects_conflicts_and_bad_names():
    from peft import LoraConfig

    class Other(DummyModel):
        prefix = "other_"

    with pytest.raises(ValueError, match="already registered"):
        peft_compat.register_tuner(NAME, LoraConfig, DummyModel, prefix=PREFIX)
    with pytest.raises(ValueError, match="already belongs"):  # a type peft ships
        peft_compat.register_tuner("shira", DummyConfig, Other, prefix="other_")
    lora_prefixed = type("LoraPrefixed", (DummyModel,), {"prefix": "lora_"})
    with pytest.raises(ValueError, match="already used"):
        peft_compat.register_tuner("adapterlab_x", DummyConfig, lora_prefixed, prefix="lora_")
    with pytest.raises(ValueError, match="must be the same"):
        peft_compat.register_tuner("adapterlab_y", DummyConfig, DummyModel, prefix="other_")
    for bad in ("Upper", "trailing_", "", "1abc", "has-dash"):
        with pytest.raises(ValueError, match="lower case"):
            peft_compat.register_tuner(bad, DummyConfig, DummyModel, prefix=PREFIX)
    assert "adapterlab_x" not in peft_compat.registered_tuners()


def test_version_guard(monkeypatch):
    monkeypatch.delenv(peft_compat.SKIP_VERSION_CHECK_ENV, raising=False)
    assert peft_compat.check_peft_version("0.21.2") == "0.21.2"
    for bad in ("0.20.0", "0.21.1", "0.22.0", "1.0.0"):
        with pytest.raises(peft_compat.PeftVersionError, match=r">=0\.21\.2,<0\.22"):
            peft_compat.check_peft_version(bad)
    monkeypatch.setenv(peft_compat.SKIP_VERSION_CHECK_ENV, "1")
    assert peft_compat.check_peft_version("0.30.0") == "0.30.0"
    import peft

    monkeypatch.setattr(peft, "__version__", "0.19.0")
    monkeypatch.delenv(peft_compat.SKIP_VERSION_CHECK_ENV)
    with pytest.raises(peft_compat.PeftVersionError):
        peft_compat.register_tuner(NAME, DummyConfig, DummyModel, prefix=PREFIX)


def test_lifecycle_save_load_merge_disable(tmp_path):
    from peft import PeftConfig, PeftModel

    pm, x, base_logits, init_logits, out = _trained(tmp_path)
    torch.testing.assert_close(init_logits, base_logits, rtol=0, atol=0)  # B = 0 at init
    trained = _logits(pm, x)
    assert (trained - base_logits).abs().max() > 1e-4

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == NAME.upper()
    keys = set(load_tensors(out / "adapter_model.safetensors"))
    assert keys and all(PREFIX in k for k in keys) and not any(".default" in k for k in keys)
    assert isinstance(PeftConfig.from_pretrained(str(out)), DummyConfig)

    loaded = PeftModel.from_pretrained(tiny_llama(), str(out))
    assert isinstance(loaded.peft_config["default"], DummyConfig)
    torch.testing.assert_close(_logits(loaded, x), trained, rtol=0, atol=0)

    with loaded.disable_adapter():
        torch.testing.assert_close(_logits(loaded, x), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(_logits(loaded, x), trained, rtol=0, atol=0)

    merged = loaded.merge_and_unload()
    assert not any(PREFIX in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, x), trained, rtol=1e-4, atol=1e-5)


def test_state_dict_helpers_roundtrip(tmp_path):
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    pm, x, *_ = _trained(tmp_path)
    sd = get_peft_model_state_dict(pm)
    fresh = get_peft_model(tiny_llama(), DummyConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
    result = set_peft_model_state_dict(fresh, sd)
    assert not result.unexpected_keys
    torch.testing.assert_close(_logits(fresh, x), _logits(pm, x), rtol=0, atol=0)


def test_load_in_fresh_process(tmp_path):
    pm, x, *_ = _trained(tmp_path)
    expected = _logits(pm, x)
    result_file = tmp_path / "fresh.safetensors"
    script = textwrap.dedent(
        f"""
        import torch
        torch.set_num_threads(1)
        import adapterlab
        import tests._dummy_tuner  # registers the test tuner, as `import adapterlab` does for its own
        from peft import PeftModel
        from adapterlab.io import save_tensors
        from adapterlab.models import tiny_llama
        g = torch.Generator().manual_seed(0)
        x = torch.randint(3, 128, (2, 12), generator=g)
        model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r})
        assert type(model.peft_config["default"]).__name__ == "DummyConfig"
        model.eval()
        with torch.no_grad():
            logits = model(x).logits
        save_tensors({str(result_file)!r}, {{"logits": logits}})
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_tensors(result_file)["logits"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_mixed_compatible_registration():
    from peft.mapping import PEFT_TYPE_TO_MIXED_MODEL_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    mixed_model = type("MixedDummyModel", (DummyModel,), {"prefix": "aldummymix_"})
    member = peft_compat.register_tuner(
        "adapterlab_dummy_mixed", DummyConfig, mixed_model, prefix="aldummymix_", is_mixed_compatible=True
    )
    assert PEFT_TYPE_TO_MIXED_MODEL_MAPPING[member] is mixed_model
    assert PEFT_TYPE_TO_PREFIX_MAPPING[member] == "aldummymix_"
    assert peft_compat.peft_type("adapterlab_dummy_mixed") is member
    with pytest.raises(ValueError, match="unknown PEFT type"):
        peft_compat.peft_type("adapterlab_nope")


def test_plain_import_adapterlab_then_peft_loads_an_adapterlab_adapter(tmp_path):
    """The user's order in a fresh process: ``import adapterlab`` (which imports no peft), then
    ``from peft import PeftModel`` (which registers the tuners), then ``PeftModel.from_pretrained``
    on an adapterlab SHiRA adapter, with nothing else of adapterlab imported before peft."""
    from peft import get_peft_model

    from adapterlab import ShiraConfig

    torch.manual_seed(0)
    pm = get_peft_model(tiny_llama(), ShiraConfig(r=2, mask_type="random", target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():
        for p in (p for p in pm.parameters() if p.requires_grad):
            p.normal_(0, 0.05)  # a nonzero adapter: the load below must reproduce it, not the base
    x = _batch()
    expected = _logits(pm, x)
    assert (expected - _logits(tiny_llama(), x)).abs().max() > 1e-4
    pm.save_pretrained(tmp_path / "adapter")
    result_file = tmp_path / "fresh.safetensors"
    script = textwrap.dedent(
        f"""
        import sys
        import adapterlab
        assert "peft" not in sys.modules and "adapterlab.tuners" not in sys.modules, "import adapterlab is not lazy"
        from peft import PeftModel
        assert "adapterlab.tuners" in sys.modules, "import peft did not register adapterlab's tuners"
        import torch
        torch.set_num_threads(1)
        from adapterlab.io import save_tensors
        from adapterlab.models import tiny_llama
        x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
        model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r}).eval()
        assert type(model.peft_config["default"]).__module__ == "adapterlab.tuners.shira.config"
        with torch.no_grad():
            save_tensors({str(result_file)!r}, {{"logits": model(x).logits}})
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_tensors(result_file)["logits"], expected, rtol=1e-5, atol=1e-6)
