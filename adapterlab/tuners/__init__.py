"""adapterlab's peft tuners; importing this package registers each one with peft.

Adding a tuner: a sub-package ``<method>/`` (config.py, layer.py, model.py) that calls
``adapterlab.peft_compat.register_tuner`` in its ``__init__``, plus one import line here.
"""

from __future__ import annotations

from adapterlab.tuners import dylora, lori, lors, shira, snell, spp  # noqa: F401  (each registers with peft)
from adapterlab.tuners._lowrank import lowrank_scale, write_lora_dir
from adapterlab.tuners._saving import save_adapter
from adapterlab.tuners.dylora import DyLoraConfig, DyLoraModel
from adapterlab.tuners.lori import LoriConfig, LoriModel
from adapterlab.tuners.lors import LorsConfig, LorsModel
from adapterlab.tuners.shira import ShiraConfig, ShiraModel
from adapterlab.tuners.snell import SnellConfig, SnellModel
from adapterlab.tuners.spp import SppConfig, SppModel

__all__ = [
    "DyLoraConfig",
    "DyLoraModel",
    "LoriConfig",
    "LoriModel",
    "LorsConfig",
    "LorsModel",
    "ShiraConfig",
    "ShiraModel",
    "SnellConfig",
    "SnellModel",
    "SppConfig",
    "SppModel",
    "lowrank_scale",
    "save_adapter",
    "write_lora_dir",
]
