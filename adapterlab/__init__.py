"""adapterlab: adapters for sparse and quantized language models.

Importing this package registers every adapterlab tuner with peft (see ``peft_compat``).
"""

from __future__ import annotations

__version__ = "0.1.0"

from adapterlab.extraction import ExtractResult, extract_lora
from adapterlab.merging import MergeResult, RMMBundle, merge_adapters, resolve_adapter
import adapterlab.tuners  # noqa: F401  (registers every adapterlab tuner with peft)
from adapterlab.tuners import DyLoraConfig, LoriConfig
from adapterlab.evaluate import perplexity, sparsity_report, task_accuracy
from adapterlab.models import load_default_model, load_model, load_tokenizer, tiny_llama
from adapterlab.pruning import PruneReport, apply_masks_, get_masks, prune_
from adapterlab.quant import load_quantized

__all__ = [
    "DyLoraConfig",
    "LoriConfig",
    "ExtractResult",
    "MergeResult",
    "RMMBundle",
    "extract_lora",
    "merge_adapters",
    "resolve_adapter",
    "PruneReport",
    "apply_masks_",
    "get_masks",
    "load_default_model",
    "load_model",
    "load_quantized",
    "load_tokenizer",
    "perplexity",
    "prune_",
    "sparsity_report",
    "task_accuracy",
    "tiny_llama",
]
