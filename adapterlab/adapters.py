"""Adapters as inputs (of merging, compression, serving): PEFT LoRA folders, in-memory peft models, registry refs.

A :class:`LoraSource` reads one LoRA adapter lazily, module by module (``safe_open`` on the
``adapter_model.safetensors`` of a folder), and hands out its factors in the **layout of the base
weight** with the LoRA scale folded in: ``delta(name) = B @ A`` has the shape of
``module.weight`` (embeddings and ``fan_in_fan_out`` layers are transposed accordingly), and
``B = s · lora_B`` with ``s = α/r`` (``α/√r`` with rsLoRA; ``rank_pattern`` / ``alpha_pattern``
honoured). Module names are those of the base model (``model.layers.0.self_attn.q_proj``).

Sparse adapters are read by two subclasses (``LoraSource.kind`` tells the types apart):

* :class:`ShiraSource` (peft type ``adapterlab_shira``) hands out each module's stored entries —
  flat row-major int64 indices ``row * d_in + col`` and fp32 values with the adapter's scale
  folded in — and, for the dense-delta path, the scattered ``[d_out, d_in]`` delta. It has no
  low-rank factors.
* :class:`LoriSource` (peft type ``adapterlab_lori``, LoRI-D or LoRI-S) is a low-rank source like
  LoRA: ``factors(name) = (s · B, A)`` with B densified (zeros outside a LoRI-S mask) and the frozen
  A read from the checkpoint (``store_a=True``) or regenerated from ``a_seed`` and the module name,
  exactly as the LoRI tuner does. ``b_mask(name)`` gives B's stored positions (LoRI-S keeps them).

Reference:
    SHiRA — https://arxiv.org/abs/2406.13175 ; LoRI — https://arxiv.org/abs/2504.07448
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from adapterlab.adapter_config import read_adapter_config
from adapterlab.io import TensorFile, check_finite, open_tensors, sha256_file
from adapterlab.peft_compat import lora_scaling, pattern_value

__all__ = [
    "AdapterLike",
    "LoraModule",
    "LoraSource",
    "LoriModule",
    "LoriSource",
    "ShiraModule",
    "ShiraSource",
    "check_recorded_bases",
    "resolve_adapter",
    "resolve_adapters",
]

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


@dataclass
class LoraSource:
    """One LoRA adapter, read lazily.

    Attributes:
        name: task name (folder name, dict key, or ``adapter{i}``).
        config: the ``adapter_config.json`` contents.
        modules: module name -> :class:`LoraModule`.
        path: the folder (None for in-memory models).
        sha256: hex digest of ``adapter_model.safetensors`` (None in memory).
        ref: the registry ref it was resolved from (``"hub:NAME"``), else None.
        where: the key path it was given under (``adapters[1]``, ``merge.yaml: adapters.1``), for messages.
        recorded_base: the base fingerprint the registry recorded for it (``manifest["base"]``), else None;
            a merge into a base (``output="full"``) refuses another base (:func:`check_recorded_bases`).
    """

    name: str
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    get: Callable[[str], Tensor] = field(repr=False)
    path: Path | None = None
    sha256: str | None = None
    ref: str | None = field(default=None, kw_only=True)
    recorded_base: dict[str, Any] | None = field(default=None, repr=False, kw_only=True)
    where: str | None = field(default=None, repr=False, kw_only=True)

    #: ``"lora"``; ``"shira"`` / ``"lori"`` for the sparse-adapter sources (subclasses).
    kind: ClassVar[str] = "lora"

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path") or None

    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type", "")).upper()

    def value_dtype(self) -> torch.dtype:
        """The dtype the adapter stores its tensors in (the merge output's default dtype)."""
        m = next(iter(self.modules.values()))
        return self.get(m.a_key).dtype

    def unscaled_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(B [d_out, r], A [r, d_in])`` in fp32, weight layout, the stored values (no scale):
        ``delta = modules[name].scale · B @ A``."""
        m = self.modules[name]
        a = self.get(m.a_key).to(torch.float32)
        b = self.get(m.b_key).to(torch.float32)
        if m.transpose:  # stored delta is (b a)ᵀ: weight-layout B = aᵀ, A = bᵀ
            a, b = b.T, a.T
        return b.contiguous(), a.contiguous()

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(B [d_out, r], A [r, d_in])`` in fp32, weight layout, scale folded into B."""
        b, a = self.unscaled_factors(name)
        return self._overflow_checked(name, "s · B", (b * self.modules[name].scale).contiguous()), a

    def delta(self, name: str) -> Tensor:
        """Dense fp32 delta ``[d_out, d_in]`` (shape of the base weight); zeros if not targeted."""
        if name not in self.modules:
            raise KeyError(name)
        b, a = self.factors(name)
        return self._overflow_checked(name, "delta s · B @ A", b @ a)  # [d_out, r] @ [r, d_in] -> [d_out, d_in]

    def _overflow_checked(self, module: str, what: str, t: Tensor) -> Tensor:
        """``t``, or one line naming the adapter and module: the stored values are finite (checked as read),
        so a non-finite product is an fp32 overflow."""
        return check_finite(
            t,
            f"adapter {self.name!r}: module {module!r}: {what}",
            " (an fp32 overflow: the adapter's values are too large); nothing was written",
        )

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path) if self.path else None, "sha256": self.sha256}


