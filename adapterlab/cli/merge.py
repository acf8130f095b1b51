"""`adapterlab merge CONFIG.yaml -o OUT`: merge LoRA adapters (linear, task arithmetic, TIES, DARE, RMM)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import typer
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
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

logger = logging.getLogger(__name__)

HELP = (
    "Merge LoRA adapters of one base as dense deltas with linear, task_arithmetic, ties, dare_linear, "
    "dare_ties or rmm, described by a YAML file (method, adapters with weights, params, output; "
    "examples in recipes/merge/). Writes a PEFT LoRA folder of a chosen rank (retained energy reported "
    "per module), a sparse delta, a full merged model (output.keep_sparsity: true keeps a pruned base's "
    "zeros), or an RMM bundle to OUTPUT. Relative adapter "
    "paths are looked up in the current folder, then next to the YAML file."
)

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


def _parse_value(text: str, key: str = "") -> Any:
    """A ``--set`` value parsed with YAML's safe loader (tags such as ``!!python/...`` are refused).

    Raises:
        ValueError: one line naming the key and the value when it is not valid (safe) YAML.
    """
    import yaml

    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = (getattr(exc, "problem", None) or str(exc).splitlines()[0]).strip()
        raise ValueError(
            f"--set {key}={text}: the value is not valid YAML ({reason}); quote it to pass a string, "
            f"e.g. {key}='{text}'"
        ) from None


def apply_set(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``--set a.b.0.c=value`` (value parsed as YAML) to the raw config dict."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected KEY=VALUE, e.g. params.density=0.3")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise ValueError(f"--set {assignment!r}: bad key {key!r}")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        path = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"--set {key}: {path!r} is not an index of a list of {len(node)}")
            idx = int(part)
            if last:
                node[idx] = _parse_value(value, key.strip())
            else:
                if isinstance(node[idx], str) and parts[i + 1] in ("path", "weight", "name"):
                    node[idx] = {"path": node[idx]}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = _parse_value(value, key.strip())
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"--set {key}: {'.'.join(parts[:i])!r} is a value, not a mapping or list")


def _format_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{source}: {loc or '(top level)'}: {msg}"


def load_config(path: Path, sets: list[str] | None = None) -> MergeConfig:
    """Read and validate a merge YAML; errors name the file and the key path."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with method, adapters, params, output")
    for s in sets or []:
        apply_set(raw, s)
    try:
        return MergeConfig.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_format_error(exc, str(path))) from None


def _adapter_ref(entry: AdapterEntry, config_dir: Path) -> str:
    path = entry.path
    if path.startswith("hub:") or Path(path).is_absolute() or Path(path).exists():
        return path
    alt = config_dir / path
    return str(alt) if alt.exists() else path


