"""The fields adapterlab reads from ``adapter_config.json`` and ``compressed_config.json``, as pydantic schemas.

Every reader of an adapter folder (merging's and compression's adapter sources in
:mod:`adapterlab.adapters`, the registry's put check in :mod:`adapterlab.registry.validate`, serving)
and of a shared-basis bundle (``SharedBasisBundle.load``, the registry's ``put_bundle``) validates
through :func:`adapter_config` / :func:`bundle_config`, so a garbage value is one line naming the
file, the key path and the bad value, and what is allowed::

    /a/adapter_config.json: key 'lora_alpha' is None; it must be a finite number

The schemas check only what adapterlab reads (peft reads the rest and checks it when it builds its
config); unknown keys are kept. Which peft types exist is the caller's question (the registry knows
peft's table, a merge knows what it can merge): here ``peft_type`` only has to be present. The
fields differ per peft type (:data:`ADAPTER_SCHEMAS`): LoRA-like methods have a rank ``r``, a
``lora_alpha`` and per-module patterns; other types are checked for the common fields only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from adapterlab.io import read_json

__all__ = [
    "ADAPTER_SCHEMAS",
    "AdapterConfigFields",
    "BundleConfig",
    "LoraLikeFields",
    "LoriFields",
    "adapter_config",
    "bundle_config",
    "read_adapter_config",
    "read_bundle_config",
    "validate_config",
]

PathLike = str | os.PathLike[str]


def _check(ok: Callable[[Any], bool], what: str) -> BeforeValidator:
    """A validator that accepts ``value`` when ``ok(value)``, else fails with ``it must be {what}``."""

    def validate(value: Any) -> Any:
        if not ok(value):
            raise PydanticCustomError("adapterlab", what)
        return value

    return BeforeValidator(validate)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _mapping_or_empty(what: str) -> BeforeValidator:
    """null -> {}; anything but an object fails with ``it must be {what}``."""

    def validate(value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise PydanticCustomError("adapterlab", what)
        return value

    return BeforeValidator(validate)


PositiveInt = Annotated[Any, _check(lambda v: _is_int(v) and v > 0, "a positive integer")]
Rank = Annotated[Any, _check(lambda v: _is_int(v) and v > 0, "a positive integer (the rank)")]
FiniteNumber = Annotated[Any, _check(_is_number, "a finite number")]
Flag = Annotated[Any, _check(lambda v: isinstance(v, bool), "true or false")]
OptionalStr = Annotated[Any, _check(lambda v: v is None or isinstance(v, str), "a string or null")]
Targets = Annotated[
    Any,
    _check(lambda v: v is None or isinstance(v, str) or _is_str_list(v), "a string, a list of strings or null"),
]
Names = Annotated[Any, _check(lambda v: v is None or _is_str_list(v), "a list of strings or null")]
OptionalInt = Annotated[Any, _check(lambda v: v is None or _is_int(v), "an integer or null")]
_PATTERN = "an object of module pattern -> value"


class AdapterConfigFields(BaseModel):
    """What adapterlab reads from every adapter config, whatever its peft type."""

    model_config = ConfigDict(extra="allow")
    peft_type: Any = Field(...)  # present; which types exist is the caller's question
    base_model_name_or_path: OptionalStr = None
    target_modules: Targets = None
    modules_to_save: Names = None
    fan_in_fan_out: Flag = False


class LoraLikeFields(AdapterConfigFields):
    """LoRA and adapterlab's low-rank tuners: a rank, an alpha and per-module overrides."""

    r: Rank = Field(..., description="a positive integer (the rank)")
    lora_alpha: FiniteNumber = 8
    use_rslora: Flag = False
    use_dora: Flag = False
    rank_pattern: Annotated[dict[str, PositiveInt], _mapping_or_empty(_PATTERN)] = Field(default_factory=dict)
    alpha_pattern: Annotated[dict[str, FiniteNumber], _mapping_or_empty(_PATTERN)] = Field(default_factory=dict)


class LoriFields(LoraLikeFields):
    """LoRI: the seed its frozen A is regenerated from when the checkpoint does not store A."""

    lora_alpha: FiniteNumber = 64.0
    a_seed: OptionalInt = None


#: Upper-case peft type -> the schema of its config (other types: :class:`AdapterConfigFields`).
ADAPTER_SCHEMAS: dict[str, type[AdapterConfigFields]] = {
    "LORA": LoraLikeFields,
    "ADAPTERLAB_DYLORA": LoraLikeFields,
    "ADAPTERLAB_LORS": LoraLikeFields,
    "ADAPTERLAB_LORI": LoriFields,
}


