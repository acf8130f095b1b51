"""Shared helpers for recipe / CLI tests: a tiny base folder, small train recipes, a fake registry."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml


def tiny_base(folder: Path) -> Path:
    """tiny_llama + the character tokenizer saved as a model folder (what `base:` points at)."""
    from adapterlab.models import tiny_llama, tiny_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_llama().save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def train_dict(base: str | Path, output: str | Path, **over: Any) -> dict[str, Any]:
    """A train recipe that runs in about a second on the tiny base."""
    d: dict[str, Any] = {
        "base": str(base),
        "adapter": {"method": "lora", "params": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"task": "sentiment", "max_examples": 16, "max_length": 48},
        "trainer": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1},
        "eval": {"n": 8, "zero_shot": True},
        "output": str(output),
    }
    for key, value in over.items():
        node = d
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = copy.deepcopy(value)
    return d


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


class FakeRegistry:
    """Records put calls the way AdapterRegistry.put is called (contract: returns a digest)."""

    def __init__(self) -> None:
        self.puts: list[dict[str, Any]] = []

    def put(self, src, name=None, *, provenance=None, base=None, tags=()):
        self.puts.append(
            {
                "src": Path(src),
                "name": name,
                "provenance": provenance,
                "base": base,
                "tags": tuple(tags),
                "files": sorted(p.name for p in Path(src).iterdir()),
            }
        )
        return f"{len(self.puts):064x}"

    def resolve(self, ref):
        for i, p in enumerate(self.puts):
            if p["name"] == ref:
                return f"{i + 1:064x}"
        raise KeyError(f"unknown adapter ref {ref!r}")
