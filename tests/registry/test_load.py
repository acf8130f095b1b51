"""AdapterRegistry.load: hash checks, base-fingerprint refusal, adding to an existing PeftModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adapterlab.io import base_fingerprint
from adapterlab.models import tiny_llama
from adapterlab.registry import AdapterRegistry, BaseMismatchError
from tests.registry._helpers import lora_dir

X = torch.arange(12).reshape(1, 12) % 128


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterRegistry, list[Path]]:
    tmp = tmp_path_factory.mktemp("load")
    dirs = [lora_dir(tmp / f"t{i}", seed=10 + i) for i in range(2)]
    reg = AdapterRegistry(tmp / "hub")
    base = tiny_llama(hidden_size=32)
    base.config._name_or_path = "tiny/base-32"
    reg.put(dirs[0], "t0", base=base)
    reg.put(dirs[1], "t1", base=base_fingerprint(base))
    reg.put(dirs[1], "nobase-t1")  # same files: same object, first manifest (with base) kept
    return reg, dirs


def test_load_equals_peft_from_pretrained(setup: tuple[AdapterRegistry, list[Path]]) -> None:
    from peft import PeftModel

    reg, dirs = setup
    want = PeftModel.from_pretrained(tiny_llama(hidden_size=32), str(dirs[0]))(input_ids=X).logits
    got = reg.load("t0", tiny_llama(hidden_size=32))
    assert torch.equal(got(input_ids=X).logits, want)
    # precomputed fingerprint of the same model: same result, no recomputation needed
    model = tiny_llama(hidden_size=32)
    fp = base_fingerprint(model)
    assert torch.equal(reg.load("t0", model, fingerprint=fp)(input_ids=X).logits, want)


def test_load_adds_to_an_existing_peft_model(setup: tuple[AdapterRegistry, list[Path]]) -> None:
    from peft import PeftModel

    reg, dirs = setup
    pm = reg.load("t0", tiny_llama(hidden_size=32))
    assert reg.load("hub:t1", pm) is pm and set(pm.peft_config) == {"default", "t1"}
    pm.set_adapter("t1")
    want = PeftModel.from_pretrained(tiny_llama(hidden_size=32), str(dirs[1]))(input_ids=X).logits
    assert torch.equal(pm(input_ids=X).logits, want)
    with pytest.raises(ValueError, match="already has an adapter 't1'"):
        reg.load("t1", pm)


def test_other_base_is_refused_naming_the_wanted_base(setup: tuple[AdapterRegistry, list[Path]]) -> None:
    reg, _ = setup
    pruned = tiny_llama(hidden_size=32)
    with torch.no_grad():
        pruned.model.layers[0].mlp.down_proj.weight[:, :3] = 0.0  # same shapes, other zero mask
    with pytest.raises(BaseMismatchError, match=r"made for base 'tiny/base-32'.*differ in sparsity pattern"):
        reg.load("t0", pruned)
    other = tiny_llama(hidden_size=32, num_hidden_layers=3)
    with pytest.raises(BaseMismatchError, match=r"'tiny/base-32'.*differ in weight shapes"):
        reg.load("t1", other)
    # a fine-tune of the base (dense values changed, same mask) is the same base
    tuned = tiny_llama(hidden_size=32, seed=5)
    assert reg.load("t0", tuned) is not None


def test_adapter_without_recorded_base_loads_anywhere(tmp_path: Path) -> None:
    reg = AdapterRegistry(tmp_path / "hub")
    reg.put(lora_dir(tmp_path / "a", seed=1), "a")
    assert reg.show("a")["base"] is None
    reg.check_base("a", tiny_llama(hidden_size=32, num_hidden_layers=3))  # nothing to compare