class BundleConfig(BaseModel):
    """The fields of a shared-basis bundle's ``compressed_config.json`` that loading it reads."""

    model_config = ConfigDict(extra="allow")
    type: Annotated[Any, _check(lambda v: v == "shared_basis", "'shared_basis'")] = Field(
        ..., description="'shared_basis'"
    )
    mode: Annotated[Any, _check(lambda v: v in ("full", "diagonal"), "'full' or 'diagonal'")] = Field(
        ..., description="'full' or 'diagonal'"
    )
    rank_c: PositiveInt = Field(..., description="a positive integer (the shared rank c)")
    names: Annotated[Any, _check(_is_str_list, "a list of adapter names (strings)")] = Field(
        ..., description="a list of adapter names (strings)"
    )
    module_names: Annotated[Any, _check(_is_str_list, "a list of module names (strings)")] = Field(
        ..., description="a list of module names (strings)"
    )
    clusters: Annotated[
        dict[str, Annotated[Any, _check(lambda v: isinstance(v, list) and all(map(_is_int, v)), "a list of ints")]],
        _mapping_or_empty("an object of cluster id -> adapter indices"),
    ] = Field(..., description="an object of cluster id -> adapter indices")
    shapes: Annotated[
        dict[
            str,
            Annotated[
                Any,
                _check(
                    lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
                    "[d_out, d_in] (two positive integers)",
                ),
            ],
        ],
        _mapping_or_empty("an object of module -> [d_out, d_in]"),
    ] = Field(..., description="an object of module -> [d_out, d_in]")
    module_ranks: Annotated[dict[str, PositiveInt], _mapping_or_empty("an object of module -> rank")] = Field(
        default_factory=dict
    )
    embeddings: Names = None
    fan_in_fan_out: Flag = False
    base_model_name_or_path: OptionalStr = None
    raw_params: Annotated[
        Any, _check(lambda v: v is None or (isinstance(v, list) and all(map(_is_int, v))), "a list of integers")
    ] = None
    settings: Annotated[dict[str, Any], _mapping_or_empty("an object")] = Field(default_factory=dict)
    sources: Annotated[Any, _check(lambda v: v is None or isinstance(v, list), "a list")] = None
    history: Annotated[dict[str, Any], _mapping_or_empty("an object")] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# messages


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(loc: tuple[Any, ...]) -> str:
    return repr(str(loc[0])) if len(loc) == 1 else ".".join(str(p) for p in loc)


def _message(exc: ValidationError, schema: type[BaseModel], where: str) -> str:
    """The first error as one line: ``{where}: key {path} is {value}; it must be {what}``."""
    err = exc.errors(include_url=False)[0]
    loc = tuple(err.get("loc", ()))
    if err["type"] == "missing":
        if loc == ("peft_type",):
            return f"{where}: key 'peft_type' is missing; a PEFT adapter config names its method (e.g. \"LORA\")"
        field = schema.model_fields.get(str(loc[0])) if len(loc) == 1 else None
        hint = f"; it must be {field.description}" if field is not None and field.description else ""
        return f"{where}: key {_key(loc)} is missing{hint}"
    what = err["msg"] if err["type"] == "adapterlab" else err["msg"][:1].lower() + err["msg"][1:]
    return f"{where}: key {_key(loc)} is {_short(err.get('input'))}; it must be {what}"


def validate_config(raw: Any, schema: type[BaseModel], where: str, *, what: str = "config") -> Any:
    """``schema.model_validate(raw)`` with one-line errors naming ``where`` and the key path."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the {what} must be a JSON object, got a JSON {_json_type(raw)}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(_message(exc, schema, where)) from None


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "list"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null" if value is None else type(value).__name__


def adapter_config(raw: Any, where: str) -> AdapterConfigFields:
    """Validate an adapter config (a parsed ``adapter_config.json``) with its peft type's schema.

    Args:
        raw: the parsed JSON.
        where: the file (or key path) to name in errors.

    Raises:
        ValueError: not an object, no ``peft_type``, or a field adapterlab reads with a bad value:
            ``{where}: key {path} is {value}; it must be {what}``.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the config must be a JSON object, got a JSON {_json_type(raw)}")
    peft_type = raw.get("peft_type")
    schema = ADAPTER_SCHEMAS.get(peft_type.upper(), AdapterConfigFields) if isinstance(peft_type, str) else None
    return validate_config(raw, schema or AdapterConfigFields, where)


def bundle_config(raw: Any, where: str) -> BundleConfig:
    """Validate a shared-basis bundle's ``compressed_config.json`` (see :class:`BundleConfig`)."""
    cfg = validate_config(raw, BundleConfig, where)
    n = len(cfg.names)
    for g, members in cfg.clusters.items():
        bad = [i for i in members if not 0 <= i < n]
        if bad:
            raise ValueError(f"{where}: key clusters.{g} holds {bad[0]}; adapter indices must be in [0, {n})")
    missing = [m for m in cfg.module_names if m not in cfg.shapes]
    if missing:
        raise ValueError(f"{where}: key 'shapes' has no entry for module {missing[0]!r} of module_names")
    if not cfg.clusters:
        raise ValueError(f"{where}: key 'clusters' is {{}}; a bundle has at least one cluster")
    return cfg


def read_adapter_config(path: PathLike) -> tuple[dict[str, Any], AdapterConfigFields]:
    """Read and validate an ``adapter_config.json`` (through :func:`adapterlab.io.read_json`).

    Returns:
        ``(raw dict, validated fields)``.
    """
    raw = read_json(path)
    return raw, adapter_config(raw, str(path))


def read_bundle_config(path: PathLike) -> BundleConfig:
    """Read and validate a ``compressed_config.json``."""
    return bundle_config(read_json(path), str(Path(path)))
