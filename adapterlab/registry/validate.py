"""Checks that an adapter folder is loadable before the registry stores it.

:func:`check_adapter` reads ``adapter_config.json`` and ``adapter_model.safetensors`` (through
:func:`adapterlab.io.load_tensors`, the project's one safetensors reader) and refuses, with one
line naming the file and the key path, what peft or adapterlab could not load:

* the config: not a JSON object; ``peft_type`` missing, not a string or not a registered peft type
  (adapterlab's own tuners are registered on import); a config peft cannot build from the fields;
  ``r`` not a positive integer, ``lora_alpha`` not a finite number, ``target_modules`` not a string
  or a list of strings, ``rank_pattern`` / ``alpha_pattern`` not a mapping of integers / numbers;
* the tensors: none at all; NaN/Inf values; a module without one of the tensors its method needs
  (``lora_B`` next to ``lora_A``, ``dylora_B``, ``lori_B``, ``spp_beta``, ``snell_Q``, SHiRA values
  with indices and dims, ...); low-rank factors that are not ``A [r, d_in]`` / ``B [d_out, r]`` with
  the ``r`` of the config (``rank_pattern`` honoured);
* with a base *model* (not only its fingerprint dict): a module the base does not have, or factors
  whose ``d_in`` / ``d_out`` are not the base module's (an adapter made for another base).

peft types other than LoRA and adapterlab's tuners get the config, tensor-count and finiteness
checks only.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterlab.adapter_config import adapter_config, read_bundle_config
from adapterlab.io import load_tensors, read_json
from adapterlab.peft_compat import pattern_value

__all__ = ["METHOD_TENSORS", "check_adapter", "check_bundle"]

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class _Rule:
    """The tensors of one method: every component name, those each module needs, its low-rank pairs."""

    components: tuple[str, ...]
    required: tuple[tuple[str, ...], ...]  # each module needs one full group (e.g. Linear or Embedding LoRA)
    lowrank: tuple[tuple[str, str], ...] = ()  # (A, B) pairs: A [r, d_in], B [d_out, r]
    rank_key: str | None = "r"


#: Upper-case peft type -> the tensors each module of an adapter of that type must hold.
METHOD_TENSORS: dict[str, _Rule] = {
    "LORA": _Rule(
        ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"),
        (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")),
        (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B")),
    ),
    "ADAPTERLAB_DYLORA": _Rule(("dylora_A", "dylora_B"), (("dylora_A", "dylora_B"),), (("dylora_A", "dylora_B"),)),
    "ADAPTERLAB_LORS": _Rule(("lors_A", "lors_B", "lors_pattern"), (("lors_A", "lors_B"),), (("lors_A", "lors_B"),)),
    "ADAPTERLAB_LORI": _Rule(("lori_A", "lori_B"), (("lori_B",),), (("lori_A", "lori_B"),)),
    "ADAPTERLAB_SPP": _Rule(("spp_alpha", "spp_beta", "spp_pattern"), (("spp_alpha", "spp_beta"),), rank_key=None),
    "ADAPTERLAB_SNELL": _Rule(
        ("snell_P", "snell_Q", "snell_mix", "snell_keep"), (("snell_P", "snell_Q"),), rank_key=None
    ),
    "ADAPTERLAB_SHIRA": _Rule(
        ("adapterlab_shira_values", "adapterlab_shira_indices", "adapterlab_shira_dims"),
        (("adapterlab_shira_values", "adapterlab_shira_indices", "adapterlab_shira_dims"),),
        rank_key=None,
    ),
}

#: Factors without a rank pair whose shape carries the base module's size: (component, axis, "in" | "out").
#: SPP: alpha (groups, d_in), beta (d_out, 1); SNELL: P (heads, d_in, r/heads), Q (heads, d_out, r/heads).
_BASE_AXES: dict[str, tuple[tuple[str, int, str], ...]] = {
    "ADAPTERLAB_SPP": (("spp_alpha", 1, "in"), ("spp_beta", 0, "out")),
    "ADAPTERLAB_SNELL": (("snell_P", 1, "in"), ("snell_Q", 1, "out")),
}


def _fail(where: str, what: str) -> ValueError:
    return ValueError(f"put: {where}: {what}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _known_peft_types() -> dict[str, Any]:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import adapterlab.tuners  # noqa: F401  (registers adapterlab's tuners with peft)

    return {str(getattr(k, "value", k)): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_config(config: Any, where: str) -> str:
    """Validate the fields adapterlab and peft read; return the peft type (as saved, e.g. ``"LORA"``).

    The field values go through the one schema (:func:`adapterlab.adapter_config.adapter_config`); the
    peft type must be one peft knows (adapterlab's tuners are registered with it)."""
    adapter_config(config, where)  # not an object, no peft_type, garbage values: one line with the key path
    peft_type = config["peft_type"]
    known = _known_peft_types()
    if not isinstance(peft_type, str) or peft_type not in known:
        shown = ", ".join(sorted(t for t in known if t in METHOD_TENSORS or t.startswith("ADAPTERLAB")))
        raise _fail(
            where, f"peft_type {_short(peft_type)} is not a known peft type (adapterlab's: {shown}; or any peft type)"
        )
    rule = METHOD_TENSORS.get(peft_type)
    rank_key = rule.rank_key if rule is not None else None
    if rank_key is not None and not _positive_int(config.get(rank_key)):  # a rank type the schema does not know
        raise _fail(
            where, f"key {rank_key!r} is {_short(config.get(rank_key))}; it must be a positive integer (the rank)"
        )
    from peft import PeftConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs = PeftConfig.check_kwargs(**config)
            PeftConfig.from_peft_type(**kwargs)
    except Exception as exc:  # noqa: BLE001 - peft raises TypeError, ValueError, KeyError ... for bad fields
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _fail(where, f"peft cannot build a {peft_type} config from it: {msg}") from None
    return peft_type


def _rank_of(config: Mapping[str, Any], module: str, rank_key: str | None) -> int | None:
    if rank_key is None:
        return None
    return int(pattern_value(config.get("rank_pattern") or {}, module, config[rank_key]))


def _base_io(module: nn.Module, embedding: bool, fan_in_fan_out: bool) -> tuple[int, int] | None:
    """``(d_in, d_out)`` the factors of an adapter on ``module`` must have, or None when unknown."""
    if embedding:
        if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
            return int(module.num_embeddings), int(module.embedding_dim)
        return None
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:  # e.g. transformers' Conv1D ([in, out])
        d0, d1 = (int(s) for s in weight.shape)
        return (d0, d1) if fan_in_fan_out else (d1, d0)
    return None


def check_adapter(src: Path, base: nn.Module | None = None) -> None:
    """Refuse an adapter folder that peft / adapterlab could not load (see the module docstring).

    Args:
        src: a PEFT adapter folder (``adapter_config.json`` and ``adapter_model.safetensors``).
        base: the base model it is recorded against; with it, module names and factor shapes are
            checked against the base's modules.

    Raises:
        ValueError: one line naming the file, the key path and what is allowed.
    """
    cfg_path = src / "adapter_config.json"
    cfg_where = str(cfg_path)
    try:
        config = read_json(cfg_path)  # the project's JSON reader: one line naming the file
        peft_type = _check_config(config, cfg_where)
    except ValueError as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith("put: ") else f"put: {msg}") from None

    st_path = src / "adapter_model.safetensors"
    where = str(st_path)
    try:
        tensors = load_tensors(st_path)  # the project's reader: corrupt files are a ValueError naming the file
    except ValueError as exc:
        raise ValueError(f"put: {exc}") from None
    if not tensors:
        raise _fail(where, "the file holds no tensors; an adapter stores at least one weight")
    for key, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise _fail(where, f"tensor {key!r} has {bad} NaN/Inf value(s); the registry refuses non-finite weights")

    rule = METHOD_TENSORS.get(peft_type)
    if rule is None:
        return
    comp = re.compile(rf"(?P<mod>.+)\.(?P<comp>{'|'.join(map(re.escape, rule.components))})(?:\.(?P<rest>.+))?")
    parts: dict[str, dict[str, str]] = {}  # module -> component -> its key (the ``.weight`` one if several)
    for key in sorted(tensors):
        m = comp.fullmatch(key.removeprefix(_PREFIX))
        if m is not None:
            have = parts.setdefault(m["mod"], {})
            if m["comp"] not in have or m["rest"] in (None, "weight"):
                have[m["comp"]] = key
    if not parts:
        need = " + ".join(rule.required[0])
        raise _fail(where, f"no {peft_type} tensors ({need} per module); got {_short(sorted(tensors)[:3], 120)}")
    fan = bool(config.get("fan_in_fan_out", False))
    inner = base.get_base_model() if base is not None and hasattr(base, "get_base_model") else base
    for mod, have in sorted(parts.items()):
        groups = [g for g in rule.required if any(c in have for c in g)] or list(rule.required[:1])
        for group in groups:
            missing = [c for c in group if c not in have]
            if missing:
                raise _fail(where, f"module {mod!r} has {', '.join(sorted(have))} but no {', '.join(missing)}")
        module = None
        if inner is not None:
            try:
                module = inner.get_submodule(mod)
            except AttributeError:
                raise _fail(
                    where,
                    f"tensor {have[next(iter(have))]!r} targets module {mod!r}, which the base does not "
                    f"have (an adapter of another base?)",
                ) from None
        r = _rank_of(config, mod, rule.rank_key)
        for a_name, b_name in rule.lowrank:
            a_key, b_key = have.get(a_name), have.get(b_name)
            # factors stored whole (``.weight`` or bare); LoRI-S stores B as values / indices / dims instead
            a = tensors[a_key] if a_key is not None and a_key.endswith((".weight", a_name)) else None
            b = tensors[b_key] if b_key is not None and b_key.endswith((".weight", b_name)) else None
            if a is not None and (a.dim() < 2 or (r is not None and a.shape[0] != r)):
                raise _fail(
                    where,
                    f"tensor {a_key!r} has shape {list(a.shape)}; {a_name} must be (r, d_in) with r={r}"
                    f" (key 'r' / 'rank_pattern' of adapter_config.json)",
                )
            if b is not None and (b.dim() < 2 or (r is not None and b.shape[1] != r)):
                raise _fail(
                    where,
                    f"tensor {b_key!r} has shape {list(b.shape)}; {b_name} must be (d_out, r) with r={r}"
                    f" (key 'r' / 'rank_pattern' of adapter_config.json)",
                )
            io = _base_io(module, "embedding" in a_name, fan) if module is not None else None
            if io is None:
                continue
            if a is not None and a.dim() == 2 and a.shape[1] != io[0]:
                raise _fail(
                    where,
                    f"tensor {a_key!r} has shape {list(a.shape)}, but base module {mod!r} takes {io[0]} "
                    f"inputs (an adapter of another base?)",
                )
            if b is not None and b.dim() == 2 and b.shape[0] != io[1]:
                raise _fail(
                    where,
                    f"tensor {b_key!r} has shape {list(b.shape)}, but base module {mod!r} has {io[1]} "
                    f"outputs (an adapter of another base?)",
                )
        io = _base_io(module, False, False) if module is not None else None
        for key_name, axis, side in _BASE_AXES.get(peft_type, ()):
            key = have.get(key_name)
            if key is None or io is None:
                continue
            shape = list(tensors[key].shape)
            want = io[0] if side == "in" else io[1]
            if axis >= len(shape) or shape[axis] != want:
                what = f"takes {want} inputs" if side == "in" else f"has {want} outputs"
                raise _fail(
                    where,
                    f"tensor {key!r} has shape {shape}, but base module {mod!r} {what} (an adapter of another base?)",
                )
        if peft_type == "ADAPTERLAB_SHIRA":
            values = tensors[have["adapterlab_shira_values"]]
            indices = tensors[have["adapterlab_shira_indices"]]
            if values.numel() != indices.numel():
                raise _fail(where, f"module {mod!r} has {values.numel()} SHiRA values but {indices.numel()} indices")
            dims_key = have["adapterlab_shira_dims"]
            dims = [int(d) for d in tensors[dims_key].reshape(-1).tolist()]
            if len(dims) != 2 or min(dims) <= 0:
                raise _fail(where, f"tensor {dims_key!r} is {dims}; it must be (d_out, d_in)")
            io = _base_io(module, False, False) if module is not None else None
            if io is not None and dims != [io[1], io[0]]:
                raise _fail(
                    where,
                    f"tensor {dims_key!r} is {dims}, but base module {mod!r} is ({io[1]}, {io[0]}) "
                    f"(an adapter of another base?)",
                )


def check_bundle(src: Path) -> None:
    """Refuse a shared-basis bundle folder whose ``compressed_config.json`` has garbage values (the one
    bundle schema, :func:`adapterlab.adapter_config.bundle_config`): one line naming the file and key path."""
    try:
        read_bundle_config(src / "compressed_config.json")
    except ValueError as exc:
        raise ValueError(f"put: {exc}") from None
