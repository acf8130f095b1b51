"""adapterlab's peft tuners; importing this package registers each one with peft.

Adding a tuner: a sub-package ``<method>/`` (config.py, layer.py, model.py) that calls
``adapterlab.peft_compat.register_tuner`` in its ``__init__``, plus one import line here.
"""

from __future__ import annotations

from adapterlab.tuners import dylora, lori  # noqa: F401  (registers the tuners with peft)
from adapterlab.tuners._lowrank import lowrank_scale, write_lora_dir
from adapterlab.tuners.dylora import DyLoraConfig, DyLoraModel
from adapterlab.tuners.lori import LoriConfig, LoriModel

__all__ = ["DyLoraConfig", "DyLoraModel", "LoriConfig", "LoriModel", "lowrank_scale", "write_lora_dir"]
