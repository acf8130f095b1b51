"""Merge LoRA adapter folders into one output folder: the job behind ``adapterlab merge`` and the
pipeline's merge step.

The merge config (a YAML file, see ``recipes/merge/``) is the :class:`MergeConfig` schema (unknown
keys are errors). :func:`check_merge` validates the config, the method's params, the output folder,
the registry options and every adapter (shapes and base compatibility) and loads no weights of the
base; :func:`run_merge` merges and writes the output staged (with the base's tokenizer for
``format: full``); :func:`put_merge` puts the written adapter into the registry with its provenance.
:func:`merge_folder` does all three.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from adapterlab.config import apply_set, format_validation_error, read_yaml_mapping
from adapterlab.jobs._put import put_folder
from adapterlab.progress import ProgressFactory

logger = logging.getLogger(__name__)

__all__ = [
    "DTYPES",
    "AdapterEntry",
    "MergeConfig",
    "MergeJobResult",
    "MergePlan",
    "OutputSpec",
    "check_merge",
    "load_config",
    "merge_folder",
    "put_merge",
    "run_merge",
]

DTYPES = ("float32", "float16", "bfloat16")


class AdapterEntry(BaseModel):
    """One adapter: a PEFT LoRA folder or ``hub:NAME``, with an optional weight and task name."""

    model_config = ConfigDict(extra="forbid")
    path: str
    weight: float | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: None: chosen from the inputs (``shira`` for SHiRA adapters, ``lori`` for LoRI adapters merged
    #: with linear / task_arithmetic, ``lora`` otherwise).
    format: Literal["lora", "sparse", "full", "shira", "lori"] | None = None
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    #: ``format: full`` only: mask the merge by the base's zeros (a pruned base stays pruned, verified).
    keep_sparsity: StrictBool = False

    @field_validator("keep_sparsity")
    @classmethod
    def _keep_sparsity_needs_full(cls, value: bool, info: ValidationInfo) -> bool:
        fmt = info.data.get("format")
        if value and fmt != "full":
            raise ValueError(f"applies to format: full only (a merge into the base), not {fmt!r}")
        return value


class MergeConfig(BaseModel):
    """The merge YAML schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")
    method: str
    adapters: list[AdapterEntry] = Field(min_length=1)
    base: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    output: OutputSpec = Field(default_factory=OutputSpec)
    factorwise: bool = False
    check_base: bool = True


def _validate_config(raw: dict[str, Any], source: str) -> MergeConfig:
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, source)) from None


def load_config(path: str | os.PathLike[str], sets: list[str] | None = None) -> MergeConfig:
    """Read and validate a merge YAML, applying ``--set KEY=VALUE`` overrides; errors name the file and the key path."""
    path = Path(path)
    raw = read_yaml_mapping(path, kind="config", expected="expected a mapping with method, adapters, params, output")
    for s in sets or []:
        apply_set(raw, s)
    return _validate_config(raw, str(path))


def _adapter_ref(entry: AdapterEntry, config_dir: Path) -> str:
    """The entry's path as given when it exists (or is a ``hub:`` ref / absolute), else next to the config."""
    path = entry.path
    if path.startswith("hub:") or Path(path).is_absolute() or Path(path).exists():
        return path
    alt = config_dir / path
    return str(alt) if alt.exists() else path


@dataclass
class MergePlan:
    """A validated merge job (see :func:`check_merge`): the config, the resolved adapters, the output.

    Attributes:
        config: the validated merge config.
        source: the config's name in error messages and provenance (its file path).
        output: the folder to write.
        sources: the resolved adapters (``LoraSource``), names made unique.
        weights: one weight per adapter, or None (the method's default).
        shapes: every module in the union of the adapters, with its ``(d_out, d_in)``.
    """

    config: MergeConfig
    source: str
    output: Path
    overwrite: bool
    sources: list[Any]
    weights: list[float] | None
    shapes: dict[str, Any]
    put: str | None = None
    hub: Path | None = None

    def adapters(self) -> list[dict[str, Any]]:
        """One row per adapter for a plan / dry run: name, weight (None: unweighted), modules, ranks."""
        return [
            {
                "name": s.name,
                "weight": None if self.weights is None else self.weights[i],
                "modules": len(s.modules),
                "ranks": sorted({m.rank for m in s.modules.values()}),
            }
            for i, s in enumerate(self.sources)
        ]


