"""adapterlab: adapters for sparse and quantized language models.

After ``import adapterlab``, peft knows every adapterlab tuner: ``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained`` and ``get_peft_model`` work for their adapters in any process.

The import itself is cheap (no torch, transformers, peft or bitsandbytes): the public names below
are imported from their modules on first access (PEP 562 ``__getattr__``; ``from adapterlab import
ShiraConfig`` works as always), and the tuners are registered with peft by the time ``import peft``
returns, or at once if peft is already imported (see ``adapterlab._lazy`` for why a post-import
hook on ``peft``). The CLI (``adapterlab.cli.app``) relies on this to start without the
heavy stack. ``adapterlab._quiet`` filters two pieces of third-party start-up noise (one exact
bitsandbytes log line and one exact transformers FutureWarning) and nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterlab import _lazy, _quiet
from adapterlab._version import __version__ as __version__

_quiet.install()  # before anything imports bitsandbytes (``import peft`` does)

#: public name -> the module that defines it (imported on first access).
_EXPORTS: dict[str, str] = {
    # adapter methods (peft configs) and SHiRA switching
    "DyLoraConfig": "adapterlab.tuners",
    "LoriConfig": "adapterlab.tuners",
    "LorsConfig": "adapterlab.tuners.lors",
    "ShiraConfig": "adapterlab.tuners.shira",
    "fuse_adapters": "adapterlab.tuners.shira",
    "load_shira": "adapterlab.tuners.shira",
    "switch_adapter": "adapterlab.tuners.shira",
    "unfuse_adapters": "adapterlab.tuners.shira",
    "SnellConfig": "adapterlab.tuners.snell",
    "SppConfig": "adapterlab.tuners.spp",
    # bases: models, pruning, quantization, evaluation
    "perplexity": "adapterlab.evaluate",
    "sparsity_report": "adapterlab.evaluate",
    "task_accuracy": "adapterlab.evaluate",
    "load_default_model": "adapterlab.models",
    "load_model": "adapterlab.models",
    "load_tokenizer": "adapterlab.models",
    "tiny_llama": "adapterlab.models",
    "PruneReport": "adapterlab.pruning",
    "apply_masks_": "adapterlab.pruning",
    "get_masks": "adapterlab.pruning",
    "prune_": "adapterlab.pruning",
    "load_quantized": "adapterlab.quant",
    "perp_": "adapterlab.retrain",
    "run_perp_pipeline": "adapterlab.retrain",
    # merging, extraction, compression
    "CompressionErrors": "adapterlab.compression",
    "SharedBasisBundle": "adapterlab.compression",
    "compress_adapters": "adapterlab.compression",
    "export_lora": "adapterlab.jobs.export",
    "compensate": "adapterlab.extraction",
    "ExtractResult": "adapterlab.extraction",
    "extract_lora": "adapterlab.extraction",
    "MergeResult": "adapterlab.merging",
    "RMMBundle": "adapterlab.merging",
    "merge_adapters": "adapterlab.merging",
    "resolve_adapter": "adapterlab.merging",
    "merge": "adapterlab.folding",
    # registry and serving
    "AdapterRegistry": "adapterlab.registry",
    "BaseMismatchError": "adapterlab.registry",
    "RefNotFoundError": "adapterlab.registry",
    "AdapterServer": "adapterlab.serving",
    "Completion": "adapterlab.serving",
    "Request": "adapterlab.serving",
    "UnknownAdapterError": "adapterlab.serving",
}

if TYPE_CHECKING:  # static analysers and IDEs see the names as plain imports
    # adapter methods (peft configs) and SHiRA switching
    # merging, extraction, compression
    from adapterlab.compression import CompressionErrors, SharedBasisBundle, compress_adapters

    # bases: models, pruning, quantization, evaluation
    from adapterlab.evaluate import perplexity, sparsity_report, task_accuracy
    from adapterlab.extraction import ExtractResult, compensate, extract_lora
    from adapterlab.folding import merge
    from adapterlab.jobs.export import export_lora
    from adapterlab.merging import MergeResult, RMMBundle, merge_adapters, resolve_adapter
    from adapterlab.models import load_default_model, load_model, load_tokenizer, tiny_llama
    from adapterlab.pruning import PruneReport, apply_masks_, get_masks, prune_
    from adapterlab.quant import load_quantized

    # registry and serving
    from adapterlab.registry import AdapterRegistry, BaseMismatchError, RefNotFoundError
    from adapterlab.retrain import perp_, run_perp_pipeline
    from adapterlab.serving import AdapterServer, Completion, Request, UnknownAdapterError
    from adapterlab.tuners import DyLoraConfig, LoriConfig
    from adapterlab.tuners.lors import LorsConfig
    from adapterlab.tuners.shira import ShiraConfig, fuse_adapters, load_shira, switch_adapter, unfuse_adapters
    from adapterlab.tuners.snell import SnellConfig
    from adapterlab.tuners.spp import SppConfig

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
    "compensate",
    "compress_adapters",
    "export_lora",
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


def __getattr__(name: str) -> Any:
    return _lazy.lazy_getattr(__name__, _EXPORTS, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_lazy.register_tuners_with_peft()
