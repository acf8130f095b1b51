"""Adapters as merge inputs: PEFT LoRA folders, in-memory peft models, registry refs.

A :class:`LoraSource` reads one LoRA adapter lazily, module by module (``safe_open`` on the
``adapter_model.safetensors`` of a folder), and hands out its factors in the **layout of the base
weight** with the LoRA scale folded in: ``delta(name) = B @ A`` has the shape of
``module.weight`` (embeddings and ``fan_in_fan_out`` layers are transposed accordingly), and
``B = s · lora_B`` with ``s = α/r`` (``α/√r`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern``
honoured). Module names are those of the base model (``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adapterlab.io import sha256_file
from adapterlab.merging.functional import lora_scaling

__all__ = ["AdapterLike", "LoraModule", "LoraSource", "resolve_adapter", "resolve_adapters"]

#: What ``merge_adapters`` accepts per adapter: a folder, ``"hub:NAME"``, a peft model, or a source.
AdapterLike = Any

_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$"
)


@dataclass(frozen=True)
class LoraModule:
    """Where one module's factors live and how to turn them into a weight-layout delta."""

    name: str
    a_key: str
    b_key: str
    rank: int
    scale: float
    transpose: bool  # embeddings and fan_in_fan_out layers: delta = (B A)ᵀ
    embedding: bool
    shape: tuple[int, int]  # shape of the base weight (= of the delta)


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: first key that matches the name's tail."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name) or re.fullmatch(key, name):
            return value
    return default


