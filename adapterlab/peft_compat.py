"""The only module that touches peft internals: a ``PeftType`` shim and a peft version guard.

peft's own ``register_peft_method`` only accepts names that are already members of the
``peft.utils.peft_types.PeftType`` enum, so a third-party tuner cannot be registered through it.
:func:`register_tuner` adds the new member to the enum and fills the four mappings that peft
dispatches on:

* ``PEFT_TYPE_TO_CONFIG_MAPPING`` — ``PeftConfig.from_pretrained`` / ``PeftModel.from_pretrained``
  read ``"peft_type": "<NAME>"`` from ``adapter_config.json`` and look the config class up here
  (with the plain string; ``PeftType`` is a ``str`` enum, so the string and the member hash alike).
* ``PEFT_TYPE_TO_TUNER_MAPPING`` — ``get_peft_model``/``PeftModel`` build the tuner from it, and
  ``get_peft_model_state_dict``/``set_peft_model_state_dict`` dispatch the (structural) selection
  and key remapping of adapter tensors to the tuner class.
* ``PEFT_TYPE_TO_PREFIX_MAPPING`` — the parameter prefix (``"<name>_"``); used by the transformers
  weight-conversion path, hot-swapping and a few warnings.
* ``PEFT_TYPE_TO_MIXED_MODEL_MAPPING`` — only when ``is_mixed_compatible=True``.

The registration lives in the process, so every process that loads an adapter of such a type must
import the module that registers it first (``import adapterlab`` does this for adapterlab's own
tuners). Registering the same name again with the same classes (or a re-import of the same classes)
is a no-op; a different class under a taken name or prefix is an error.

The enum patch depends on ``enum`` internals (``_member_map_``, ``_value2member_map_``,
``_member_names_``; ``_add_member_`` on Python >= 3.13) and the mappings on peft's layout, which is
why :func:`check_peft_version` refuses peft versions outside the tested range
(set ``ADAPTERLAB_SKIP_PEFT_VERSION_CHECK=1`` to try anyway).
"""

from __future__ import annotations

import enum
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

logger = logging.getLogger(__name__)

#: peft versions this shim was tested with: ``MIN <= version < MAX`` (keep in sync with pyproject).
PEFT_MIN_VERSION = "0.21.2"
PEFT_MAX_VERSION = "0.22"
SKIP_VERSION_CHECK_ENV = "ADAPTERLAB_SKIP_PEFT_VERSION_CHECK"

#: Matched with ``fullmatch`` (``$`` would accept a trailing newline).
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*[a-z0-9]")
_E = TypeVar("_E", bound=enum.Enum)


class PeftVersionError(RuntimeError):
    """The installed peft is outside the range this shim was tested with."""


@dataclass(frozen=True)
class TunerInfo:
    """What :func:`register_tuner` registered under one name."""

    name: str
    peft_type: Any  # a peft.utils.peft_types.PeftType member
    config_cls: type
    model_cls: type
    prefix: str
    is_mixed_compatible: bool


_REGISTERED: dict[str, TunerInfo] = {}


def check_peft_version(version: str | None = None) -> str:
    """Raise :class:`PeftVersionError` unless peft is in ``[PEFT_MIN_VERSION, PEFT_MAX_VERSION)``.

    Args:
        version: the version string to check; the installed peft's when None.

    Returns:
        The checked version string.
    """
    from packaging.version import Version

    if version is None:
        import peft

        version = peft.__version__
    if os.environ.get(SKIP_VERSION_CHECK_ENV) == "1":
        return version
    v = Version(version)
    if not (Version(PEFT_MIN_VERSION) <= v < Version(PEFT_MAX_VERSION)):
        raise PeftVersionError(
            f"peft {version} is outside the range adapterlab's PeftType shim was tested with "
            f"(>={PEFT_MIN_VERSION},<{PEFT_MAX_VERSION}); install a peft in that range, or set "
            f"{SKIP_VERSION_CHECK_ENV}=1 to try anyway"
        )
    return version


def _validate_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"tuner name {name!r} must be lower case letters, digits and '_', start with a letter "
            f"and not end with '_' (the prefix is passed separately), e.g. 'adapterlab_shira'"
        )


def _add_enum_member(enum_cls: type[_E], name: str, value: str) -> _E:
    """Add ``name = value`` to an existing ``str`` enum (no-op if it is already a member)."""
    if name in enum_cls.__members__:
        existing = enum_cls[name]
        if existing.value != value:
            raise ValueError(f"{enum_cls.__name__}.{name} already exists with value {existing.value!r}")
        return existing
    if value in enum_cls._value2member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member with value {value!r}")
    if hasattr(enum_cls, name):
        raise ValueError(f"{name!r} clashes with an attribute of {enum_cls.__name__}")

    new_member: Any = getattr(enum_cls, "_new_member_", str.__new__)
    member: Any = new_member(enum_cls, value)  # a member built by hand: enum's private attributes are set below
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    member.__init__(value)
    add_member = getattr(enum_cls, "_add_member_", None)  # Python >= 3.13
    if add_member is not None:
        add_member(name, member)
    else:
        # EnumType.__setattr__ refuses names already in _member_map_, so set the attribute first.
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