def _summary(result: Any, output: Path, limit: int = 40) -> Table:
    table = Table(title=f"adapterlab merge: {result.method} -> {output} ({result.output})")
    for col in ("module", "shape", "rank", "energy", "rel. error", "density", "time"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for m in result.modules[:limit]:
        table.add_row(
            m.name,
            "x".join(map(str, m.shape)),
            "-" if m.rank is None else str(m.rank),
            "-" if m.energy is None else f"{m.energy:.4f}",
            "-" if m.error is None else f"{m.error:.2e}",
            "-" if m.density is None else f"{m.density:.2%}",
            f"{m.seconds * 1000:.1f} ms",
        )
    if len(result.modules) > limit:
        table.add_row(f"... {len(result.modules) - limit} more", "", "", "", "", "", "")
    energies = [m.energy for m in result.modules if m.energy is not None]
    table.caption = (
        f"{len(result.modules)} modules, {result.seconds:.2f} s"
        + (f", min energy {min(energies):.4f}" if energies else "")
        + ("" if result.base_zeros_hit is None else f", {result.base_zeros_hit} zero weights of the base filled")
    )
    return table


@user_errors
def command(
    config: Path = typer.Argument(..., help="Merge YAML (see recipes/merge/)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the merged adapter / model to."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Validate the config and adapters, show the plan, write nothing."
    ),
    set_: list[str] | None = typer.Option(
        None, "--set", help="Override a config key: --set params.density=0.3 (repeatable)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    put: str | None = typer.Option(None, "--put", help="Also put the merged LoRA into the registry under this name."),
    hub: Path | None = typer.Option(
        None, "--hub", envvar="ADAPTERLAB_HUB", help="Registry root for --put and hub: refs (default ./hub)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    import torch

    from adapterlab.adapters import check_compatible
    from adapterlab.merging import MERGERS, merge_adapters, resolve_adapter
    from adapterlab.progress import rich_factory
    from adapterlab.staging import check_output_dir

    setup_logging(verbose)
    cfg = load_config(config, set_)
    # --- validate everything before loading weights ----------------------------------------
    try:
        merger_cls = MERGERS.get(cfg.method)
    except ValueError as exc:
        raise ValueError(f"{config}: method: {exc}") from None
    try:
        merger_cls.from_params(cfg.params)  # unknown / out-of-range params -> "params.<key>: ..."
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{config}: {exc}") from None
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
    weights: list[float] | None = []
    seen: set[str] = set()
    for i, entry in enumerate(cfg.adapters):
        src = resolve_adapter(
            _adapter_ref(entry, config.parent), name=entry.name, where=f"{config}: adapters.{i}", registry=registry
        )
        if src.name in seen:
            src.name = f"{src.name}_{i}"
        seen.add(src.name)
        sources.append(src)
        weights.append(entry.weight)  # type: ignore[union-attr, arg-type]
    given = [w is not None for w in weights]  # type: ignore[union-attr]
    if not any(given):
        weights = None
    elif not all(given):
        raise ValueError(f"{config}: adapters.{given.index(False)}.weight: give a weight for every adapter or for none")
    shapes = check_compatible(sources, check_base=cfg.check_base)
    if dry_run:
        table = Table(title=f"adapterlab merge --dry-run: {cfg.method} ({cfg.output.format or 'auto'}) -> {output}")
        table.add_column("adapter")
        table.add_column("weight", justify="right")
        table.add_column("modules", justify="right")
        table.add_column("rank(s)", justify="right")
        for i, s in enumerate(sources):
            ranks = sorted({m.rank for m in s.modules.values()})
            table.add_row(
                s.name, "-" if weights is None else f"{weights[i]:g}", str(len(s.modules)), ",".join(map(str, ranks))
            )
        table.caption = f"{len(shapes)} modules in the union; params {cfg.params or '{}'}; nothing written"
        console.print(table)
        return
    dtype = getattr(torch, cfg.output.dtype) if cfg.output.dtype else None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with progress() as prog:
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
            sources,
            cfg.method,
            weights=weights,
            base=cfg.base,
            dtype=dtype,
            check_base=cfg.check_base,
            progress=rich_factory(prog),
            **kwargs,
        )
    tokenizer = None
    if cfg.output.format == "full" and cfg.base is not None:
        from adapterlab.models import load_tokenizer

        try:
            tokenizer = load_tokenizer(cfg.base)
        except Exception as exc:  # a base folder without tokenizer files: save the model alone
            logger.warning("no tokenizer saved with the merged model: %s", str(exc).splitlines()[0])
    result.save(output, overwrite=overwrite, tokenizer=tokenizer)
    console.print(_summary(result, output))
    for note in result.warnings:
        logger.warning(note)
    console.print(f"wrote {output}")
    if put is not None:
        from adapterlab.cli.hub import put_output

        fp = None
        if cfg.base is not None:
            from adapterlab.io import base_fingerprint
            from adapterlab.models import load_model

            fp = base_fingerprint(load_model(cfg.base))
        provenance = {
            "kind": "merged",
            "parents": [e.path for e in cfg.adapters],
            "parents_sha256": [s.sha256 for s in sources],
            "recipe": {"path": str(config), "config": cfg.model_dump(mode="json")},
        }
        put_output(hub, output, put, provenance, base=fp)