@dataclass
class LoraSource:
    """One LoRA adapter, read lazily.

    Attributes:
        name: task name (folder name, dict key, or ``adapter{i}``).
        config: the ``adapter_config.json`` contents.
        modules: module name -> :class:`LoraModule`.
        path: the folder (None for in-memory models).
        sha256: hex digest of ``adapter_model.safetensors`` (None in memory).
    """

    name: str
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    get: Callable[[str], Tensor] = field(repr=False)
    path: Path | None = None
    sha256: str | None = None

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(B [d_out, r], A [r, d_in])`` in fp32, weight layout, scale folded into B."""
        m = self.modules[name]
        a = self.get(m.a_key).to(torch.float32)
        b = self.get(m.b_key).to(torch.float32)
        if m.transpose:  # stored delta is (b a)ᵀ: weight-layout B = aᵀ, A = bᵀ
            a, b = b.T, a.T
        return (b * m.scale).contiguous(), a.contiguous()

    def delta(self, name: str) -> Tensor:
        """Dense fp32 delta ``[d_out, d_in]`` (shape of the base weight); zeros if not targeted."""
        if name not in self.modules:
            raise KeyError(name)
        b, a = self.factors(name)
        return b @ a  # [d_out, r] @ [r, d_in] -> [d_out, d_in]

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path) if self.path else None, "sha256": self.sha256}


def _parse(
    name: str,
    config: Mapping[str, Any],
    keys: Sequence[str],
    shape_of: Callable[[str], tuple[int, ...]],
    where: str,
) -> dict[str, LoraModule]:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported by merge_adapters; "
            f"supported: LORA (dense-delta merging of low-rank adapters)"
        )
    if config.get("use_dora"):
        raise ValueError(f"{where}: DoRA adapters (use_dora=True) cannot be merged as plain deltas")
    mts = config.get("modules_to_save") or []
    if mts:
        raise ValueError(
            f"{where}: modules_to_save={list(mts)} is not supported by merge_adapters yet "
            f"(only the LoRA deltas can be merged); re-export the adapter without modules_to_save"
        )
    fan = bool(config.get("fan_in_fan_out", False))
    alpha0 = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    alpha_pat = config.get("alpha_pattern") or {}  # the rank comes from the tensors themselves
    parts: dict[str, dict[str, str]] = {}
    for key in keys:
        k = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        what = "DoRA (use_dora=True)" if "lora_magnitude_vector" in k else None
        if k.endswith(".bias") and ".lora_" in k:
            what = "a LoRA bias (lora_bias=True)"
        if what is not None:
            raise ValueError(f"{where}: tensor {key!r} belongs to {what}, which cannot be merged as a plain delta")
        m = _KEY.match(k)
        if m is None:
            if k.endswith(".base_layer.weight"):  # embedding copies saved with save_embedding_layers
                continue
            raise ValueError(f"{where}: unexpected tensor {key!r} in a LoRA adapter")
        parts.setdefault(m["mod"], {})[m["kind"]] = key
    modules: dict[str, LoraModule] = {}
    for mod, kinds in sorted(parts.items()):
        emb = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a_key = kinds.get("lora_embedding_A" if emb else "lora_A")
        b_key = kinds.get("lora_embedding_B" if emb else "lora_B")
        if a_key is None or b_key is None:
            raise ValueError(f"{where}: module {mod!r} has only one of its two LoRA factors")
        a_shape, b_shape = shape_of(a_key), shape_of(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise ValueError(
                f"{where}: module {mod!r} has LoRA factors of shapes {list(b_shape)} x {list(a_shape)} "
                f"(only Linear and Embedding LoRA layers can be merged)"
            )
        r = a_shape[0]
        alpha = float(_pattern_value(alpha_pat, mod, alpha0))
        transpose = emb or fan
        shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        modules[mod] = LoraModule(mod, a_key, b_key, r, lora_scaling(alpha, r, rslora), transpose, emb, shape)
    if not modules:
        raise ValueError(f"{where}: the adapter holds no LoRA tensors")
    return modules


def _from_folder(path: Path, name: str, where: str) -> LoraSource:
    from safetensors import safe_open

    cfg_path = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{where}: {str(path)!r} is not a PEFT adapter folder (no adapter_config.json)")
    if not weights.is_file():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"{where}: {str(path)!r} holds adapter_model.bin (pickle); adapterlab reads safetensors only"
            )
        raise FileNotFoundError(f"{where}: {str(path)!r} has no adapter_model.safetensors")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    with safe_open(str(weights), framework="pt") as fh:
        keys = list(fh.keys())
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in keys}
    handle: dict[str, Any] = {}

    def get(key: str) -> Tensor:
        if "fh" not in handle:
            handle["fh"] = safe_open(str(weights), framework="pt")
        return handle["fh"].get_tensor(key)

    modules = _parse(name, config, keys, shapes.__getitem__, where)
    return LoraSource(name, config, modules, get, path, sha256_file(weights))


def _from_peft_model(model: Any, name: str, where: str, adapter_name: str | None = None) -> LoraSource:
    from peft.utils import get_peft_model_state_dict

    adapter = adapter_name or getattr(model, "active_adapter", None) or "default"
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    if adapter not in model.peft_config:
        raise ValueError(f"{where}: the peft model has no adapter {adapter!r}; it has {sorted(model.peft_config)}")
    config = model.peft_config[adapter].to_dict()
    config["peft_type"] = str(getattr(config.get("peft_type"), "value", config.get("peft_type")))
    state = get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False)
    state = {k: v.detach() for k, v in state.items()}
    modules = _parse(name, config, list(state), lambda k: tuple(state[k].shape), where)
    return LoraSource(name, config, modules, state.__getitem__, None, None)


def resolve_adapter(ref: AdapterLike, *, name: str | None = None, where: str = "adapter", registry: Any = None) -> LoraSource:
    """Turn one adapter reference into a :class:`LoraSource`.

    Args:
        ref: a PEFT LoRA folder (str / PathLike), ``"hub:NAME"`` (a registry ref), a ``peft.PeftModel``
            (its active adapter), a ``(PeftModel, adapter_name)`` pair, or a ready :class:`LoraSource`.
        name: the task name to record (default: folder name, ref name, or ``where``).
        where: the key path used in error messages (``adapters[2]``).
        registry: an ``AdapterRegistry``-like object with ``get(name) -> folder`` for ``hub:`` refs.

    Raises:
        ValueError / FileNotFoundError: naming ``where`` and what is wrong.
    """
    if isinstance(ref, LoraSource):
        return ref
    if isinstance(ref, tuple) and len(ref) == 2 and hasattr(ref[0], "peft_config"):
        return _from_peft_model(ref[0], name or str(ref[1]), where, adapter_name=str(ref[1]))
    if hasattr(ref, "peft_config") and hasattr(ref, "base_model"):
        return _from_peft_model(ref, name or where, where)
    if isinstance(ref, (str, os.PathLike)):
        text = os.fspath(ref)
        if text.startswith("hub:"):
            folder = _resolve_hub_ref(text[4:], where, registry)
            return _from_folder(Path(folder), name or text[4:], where)
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{where}: adapter folder {text!r} does not exist")
        return _from_folder(path, name or path.name, where)
    raise ValueError(
        f"{where}: cannot use a {type(ref).__name__} as an adapter; pass a PEFT adapter folder, "
        f"'hub:NAME', or a peft model"
    )


def _resolve_hub_ref(ref: str, where: str, registry: Any) -> Path:
    """Resolve ``hub:NAME`` through an AdapterRegistry (``registry.get(name)`` -> folder)."""
    if not ref:
        raise ValueError(f"{where}: empty registry ref 'hub:'; write 'hub:NAME'")
    if registry is None:
        try:
            from adapterlab.registry import AdapterRegistry  # type: ignore[attr-defined]
        except ImportError as exc:
            raise ValueError(
                f"{where}: registry ref 'hub:{ref}' needs adapterlab.registry (AdapterRegistry), which this "
                f"installation does not provide yet; pass the adapter's folder instead"
            ) from exc
        registry = AdapterRegistry(os.environ.get("ADAPTERLAB_HUB", "hub"))
    try:
        folder = registry.get(ref)  # verified: every file re-hashed against the manifest
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise type(exc)(f"{where}: 'hub:{ref}': {msg}") from None
    return Path(getattr(folder, "path", folder))


def resolve_adapters(
    adapters: Sequence[AdapterLike] | Mapping[str, AdapterLike], *, registry: Any = None
) -> list[LoraSource]:
    """Resolve a list (or name -> adapter mapping) of adapters; names made unique."""
    if isinstance(adapters, (str, os.PathLike)):
        raise ValueError("adapters: expected a list of adapters, got a single path; wrap it in a list")
    items = list(adapters.items()) if isinstance(adapters, Mapping) else [(None, a) for a in adapters]
    if not items:
        raise ValueError("adapters: the adapter list is empty; give at least one adapter")
    sources: list[LoraSource] = []
    seen: set[str] = set()
    for i, (key, ref) in enumerate(items):
        where = f"adapters[{key!r}]" if key is not None else f"adapters[{i}]"
        src = resolve_adapter(ref, name=key, where=where, registry=registry)
        if src.name in seen:
            src.name = f"{src.name}_{i}"
        seen.add(src.name)
        sources.append(src)
    return sources


def check_compatible(sources: Sequence[LoraSource], check_base: bool = True) -> dict[str, tuple[int, int]]:
    """Union of module names -> shape; errors on shape or base mismatches (with the key path).

    Returns:
        module name -> weight shape, sorted by name.
    """
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, int] = {}
    for i, src in enumerate(sources):
        for mod, m in src.modules.items():
            if mod in shapes and shapes[mod] != m.shape:
                j = owner[mod]
                raise ValueError(
                    f"adapters[{i}] ({src.name!r}): module {mod!r} has shape {list(m.shape)} but adapters[{j}] "
                    f"({sources[j].name!r}) has {list(shapes[mod])}; the adapters were made for different bases"
                )
            shapes.setdefault(mod, m.shape)
            owner.setdefault(mod, i)
    if check_base:
        bases = [(i, s.base_model) for i, s in enumerate(sources) if s.base_model]
        for i, b in bases[1:]:
            if b != bases[0][1]:
                raise ValueError(
                    f"adapters[{i}] ({sources[i].name!r}).base_model_name_or_path is {b!r} but adapters[{bases[0][0]}] "
                    f"has {bases[0][1]!r}; pass check_base=False if both are the same base"
                )
    return dict(sorted(shapes.items()))
