"""The server reads adapter_config.json through the one config schema: a garbage value is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterlab.serving import AdapterServer
from tests.merging._helpers import make_lora_dirs
from tests.serving._helpers import base_model


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_alpha", None, "key 'lora_alpha' is None; it must be a finite number"),
        ("r", "four", "key 'r' is 'four'; it must be a positive integer"),
    ],
)
def test_a_bad_config_value_is_one_line_and_nothing_loads(tmp_path: Path, key: str, value: object, message: str):
    (folder,) = make_lora_dirs(tmp_path, 1, hidden_size=64)
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
    server = AdapterServer(base_model(), capacity=2)
    with pytest.raises(ValueError) as info:
        server.load("x", folder)
    text = str(info.value)
    assert "\n" not in text and text.startswith("adapter 'x': ") and message in text, text
    assert server.loaded() == []
