"""Folder-to-folder jobs shared by the CLI and the pipeline runner.

Each job validates everything first (no weights loaded, nothing written), then loads, runs and
writes its output folder staged (nothing partial on error), and returns a result object. Jobs take
a :data:`~adapterlab.progress.ProgressFactory` instead of drawing progress bars, and print nothing:
the CLI verbs (``adapterlab prune / merge / extract``) turn their results into tables, the pipeline
runner (``adapterlab run``) into step outputs.

* :mod:`adapterlab.jobs.prune` — :func:`prune_folder` (``check_prune`` + ``run_prune``)
* :mod:`adapterlab.jobs.merge` — :func:`merge_folder` (``check_merge`` + ``run_merge`` + ``put_merge``),
  the merge YAML schema :class:`MergeConfig`
* :mod:`adapterlab.jobs.extract` — :func:`extract_folder` (``check_extract`` + ``run_extract`` + ``put_extract``)
* :mod:`adapterlab.jobs.export` — :func:`export_lora` (``check_export`` + ``run_export`` + ``put_export``): any
  adapter as a servable PEFT LoRA
* :mod:`adapterlab.jobs.check` — :func:`check_vllm`: the pre-flight of an adapter folder for vLLM
"""

from __future__ import annotations

from adapterlab.jobs.check import check_vllm
from adapterlab.jobs.export import ExportJobResult, ExportPlan, check_export, export_lora, put_export, run_export
from adapterlab.jobs.extract import (
    ExtractJobResult,
    ExtractPlan,
    check_extract,
    extract_folder,
    put_extract,
    run_extract,
)
from adapterlab.jobs.merge import (
    MergeConfig,
    MergeJobResult,
    MergePlan,
    check_merge,
    load_config,
    merge_folder,
    put_merge,
    run_merge,
)
from adapterlab.jobs.prune import PruneJobResult, PrunePlan, check_prune, prune_folder, run_prune

__all__ = [
    "ExportJobResult",
    "ExportPlan",
    "ExtractJobResult",
    "ExtractPlan",
    "MergeConfig",
    "MergeJobResult",
    "MergePlan",
    "PruneJobResult",
    "PrunePlan",
    "check_export",
    "check_extract",
    "check_merge",
    "check_prune",
    "check_vllm",
    "export_lora",
    "extract_folder",
    "load_config",
    "merge_folder",
    "prune_folder",
    "put_export",
    "put_extract",
    "put_merge",
    "run_export",
    "run_extract",
    "run_merge",
    "run_prune",
]