def _same_class(a: type | None, b: type | None) -> bool:
    """Identical, or the same class re-created by a re-import (same module and qualified name)."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def peft_type(name: str) -> Any:
    """The ``PeftType`` member of a tuner registered with :func:`register_tuner` (by its lower-case name).

    Configs use it in ``__post_init__``: ``self.peft_type = peft_type("adapterlab_shira")``.
    """
    from peft.utils.peft_types import PeftType

    key = name.upper()
    if key not in PeftType.__members__:
        raise ValueError(
            f"unknown PEFT type {name!r}; registered by adapterlab: {', '.join(sorted(_REGISTERED)) or '(none)'}"
        )
    return PeftType[key]


def register_tuner(
    name: str,
    config_cls: type,
    model_cls: type,
    *,
    prefix: str,
    is_mixed_compatible: bool = False,
) -> Any:
    """Register a peft tuner whose type peft does not know, so peft's whole API works with it.

    After this call (in every process that uses the tuner): ``get_peft_model(model, config_cls(...))``,
    ``PeftModel.save_pretrained`` (``adapter_config.json`` gets ``"peft_type": "<NAME>"``),
    ``PeftModel.from_pretrained``, ``merge_and_unload``, ``disable_adapter`` and
    ``get/set_peft_model_state_dict`` work for it. The config class must set
    ``self.peft_type = peft_type(name)`` (or the string ``name.upper()``) in ``__post_init__``.

    Args:
        name: lower-case method name; the enum member and the saved ``peft_type`` are ``name.upper()``.
            It must not be a type peft already ships (peft 0.21 has e.g. ``shira``), so adapterlab's
            tuners use distinct names.
        config_cls: the tuner's ``PeftConfig`` subclass.
        model_cls: the tuner's ``BaseTuner`` subclass; its ``prefix`` attribute must equal ``prefix``.
        prefix: the unique parameter-name prefix of the tuner's layers, e.g. ``"alshira_"``.
        is_mixed_compatible: also register for ``PeftMixedModel``.

    Returns:
        The ``PeftType`` member.

    Raises:
        PeftVersionError: peft is outside the tested range.
        ValueError: bad name/prefix, or the name or prefix is taken by a different tuner.
    """
    check_peft_version()
    _validate_name(name)
    if not isinstance(prefix, str) or not prefix.endswith("_") or len(prefix) < 2:
        raise ValueError(f"prefix {prefix!r} must be a non-empty string ending in '_', e.g. '{name}_'")
    model_prefix = getattr(model_cls, "prefix", None)
    if model_prefix is not None and model_prefix != prefix:
        raise ValueError(
            f"{model_cls.__name__}.prefix is {model_prefix!r} but register_tuner got prefix={prefix!r}; "
            f"they must be the same"
        )

    from peft.mapping import (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
    )
    from peft.utils.peft_types import PeftType

    key = name.upper()
    previous = _REGISTERED.get(name)
    if previous is None and key in PeftType.__members__:
        owner_cfg = PEFT_TYPE_TO_CONFIG_MAPPING.get(cast(Any, key))  # PeftType is a str enum: the name finds it
        if owner_cfg is not None and not _same_class(owner_cfg, config_cls):
            raise ValueError(
                f"PEFT type {key!r} already belongs to {owner_cfg.__module__}.{owner_cfg.__name__}; "
                f"choose another name for {config_cls.__name__} (e.g. 'adapterlab_{name}')"
            )
    if previous is not None and not (
        _same_class(previous.config_cls, config_cls)
        and _same_class(previous.model_cls, model_cls)
        and previous.prefix == prefix
    ):
        raise ValueError(
            f"tuner {name!r} is already registered with {previous.config_cls.__name__}/"
            f"{previous.model_cls.__name__} and prefix {previous.prefix!r}"
        )
    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_prefix == prefix and str(getattr(other_type, "value", other_type)) != key:
            raise ValueError(
                f"prefix {prefix!r} is already used by PEFT type {getattr(other_type, 'value', other_type)!r}; "
                f"choose a unique prefix"
            )

    member = _add_enum_member(PeftType, key, key)
    PEFT_TYPE_TO_PREFIX_MAPPING[member] = prefix
    PEFT_TYPE_TO_CONFIG_MAPPING[member] = config_cls
    PEFT_TYPE_TO_TUNER_MAPPING[member] = model_cls
    if is_mixed_compatible:
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING[member] = model_cls
    else:
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING.pop(member, None)
    _REGISTERED[name] = TunerInfo(name, member, config_cls, model_cls, prefix, is_mixed_compatible)
    if previous is None:
        logger.debug("registered peft tuner %s (prefix %r)", key, prefix)
    return member


def registered_tuners() -> dict[str, TunerInfo]:
    """The tuners registered through :func:`register_tuner` in this process, by name."""
    return dict(_REGISTERED)


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA scale ``s = α / r`` (``α / √r`` with rsLoRA).

    Reference:
        rsLoRA — Kalajdzievski 2023, https://arxiv.org/abs/2312.03732
    """
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: first key that matches the name's tail."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name) or re.fullmatch(key, name):
            return value
    return default
