"""adapterlab: adapters for sparse and quantized language models.

Importing this package registers every adapterlab tuner with peft (see ``peft_compat``), so
``PeftModel.from_pretrained`` loads adapterlab adapters after ``import adapterlab``.
"""

from __future__ import annotations

__version__ = "0.1.0"

import adapterlab.tuners  # noqa: F401  (registers every adapterlab tuner with peft)

# adapter methods (peft configs) and SHiRA switching
from adapterlab.tuners import DyLoraConfig, LoriConfig
from adapterlab.tuners.lors import LorsConfig
from adapterlab.tuners.shira import ShiraConfig, fuse_adapters, load_shira, switch_adapter, unfuse_adapters
from adapterlab.tuners.snell import SnellConfig
from adapterlab.tuners.spp import SppConfig

# bases: models, pruning, quantization, evaluation
from adapterlab.evaluate import perplexity, sparsity_report, task_accuracy
from adapterlab.models import load_default_model, load_model, load_tokenizer, tiny_llama
from adapterlab.pruning import PruneReport, apply_masks_, get_masks, prune_
from adapterlab.quant import load_quantized
from adapterlab.retrain import perp_, run_perp_pipeline

# merging, extraction, compression
from adapterlab.compression import CompressionErrors, SharedBasisBundle, compress_adapters
from adapterlab.extraction import ExtractResult, extract_lora
from adapterlab.merging import MergeResult, RMMBundle, merge_adapters, resolve_adapter
from adapterlab.merging.into_base import merge

# registry and serving
from adapterlab.registry import AdapterRegistry, BaseMismatchError, RefNotFoundError
from adapterlab.serving import AdapterServer, Completion, Request, UnknownAdapterError

__all__ = [
    # adapter methods
    "DyLoraConfig",
    "LoriConfig",
    "LorsConfig",
    "ShiraConfig",
    "SnellConfig",
    "SppConfig",
    "fuse_adapters",
    "load_shira",
    "switch_adapter",
    "unfuse_adapters",
    # bases
    "PruneReport",
    "apply_masks_",
    "get_masks",
    "load_default_model",
    "load_model",
    "load_quantized",
    "load_tokenizer",
    "perp_",
    "perplexity",
    "prune_",
    "run_perp_pipeline",
    "sparsity_report",
    "task_accuracy",
    "tiny_llama",
    # merging, extraction, compression
    "CompressionErrors",
    "ExtractResult",
    "MergeResult",
    "RMMBundle",
    "SharedBasisBundle",
    "compress_adapters",
    "extract_lora",
    "merge",
    "merge_adapters",
    "resolve_adapter",
    # registry and serving
    "AdapterRegistry",
    "AdapterServer",
    "BaseMismatchError",
    "Completion",
    "RefNotFoundError",
    "Request",
    "UnknownAdapterError",
]
