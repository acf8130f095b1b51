"""transformers ``TrainerCallback`` s for adapterlab's methods, one per file."""

from __future__ import annotations

from adapterlab.callbacks.dylora import DyLoraCallback
from adapterlab.callbacks.logger import SparsityRankLogger
from adapterlab.callbacks.lori import LoriCallback, swap_optimizer_params_
from adapterlab.callbacks.mask_keeper import MaskKeeperCallback
from adapterlab.callbacks.shira import ShiraMaskCallback
from adapterlab.callbacks.snell import SnellCallback

__all__ = [
    "DyLoraCallback",
    "LoriCallback",
    "MaskKeeperCallback",
    "ShiraMaskCallback",
    "SnellCallback",
    "SparsityRankLogger",
    "swap_optimizer_params_",
]