@dataclass
class MergeJobResult:
    """What :func:`run_merge` wrote: the folder and the library's ``MergeResult``;
    ``digest`` is set by :func:`put_merge`."""

    output: Path
    result: Any
    digest: str | None = field(default=None)


def check_merge(
    config: MergeConfig | dict[str, Any] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    sets: list[str] | None = None,
    overwrite: bool = False,
    put: str | None = None,
    hub: str | os.PathLike[str] | None = None,
    source: str | None = None,
    config_dir: str | os.PathLike[str] | None = None,
) -> MergePlan:
    """Validate a merge job; reads the adapters' configs and shapes, loads no base weights (except for
    ``format: full`` with registry adapters that recorded a base: the base is fingerprinted to compare).

    Args:
        config: a merge YAML file, a :class:`MergeConfig`, or a mapping of the same keys.
        output: the folder to write.
        sets: ``KEY=VALUE`` overrides applied to a YAML file's content (``--set``).
        overwrite: replace a non-empty ``output``.
        put: also put the merged adapter into the registry under this name (see :func:`put_merge`).
        hub: the registry root for ``put`` and ``hub:`` adapter refs (None: ``$ADAPTERLAB_HUB`` or ``./hub``
            for ``put``; the default registry for refs).
        source: the config's name in error messages (default: the file path, else ``merge config``).
        config_dir: where relative adapter paths are looked up after the current folder (default:
            the YAML file's folder, else the current folder).

    Raises:
        ValueError / FileNotFoundError / FileExistsError: one line naming the source and the key path.
    """
    from adapterlab.adapters import check_compatible
    from adapterlab.merging import MERGERS, resolve_adapter
    from adapterlab.staging import check_output_dir

    if isinstance(config, MergeConfig):
        cfg = config
        source = source or "merge config"
    elif isinstance(config, dict):
        raw = dict(config)
        for s in sets or []:
            apply_set(raw, s)
        source = source or "merge config"
        cfg = _validate_config(raw, source)
    else:
        path = Path(config)
        cfg = load_config(path, sets)
        source = source or str(path)
        config_dir = path.parent if config_dir is None else config_dir
    where_dir = Path(config_dir) if config_dir is not None else Path()
    # --- validate everything before loading weights ----------------------------------------
    try:
        merger_cls = MERGERS.get(cfg.method)
    except ValueError as exc:
        raise ValueError(f"{source}: method: {exc}") from None
    try:
        merger_cls.from_params(cfg.params)  # unknown / out-of-range params -> "params.<key>: ..."
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    check_output_dir(output, overwrite)
    registry = None
    if put is not None or hub is not None:
        from adapterlab.registry import AdapterRegistry
        from adapterlab.registry.manifest import check_name

        registry = AdapterRegistry(hub)
    if put is not None:
        check_name(put, "--put")
        if cfg.method == "rmm" or cfg.output.format not in (None, "lora", "shira", "lori"):
            raise ValueError(
                f"--put {put}: only an adapter output (output.format: lora, shira or lori; not sparse, "
                f"full or rmm) can go into the registry"
            )
    sources = []
    weights: list[float | None] = []
    seen: set[str] = set()
    for i, entry in enumerate(cfg.adapters):
        src = resolve_adapter(
            _adapter_ref(entry, where_dir), name=entry.name, where=f"{source}: adapters.{i}", registry=registry
        )
        if src.name in seen:
            src.name = f"{src.name}_{i}"
        seen.add(src.name)
        sources.append(src)
        weights.append(entry.weight)
    given = [w is not None for w in weights]
    if any(given) and not all(given):
        raise ValueError(f"{source}: adapters.{given.index(False)}.weight: give a weight for every adapter or for none")
    shapes = check_compatible(sources, check_base=cfg.check_base)
    if cfg.output.format == "full" and cfg.base is not None and any(s.recorded_base for s in sources):
        # a hub: adapter put with --base wants that base: refuse another one here, not after a dry run passed
        from transformers.utils import logging as hf_logging

        from adapterlab.adapters import check_recorded_bases
        from adapterlab.models import load_model

        shown = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a check, not the work: no "Loading weights" bar
        try:
            model = load_model(cfg.base)
        finally:
            if shown:
                hf_logging.enable_progress_bar()
        check_recorded_bases(sources, model)
    return MergePlan(
        config=cfg,
        source=source,
        output=Path(output),
        overwrite=overwrite,
        sources=sources,
        weights=[float(w) for w in weights if w is not None] if any(given) else None,
        shapes=shapes,
        put=put,
        hub=None if hub is None else Path(hub),
    )