# ------------------------------------------------------------------------------------------------
# sparse adapters

_SHIRA_KEY = re.compile(r"^(?P<mod>.+)\.adapterlab_shira_(?P<kind>values|indices|dims)(?:\.(?P<adapter>[^.]+))?$")
_LORI_KEY = re.compile(r"^(?P<mod>.+)\.(?P<kind>lori_A\.weight|lori_B\.(?:weight|values|indices|dims))$")


def _strip(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def _no_modules_to_save(config: dict[str, Any], where: str) -> None:
    mts = config.get("modules_to_save") or []
    if mts:
        raise ValueError(
            f"{where}: modules_to_save={list(mts)} is not supported by merge_adapters yet; re-export the adapter "
            f"without modules_to_save"
        )


# ------------------------------------------------------------------------------------------------
# SHiRA


@dataclass(frozen=True)
class ShiraModule:
    """Where one module's SHiRA entries live.

    Attributes:
        nnz: K, the number of stored entries.
        scale: the adapter's ``alpha`` (1 on disk; an in-memory model's ``shira_scaling``).
        shape: ``(d_out, d_in)`` of the base weight.
    """

    name: str
    values_key: str
    indices_key: str
    nnz: int
    scale: float
    shape: tuple[int, int]
    embedding: ClassVar[bool] = False
    transpose: ClassVar[bool] = False

    @property
    def rank(self) -> int:
        """Upper bound of the delta's rank (a sparse delta is generally full rank): ``min(d_out, d_in)``."""
        return min(self.shape)


def _group_keys(keys: Sequence[str], pattern: re.Pattern[str], kind: str, where: str) -> dict[str, dict[str, str]]:
    """module -> {tensor kind -> checkpoint key}, from ``pattern``'s ``mod`` / ``kind`` groups.

    Any key the pattern does not match is an error naming ``where``."""
    parts: dict[str, dict[str, str]] = {}
    for key in keys:
        m = pattern.match(_strip(key))
        if m is None:
            raise ValueError(f"{where}: unexpected tensor {key!r} in a {kind} adapter")
        parts.setdefault(m["mod"], {})[m["kind"]] = key
    return parts


@dataclass
class ShiraSource(LoraSource):
    """One SHiRA adapter, read lazily (see the module docstring)."""

    kind: ClassVar[str] = "shira"

    @classmethod
    def build(
        cls,
        name: str,
        config: dict[str, Any],
        keys: Sequence[str],
        shape_of: Callable[[str], tuple[int, ...]],
        get: Callable[[str], Tensor],
        where: str,
        *,
        path: Path | None = None,
        sha256: str | None = None,
        model: Any = None,
        adapter: str | None = None,
    ) -> ShiraSource:
        """Parse the tensor names of a SHiRA checkpoint (``<module>.adapterlab_shira_{values,indices,dims}``)."""
        _no_modules_to_save(config, where)
        parts = _group_keys(keys, _SHIRA_KEY, "SHiRA", where)
        scales: dict[str, float] = {}
        if model is not None and adapter is not None:  # in memory: the inference knob alpha of each layer
            from adapterlab.tuners.shira import shira_layers

            scales = {k: float(layer.shira_scaling.get(adapter, 1.0)) for k, layer in shira_layers(model, adapter)}
        modules: dict[str, Any] = {}
        for mod, kinds in sorted(parts.items()):
            missing = [k for k in ("values", "indices", "dims") if k not in kinds]
            if missing:
                raise ValueError(f"{where}: SHiRA module {mod!r} lacks its {' and '.join(missing)} tensor(s)")
            v_shape, i_shape = shape_of(kinds["values"]), shape_of(kinds["indices"])
            if len(v_shape) != 1 or tuple(i_shape) != tuple(v_shape):
                raise ValueError(
                    f"{where}: SHiRA module {mod!r} has values of shape {list(v_shape)} and indices of shape "
                    f"{list(i_shape)}; expected two 1-D tensors of equal length (flat indices)"
                )
            dims = tuple(int(d) for d in get(kinds["dims"]).flatten().tolist())
            if len(dims) != 2 or min(dims) < 1:
                raise ValueError(f"{where}: SHiRA module {mod!r} records dims {list(dims)}; expected (d_out, d_in)")
            modules[mod] = ShiraModule(
                mod, kinds["values"], kinds["indices"], int(v_shape[0]), scales.get(mod, 1.0), (dims[0], dims[1])
            )
        if not modules:
            raise ValueError(f"{where}: the adapter holds no SHiRA tensors")
        return cls(name, config, modules, get, path, sha256)

    def value_dtype(self) -> torch.dtype:
        return self.get(next(iter(self.modules.values())).values_key).dtype

    def entries(self, name: str) -> tuple[Tensor, Tensor]:
        """``(flat indices [K] int64, values [K] fp32)`` of one module, scale folded in.

        Raises:
            ValueError: an index outside the ``d_out * d_in`` weight (naming the adapter and module).
        """
        m = self.modules[name]
        idx = self.get(m.indices_key).reshape(-1).long()  # [K]
        val = self.get(m.values_key).reshape(-1).to(torch.float32)  # [K]
        numel = m.shape[0] * m.shape[1]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(
                f"adapter {self.name!r}: module {name!r} has flat indices in [{int(idx.min())}, {int(idx.max())}], "
                f"outside [0, {numel}) for its {list(m.shape)} weight"
            )
        return idx, val * m.scale if m.scale != 1.0 else val

    def delta(self, name: str) -> Tensor:
        """Dense fp32 delta ``[d_out, d_in]`` (the dense-delta path; O(d_out · d_in))."""
        idx, val = self.entries(name)
        flat = torch.zeros(self.modules[name].shape[0] * self.modules[name].shape[1])  # [d_out * d_in]
        flat.index_add_(0, idx, val)
        return flat.view(self.modules[name].shape)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        raise ValueError(
            f"adapter {self.name!r} is a SHiRA adapter: a sparse delta has no low-rank factors (factorwise merging, "
            f"RMM and shared-basis compression need LoRA-like adapters)"
        )


# ------------------------------------------------------------------------------------------------
# LoRI


@dataclass(frozen=True)
class LoriModule(LoraModule):
    """A LoRI module: B dense (``b_key``) or compact (``b_values_key`` + ``b_indices_key``), A stored
    (``a_key``) or regenerated (``a_key == ""``) from ``a_seed``."""

    b_values_key: str = ""
    b_indices_key: str = ""
    a_seed: int = 0


@dataclass
class LoriSource(LoraSource):
    """One LoRI adapter (LoRI-D or LoRI-S), read lazily (see the module docstring)."""

    kind: ClassVar[str] = "lori"

    @classmethod
    def build(
        cls,
        name: str,
        config: dict[str, Any],
        keys: Sequence[str],
        shape_of: Callable[[str], tuple[int, ...]],
        get: Callable[[str], Tensor],
        where: str,
        *,
        path: Path | None = None,
        sha256: str | None = None,
        model: Any = None,
        adapter: str | None = None,
    ) -> LoriSource:
        """Parse a LoRI checkpoint: ``<module>.lori_B.weight`` (or ``.values`` + ``.indices``), ``.lori_B.dims``
        and, with ``store_a``, ``.lori_A.weight``."""
        _no_modules_to_save(config, where)
        parts = _group_keys(keys, _LORI_KEY, "LoRI", where)
        r, alpha = int(config.get("r", 32)), float(config.get("lora_alpha", 64.0))
        scale = lora_scaling(alpha, r, bool(config.get("use_rslora", False)))
        a_seed = config.get("a_seed")
        modules: dict[str, Any] = {}
        for mod, kinds in sorted(parts.items()):
            if "lori_B.dims" not in kinds:
                raise ValueError(f"{where}: LoRI module {mod!r} lacks its lori_B.dims tensor")
            dims = tuple(int(d) for d in get(kinds["lori_B.dims"]).flatten().tolist())  # (d_out, r, d_in)
            if len(dims) != 3 or dims[1] != r:
                raise ValueError(
                    f"{where}: LoRI module {mod!r} records dims {list(dims)}; expected (d_out, r={r}, d_in)"
                )
            sparse = "lori_B.values" in kinds
            if not sparse and "lori_B.weight" not in kinds or sparse and "lori_B.indices" not in kinds:
                raise ValueError(f"{where}: LoRI module {mod!r} has no complete B (lori_B.weight, or values + indices)")
            a_key = kinds.get("lori_A.weight", "")
            if not a_key and a_seed is None:
                raise ValueError(
                    f"{where}: LoRI module {mod!r} stores no A and the config has no a_seed to regenerate it"
                )
            modules[mod] = LoriModule(
                mod,
                a_key,
                kinds.get("lori_B.weight", ""),
                r,
                scale,
                False,
                False,
                (dims[0], dims[2]),
                b_values_key=kinds.get("lori_B.values", ""),
                b_indices_key=kinds.get("lori_B.indices", ""),
                a_seed=int(a_seed or 0),
            )
        if not modules:
            raise ValueError(f"{where}: the adapter holds no LoRI tensors")
        return cls(name, config, modules, get, path, sha256)

    def value_dtype(self) -> torch.dtype:
        m = next(iter(self.modules.values()))
        return self.get(m.b_values_key or m.b_key).dtype

    @property
    def sparse_b(self) -> bool:
        """True for LoRI-S (B stored in compact form)."""
        return any(m.b_values_key for m in self.modules.values())

    def a_matrix(self, name: str) -> Tensor:
        """The frozen A ``[r, d_in]`` (fp32): stored, or regenerated from ``a_seed`` like the LoRI tuner."""
        from adapterlab.tuners.lori.functional import layer_seed, random_a

        m = self.modules[name]
        if m.a_key:
            return self.get(m.a_key).to(torch.float32)
        return random_a(m.rank, m.shape[1], layer_seed(m.a_seed, name))

    def b_matrix(self, name: str) -> Tensor:
        """B ``[d_out, r]`` (fp32, no scale), zeros outside a LoRI-S mask."""
        m = self.modules[name]
        if not m.b_values_key:
            return self.get(m.b_key).to(torch.float32)
        idx = self.get(m.b_indices_key).reshape(-1).long()  # [nnz]
        flat = torch.zeros(m.shape[0] * m.rank)  # [d_out * r]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= flat.numel()):
            raise ValueError(
                f"adapter {self.name!r}: module {name!r} has B indices outside its [{m.shape[0]}, {m.rank}] B"
            )
        flat[idx] = self.get(m.b_values_key).reshape(-1).to(torch.float32)
        return flat.view(m.shape[0], m.rank)

    def b_mask(self, name: str) -> Tensor:
        """Bool ``[d_out, r]``: B's stored positions (all True for LoRI-D)."""
        m = self.modules[name]
        if not m.b_values_key:
            return torch.ones(m.shape[0], m.rank, dtype=torch.bool)
        flat = torch.zeros(m.shape[0] * m.rank, dtype=torch.bool)
        flat[self.get(m.b_indices_key).reshape(-1).long()] = True
        return flat.view(m.shape[0], m.rank)

    def unscaled_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(B [d_out, r], A [r, d_in])`` in fp32, no scale (B densified, A stored or regenerated)."""
        return self.b_matrix(name).contiguous(), self.a_matrix(name).contiguous()

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``(s · B [d_out, r], A [r, d_in])`` in fp32; ``delta = s · B A``."""
        b, a = self.unscaled_factors(name)
        return (b * self.modules[name].scale).contiguous(), a


#: peft type (upper case, as saved) -> source builder (LoRA is parsed by ``_parse``).
SOURCE_TYPES: dict[str, Callable[..., LoraSource]] = {
    "ADAPTERLAB_SHIRA": ShiraSource.build,
    "ADAPTERLAB_LORI": LoriSource.build,
}


# ------------------------------------------------------------------------------------------------
# parsing and resolving


def _parse(
    name: str,
    config: Mapping[str, Any],
    keys: Sequence[str],
    shape_of: Callable[[str], tuple[int, ...]],
    where: str,
) -> dict[str, LoraModule]:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        hint = (
            "; peft's own SHiRA format stores no layer shapes: load it with adapterlab.tuners.shira.load_shira(base, "
            "path) and pass the model"
            if peft_type == "SHIRA"
            else ""
        )
        raise ValueError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported by merge_adapters; supported: LORA, "
            f"ADAPTERLAB_SHIRA (SHiRA), ADAPTERLAB_LORI (LoRI-D / LoRI-S){hint}"
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
        k = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
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
        alpha = float(pattern_value(alpha_pat, mod, alpha0))
        transpose = emb or fan
        shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        modules[mod] = LoraModule(mod, a_key, b_key, r, lora_scaling(alpha, r, rslora), transpose, emb, shape)
    if not modules:
        raise ValueError(f"{where}: the adapter holds no LoRA tensors")
    return modules


def _finite(get: Callable[[str], Tensor], name: str, where: str) -> Callable[[str], Tensor]:
    """``get`` that refuses floating tensors holding NaN or Inf (:func:`adapterlab.io.check_finite`)."""

    def checked(key: str) -> Tensor:
        return check_finite(get(key), f"{where} {name!r}: tensor {key!r}", "; nothing was merged or written")

    return checked


def _from_folder(path: Path, name: str, where: str) -> LoraSource:
    """A source over a PEFT folder: the config through the one schema, the tensors through the one reader."""
    cfg_path = path / "adapter_config.json"
    weights = path / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{where}: {str(path)!r} is not a PEFT adapter folder (no adapter_config.json)")
    if not weights.exists():
        if (path / "adapter_model.bin").is_file():
            raise ValueError(
                f"{where}: {str(path)!r} holds adapter_model.bin (pickle); adapterlab reads safetensors only"
            )
        raise FileNotFoundError(f"{where}: {str(path)!r} has no adapter_model.safetensors")
    try:
        config, _ = read_adapter_config(cfg_path)  # garbage values: one line naming the key path
        with open_tensors(weights) as fh:  # corrupt files: one line naming the file
            keys = fh.keys()
            shapes = {k: fh.shape(k) for k in keys}
        sha256 = sha256_file(weights)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    handle: dict[str, TensorFile] = {}

    def get(key: str) -> Tensor:
        if "fh" not in handle:
            handle["fh"] = open_tensors(weights)
        try:
            return handle["fh"].get(key)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    return _build(name, config, keys, shapes.__getitem__, get, where, path=path, sha256=sha256)


def _build(
    name: str,
    config: Mapping[str, Any],
    keys: Sequence[str],
    shape_of: Callable[[str], tuple[int, ...]],
    get: Callable[[str], Tensor],
    where: str,
    *,
    path: Path | None = None,
    sha256: str | None = None,
    model: Any = None,
    adapter: str | None = None,
) -> LoraSource:
    """The source for the adapter's ``peft_type``: :class:`LoraSource`, :class:`ShiraSource` or :class:`LoriSource`.

    Every tensor the source reads is checked to be finite when it is read (one line naming the adapter
    and the tensor), so a merge never writes NaN/Inf from its inputs.
    """
    get = _finite(get, name, where)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in SOURCE_TYPES:
        return SOURCE_TYPES[peft_type](
            name, dict(config), keys, shape_of, get, where, path=path, sha256=sha256, model=model, adapter=adapter
        )
    modules = _parse(name, config, keys, shape_of, where)
    return LoraSource(name, dict(config), modules, get, path, sha256)


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
    return _build(
        name,
        config,
        list(state),
        lambda k: tuple(state[k].shape),
        state.__getitem__,
        where,
        model=model,
        adapter=adapter,
    )


def resolve_adapter(
    ref: AdapterLike, *, name: str | None = None, where: str = "adapter", registry: Any = None
) -> LoraSource:
    """Turn one adapter reference into a :class:`LoraSource`.

    Args:
        ref: a PEFT LoRA / SHiRA / LoRI folder (str / PathLike), ``"hub:NAME"`` (a registry ref), a
            ``peft.PeftModel`` (its active adapter), a ``(PeftModel, adapter_name)`` pair, or a ready
            :class:`LoraSource`.
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
            folder, recorded = _resolve_hub_ref(text[4:], where, registry)
            src = _from_folder(Path(folder), name or text[4:], where)
            src.ref, src.recorded_base, src.where = text, recorded, where
            return src
        path = Path(text).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{where}: adapter folder {text!r} does not exist")
        return _from_folder(path, name or path.name, where)
    raise ValueError(
        f"{where}: cannot use a {type(ref).__name__} as an adapter; pass a PEFT adapter folder, "
        f"'hub:NAME', or a peft model"
    )


def _resolve_hub_ref(ref: str, where: str, registry: Any) -> tuple[Path, dict[str, Any] | None]:
    """Resolve ``hub:NAME`` through an AdapterRegistry: ``(registry.get(name) -> folder, the recorded base
    fingerprint or None)``."""
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
        show = getattr(registry, "show", None)
        recorded = show(ref).get("base") if callable(show) else None
    except (KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise type(exc)(f"{where}: 'hub:{ref}': {msg}") from None
    return Path(getattr(folder, "path", folder)), (dict(recorded) if isinstance(recorded, Mapping) else None)


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


def check_recorded_bases(sources: Sequence[LoraSource], base: Any) -> None:
    """Refuse merging registry adapters into a base other than the one the registry recorded for them.

    Args:
        sources: resolved adapters; those with a ``recorded_base`` (``hub:`` refs put with ``--base``) are checked.
        base: the base model the merge writes into (its :func:`adapterlab.io.base_fingerprint` is compared
            by :func:`adapterlab.io.fingerprint_digest`: shapes, quantization and zero pattern).

    Raises:
        ValueError: one line naming the adapter, its ref and both bases.
    """
    recorded = [(i, s) for i, s in enumerate(sources) if s.recorded_base]
    if not recorded:
        return
    from adapterlab.io import base_fingerprint, fingerprint_digest
    from adapterlab.registry.manifest import describe_base

    fp = base_fingerprint(base)
    have = fingerprint_digest(fp)
    for i, src in recorded:
        want = src.recorded_base or {}
        try:
            same = fingerprint_digest(want) == have
        except ValueError:  # a manifest of an older fingerprint format: compare what both have
            same = all(want.get(k) == fp.get(k) for k in ("shapes_digest", "quantization", "mask_digest"))
        if not same:
            raise ValueError(
                f"{src.where or f'adapters[{i}]'} ({src.name!r}, {src.ref}): the registry recorded it for base "
                f"{describe_base(want)}, "
                f"but the base to merge into is {describe_base(fp)}; merge it into the base it was made for "
                f"(output: full writes the adapter into this base)"
            )
