"""transformers ``TrainerCallback`` s for adapterlab's methods, one per file."""

from __future__ import annotations

from adapterlab.callbacks.dylora import DyLoraCallback
from adapterlab.callbacks.lori import LoriCallback, swap_optimizer_params_

__all__ = ["DyLoraCallback", "LoriCallback", "swap_optimizer_params_"]