def run_merge(plan: MergePlan, *, progress: ProgressFactory | None = None) -> MergeJobResult:
    """Merge and write the output folder staged (``format: full`` with a base: the base's tokenizer too).

    The merge's notes are in ``result.result.warnings`` (not logged here).
    """
    import torch

    from adapterlab.merging import merge_adapters

    cfg = plan.config
    dtype = getattr(torch, cfg.output.dtype) if cfg.output.dtype else None
    kwargs: dict[str, Any] = dict(cfg.params)
    if cfg.method != "rmm":
        kwargs.update(
            output=cfg.output.format,
            rank=cfg.output.rank,
            energy=cfg.output.energy,
            factorwise=cfg.factorwise,
            keep_sparsity=cfg.output.keep_sparsity,
        )
    result = merge_adapters(
        plan.sources,
        cfg.method,
        weights=plan.weights,
        base=cfg.base,
        dtype=dtype,
        check_base=cfg.check_base,
        progress=progress,
        **kwargs,
    )
    tokenizer = None
    if cfg.output.format == "full" and cfg.base is not None:
        from adapterlab.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.base)
        except Exception as exc:  # a base folder without tokenizer files: save the model alone
            logger.warning("no tokenizer saved with the merged model: %s", str(exc).splitlines()[0])
    result.save(plan.output, overwrite=plan.overwrite, tokenizer=tokenizer)
    return MergeJobResult(output=plan.output, result=result)


def put_merge(plan: MergePlan, job: MergeJobResult) -> str | None:
    """Put the written adapter into the registry under ``plan.put`` (None: no put); returns the digest."""
    if plan.put is None:
        return None
    cfg = plan.config
    fp = None
    if cfg.base is not None:
        from adapterlab.io import base_fingerprint
        from adapterlab.models import load_model

        fp = base_fingerprint(load_model(cfg.base))
    provenance = {
        "kind": "merged",
        "parents": [e.path for e in cfg.adapters],
        "parents_sha256": [s.sha256 for s in plan.sources],
        "recipe": {"path": plan.source, "config": cfg.model_dump(mode="json")},
    }
    job.digest = put_folder(plan.hub, job.output, plan.put, provenance, base=fp)
    return job.digest


def merge_folder(
    config: MergeConfig | dict[str, Any] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    sets: list[str] | None = None,
    overwrite: bool = False,
    put: str | None = None,
    hub: str | os.PathLike[str] | None = None,
    source: str | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    progress: ProgressFactory | None = None,
) -> MergeJobResult:
    """Merge the adapters a merge config names and write the result to ``output``.

    Everything is checked first (:func:`check_merge`); on an error nothing is written. With
    ``put``, the merged adapter also goes into the registry (:func:`put_merge`).
    """
    plan = check_merge(
        config,
        output,
        sets=sets,
        overwrite=overwrite,
        put=put,
        hub=hub,
        source=source,
        config_dir=config_dir,
    )
    job = run_merge(plan, progress=progress)
    put_merge(plan, job)
    return job
