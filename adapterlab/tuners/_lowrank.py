"""Shared pieces of adapterlab's low-rank tuners (DyLoRA, LoRI, and later low-rank methods).

* :func:`lowrank_scale` — the LoRA scale ``alpha / r`` or, with rsLoRA, ``alpha / sqrt(r)``.
  (peft's own ``LoraConfig`` has the same switch: ``LoraConfig(use_rslora=True)``.)
* :class:`LowRankLayer` — a peft tuner layer around any linear base layer (``nn.Linear``, a pruned
  ``nn.Linear``, bitsandbytes ``Linear8bitLt`` / ``Linear4bit``) computing
  ``y = base(x) + s * dropout(x) A^T B^T``; subclasses only say what ``(A, B, s)`` are. Merging on
  dense bases adds the fp32 delta to the fp32 weight and casts once, in any base dtype; unmerge
  puts the pre-merge weight back, bit-exactly (``exact_unmerge=False`` saves that copy and
  subtracts instead). On 8-bit and 4-bit bases it dequantizes, adds the delta in fp32 and
  requantizes (4-bit: same quant_type/block size, read through
  :func:`adapterlab.quant.dequantize_weight`, so it is correct after CPU-repacking forwards), and
  unmerge restores the original codes exactly.
* validation helpers whose errors name the key and the expected value, and
  :func:`write_lora_dir`, which writes a plain peft LoRA adapter directory from factors.

Reference:
    LoRA, https://arxiv.org/abs/2106.09685; rsLoRA, https://arxiv.org/abs/2312.03732.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from adapterlab.quant import dequantize_weight, is_4bit, is_8bit, restore_weight_, set_weight_, snapshot_weight

logger = logging.getLogger(__name__)

#: Keys of the checkpoint whose length legitimately differs from the freshly built layer (LoRI-S).
VARIABLE_SIZE_SUFFIXES = (".values", ".indices")


class QuantizedMergeError(RuntimeError):
    """A quantization-aware merge into a bitsandbytes base that cannot be done or undone."""


# ---------------------------------------------------------------------------------------------
# scale and validation


def lowrank_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor ``s`` of ``Delta W = s * B A`` for rank ``r``.

    Args:
        alpha: ``lora_alpha``.
        r: the (active) rank.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Reference:
        Kalajdzievski, rsLoRA, https://arxiv.org/abs/2312.03732 (gamma_r = alpha / sqrt(r)).
    """
    if r <= 0:
        raise ValueError(f"r must be a positive integer, got {r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else float(r))


def check_int(name: str, value: Any, *, minimum: int = 1) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_common(config: Any) -> None:
    """Checks shared by every low-rank config: ``lora_alpha``, ``lora_dropout``, ``use_rslora``, targets."""
    if not isinstance(config.lora_alpha, (int, float)) or isinstance(config.lora_alpha, bool) or config.lora_alpha <= 0:
        raise ValueError(f"lora_alpha must be a positive number, got {config.lora_alpha!r}")
    if not (0.0 <= float(config.lora_dropout) < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {config.lora_dropout!r}")
    if not isinstance(config.use_rslora, bool):
        raise ValueError(f"use_rslora must be True or False, got {config.use_rslora!r}")
    if not isinstance(getattr(config, "exact_unmerge", True), bool):
        raise ValueError(f"exact_unmerge must be True or False, got {config.exact_unmerge!r}")
    tm = config.target_modules
    if tm is not None and not isinstance(tm, (str, list, set, tuple)):
        raise ValueError(f"target_modules must be a list of module names, a regex string or None, got {tm!r}")
    if isinstance(tm, (list, tuple)):
        config.target_modules = set(tm)


def check_target_modules(model: nn.Module, target_modules: Any) -> None:
    """Every name in a list-style ``target_modules`` must match some module of ``model``.

    peft's own check only says that nothing matched at all; this one names each unknown entry and
    lists the linear layer names that exist.

    Raises:
        ValueError: naming the unknown entries and the available linear layer names.
    """
    if target_modules is None or isinstance(target_modules, str):
        return  # regex / "all-linear": peft checks these
    names = [n for n, _ in model.named_modules() if n]
    unknown = []
    for t in sorted(target_modules):
        if not any(n == t or n.endswith("." + t) for n in names):
            unknown.append(t)
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules: {', '.join(map(repr, unknown))} match no module of the base model; "
            f"expected names of its linear layers, e.g. one of: {', '.join(linear)}"
        )


def check_loaded_shapes(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Compare an adapter checkpoint (keys already mapped to the model) with the model's tensors.

    Raises:
        ValueError: naming the first key whose shape (or recorded ``dims``) differs, with the
            expected value; the adapter was trained on a base with other shapes.
    """
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            continue
        expected = own[key]
        if key.endswith(".dims"):
            if not torch.equal(value.to(expected.dtype).flatten(), expected.flatten()):
                raise ValueError(
                    f"cannot load adapter tensor {key!r}: the adapter was trained on a layer with "
                    f"(d_out, r, d_in) = {tuple(value.tolist())}, the base model's layer has "
                    f"{tuple(expected.tolist())} (expected dims={tuple(expected.tolist())}; a base with other shapes)"
                )
            continue
        if key.endswith(VARIABLE_SIZE_SUFFIXES):
            continue
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(
                f"cannot load adapter tensor {key!r}: shape {tuple(value.shape)} does not match the "
                f"base model's layer (expected shape {tuple(expected.shape)}); the adapter was trained on "
                f"a base with other shapes"
            )


# ---------------------------------------------------------------------------------------------
# the layer


def _base_features(base: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like base layer (bnb layers keep the logical ones)."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    raise ValueError(f"{type(base).__name__} is not a linear layer (no in_features/out_features)")


class LowRankLayer(nn.Module, BaseTunerLayer):
    """A peft tuner layer ``y = base(x) + sum_adapters s * dropout(x) A^T B^T``.

    Subclasses set ``adapter_layer_names``/``other_param_names``, create their factors in
    ``update_layer`` and implement :meth:`factors`. ``dropout`` is a ``ModuleDict`` named
    ``<prefix>dropout``.

    Semantics:
        for each active adapter a: A, B, s = factors(a)        # A: (r, d_in), B: (d_out, r)
            y += s * (dropout_a(x) @ A.T) @ B.T                 # in the adapters' dtype (fp32 on a half base)
        merge:   W0 = W;  W = (W.float() + s * B @ A).to(W.dtype)    # fp32 add, one cast
        unmerge: W = W0   (bit-exact; memory: one copy of each merged layer's weight while merged.
                           exact_unmerge=False drops it: W = (W.float() - s * B @ A).to(W.dtype), with a warning)
        4/8-bit bases: dequantize -> fp32 add -> requantize; unmerge restores the saved codes
    """

    dropout_name: str = "lowrank_dropout"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.in_features, self.out_features = _base_features(self.get_base_layer())
        #: per adapter, a stack of original 4/8-bit codes (+ quant state / scales) saved by merge for an exact unmerge
        self._quant_cache: dict[str, list[dict[str, Any]]] = {}
        #: the module's name in the base model, e.g. "model.layers.0.self_attn.q_proj"
        self.key: str = str(kwargs.get("key", ""))
        #: per adapter, whether merge keeps the pre-merge weight for a bit-exact unmerge (config ``exact_unmerge``)
        self.exact_unmerge: dict[str, bool] = {}
        #: ``(number of adapters merged before it, the base weight tensor)`` saved by the first exact merge
        self._pre_merge: tuple[int, torch.Tensor] | None = None

    # -- subclass interface ------------------------------------------------------------------
    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A (r, d_in), B (d_out, r), scale)`` of ``adapter`` as used by forward right now.

        Every concrete layer (DyLoRA, LoRI) overrides this.
        """
        raise TypeError(f"{type(self).__name__} does not define factors(); subclasses must")

    def merge_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The factors merged by :meth:`merge` (default: :meth:`factors` in eval semantics)."""
        was = self.training
        self.training = False
        try:
            return self.factors(adapter)
        finally:
            self.training = was

    def unmerge_factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The factors :meth:`unmerge` subtracts (default: the same as :meth:`merge_factors`)."""
        return self.merge_factors(adapter)

    def _has_adapter(self, adapter: str) -> bool:
        return adapter in getattr(self, self.adapter_layer_names[0])

    def _add_dropout(self, adapter: str, p: float) -> None:
        drop = getattr(self, self.dropout_name)
        drop[adapter] = nn.Dropout(p) if p > 0 else nn.Identity()

    # -- delta / merge -------------------------------------------------------------------------
    def delta_weight(self, adapter: str) -> torch.Tensor:
        """``s * B A`` in fp32, shape (d_out, d_in)."""
        a, b, s = self.merge_factors(adapter)
        return (b.detach().float() @ a.detach().float()) * s  # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    def _add_to_base_(self, delta: torch.Tensor, adapter: str, *, safe_merge: bool, sign: float) -> None:
        base = self.get_base_layer()
        if is_4bit(base) or is_8bit(base):
            self._add_to_quantized_(base, delta, adapter, safe_merge=safe_merge, sign=sign)
            return
        w = base.weight
        merged = w.data.float() + sign * delta.to(w.device)  # (d_out, d_in) fp32
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs/Infs in the merged weights of adapter {adapter!r}; the adapter is broken")
        if sign > 0:
            self._keep_pre_merge(adapter, w.data)
        w.data = merged.to(w.dtype)

    def _add_to_quantized_(
        self, base: nn.Module, delta: torch.Tensor, adapter: str, *, safe_merge: bool, sign: float
    ) -> None:
        """4/8-bit base: merge = dequantize (either CPU layout) -> add in fp32 -> requantize (same
        quant type / block size; 8-bit row-wise); unmerge puts the saved codes back."""
        if sign < 0:
            stack = self._quant_cache.get(adapter)
            if not stack:
                raise QuantizedMergeError(f"no saved quantized weight to unmerge adapter {adapter!r}")
            restore_weight_(base, stack.pop())
            return
        merged = dequantize_weight(base) + delta.to(base.weight.device)  # (d_out, d_in) fp32
        if safe_merge and not torch.isfinite(merged).all():
            raise ValueError(f"NaNs/Infs in the merged weights of adapter {adapter!r}")
        self._quant_cache.setdefault(adapter, []).append(snapshot_weight(base))
        set_weight_(base, merged)

    def _keep_pre_merge(self, adapter: str, weight: torch.Tensor) -> None:
        """Hold the pre-merge weight tensor (no copy: merge assigns a new one) for an exact unmerge.

        Called by every dense merge before the weight is replaced. With ``exact_unmerge=False`` the
        adapter warns instead: its unmerge subtracts the delta, which in bf16/fp16 (and often in
        fp32) does not give back the base's bits.
        """
        if not self.exact_unmerge.get(adapter, True):
            warnings.warn(
                f"adapter {adapter!r} has exact_unmerge=False: unmerge will subtract the delta, which does not "
                f"restore the base weights bit-exactly (every merge/unmerge cycle, e.g. disable_adapter() on a "
                f"merged model, drifts them in bf16/fp16)",
                stacklevel=4,
            )
            return
        if self._pre_merge is None:
            self._pre_merge = (len(self.merged_adapters), weight)

    def _restore_pre_merge(self) -> list[str]:
        """Put the saved pre-merge weight back; returns the adapters that this undid (merged after it)."""
        if self._pre_merge is None:
            return []
        at, weight = self._pre_merge
        self.get_base_layer().weight.data = weight
        self._pre_merge = None
        undone, self.merged_adapters[:] = self.merged_adapters[at:], self.merged_adapters[:at]
        return undone

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add ``s * B A`` of each adapter to the base weight (fp32, cast once)."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self._has_adapter(adapter):
                continue
            self._before_merge(adapter)
            self._add_to_base_(self.delta_weight(adapter), adapter, safe_merge=safe_merge, sign=1.0)
            self.merged_adapters.append(adapter)

    def _before_merge(self, adapter: str) -> None:
        """Hook for subclasses (DyLoRA records the merged rank)."""

    def _after_unmerge(self, adapter: str) -> None:
        """Hook for subclasses."""

    def unmerge(self) -> None:
        """Undo :meth:`merge` for every merged adapter, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        for adapter in self._restore_pre_merge():
            self._after_unmerge(adapter)
        while self.merged_adapters:  # merged with exact_unmerge=False, or into a 4/8-bit base (codes restored)
            adapter = self.merged_adapters.pop()
            if not self._has_adapter(adapter):
                continue
            a, b, s = self.unmerge_factors(adapter)
            delta = (b.detach().float() @ a.detach().float()) * s  # (d_out, d_in)
            self._add_to_base_(delta, adapter, safe_merge=False, sign=-1.0)
            self._after_unmerge(adapter)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        drop = getattr(self, self.dropout_name)
        for adapter in self.active_adapters:
            if not self._has_adapter(adapter):
                continue
            a, b, s = self.factors(adapter)
            ct = torch.promote_types(a.dtype, b.dtype)  # fp32 adapters on a half base (peft's autocast convention)
            h = drop[adapter](x.to(ct))  # (..., d_in)
            out = (h @ a.to(ct).T) @ b.to(ct).T  # (..., r) -> (..., d_out)
            result = result + (out * s).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}({super().__repr__()})"


def replace_with(
    tuner: Any,
    layer_cls: type[LowRankLayer],
    config: Any,
    adapter_name: str,
    target: nn.Module,
    target_name: str,
    parent: nn.Module,
    current_key: str,
    name: str,
) -> None:
    """Shared ``_create_and_replace``: add the adapter to an existing layer or wrap a linear base."""
    if isinstance(target, layer_cls):
        target.update_layer(adapter_name, config, key=current_key)
        return
    if isinstance(target, BaseTunerLayer):
        raise ValueError(f"{name}: {current_key} is already wrapped by another tuner ({type(target).__name__})")
    if not isinstance(target, nn.Linear):  # bitsandbytes Linear4bit / Linear8bitLt are nn.Linear subclasses
        raise ValueError(
            f"{name} supports linear layers only; target_modules selects {current_key} "
            f"({type(target).__name__}); expected nn.Linear (or a bitsandbytes 4/8-bit linear)"
        )
    new_module = layer_cls(target, adapter_name, config, key=current_key)
    if adapter_name not in tuner.active_adapters:
        new_module.requires_grad_(False)
    tuner._replace_module(parent, target_name, new_module, target)


def tuner_layers(model: nn.Module, layer_cls: type[LowRankLayer]) -> Iterable[tuple[str, LowRankLayer]]:
    """``(base-model module key, layer)`` for every ``layer_cls`` inside ``model`` (PeftModel or tuner)."""
    for module in model.modules():
        if isinstance(module, layer_cls):
            yield module.key, module


# ---------------------------------------------------------------------------------------------
# plain LoRA export


def write_lora_dir(
    save_directory: str | os.PathLike[str],
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a plain peft LoRA adapter directory (``adapter_config.json`` + safetensors), atomically.

    A thin front of :func:`adapterlab.lora_dir.write_lora_dir` (the one PEFT LoRA writer)
    that keeps the adapter's own ``r`` / ``lora_alpha`` / ``use_rslora``.

    Args:
        save_directory: the folder to create (replaced if it exists).
        factors: base-model module key (e.g. ``"model.layers.0.self_attn.q_proj"``) to
            ``(A (r, d_in), B (d_out, r))``.
        r / lora_alpha / use_rslora: written to ``LoraConfig``; the scale any peft user gets is
            ``lora_alpha / r`` (or ``/ sqrt(r)`` with rsLoRA).
        base_model_name_or_path: recorded in the config.
        metadata: provenance stored in the safetensors header.

    Returns:
        The directory.
    """
    from adapterlab.lora_dir import write_lora_dir as write_peft_lora
    from adapterlab.staging import staged_dir

    bad = sorted(k for k, (a, _) in factors.items() if a.shape[0] != r)
    if bad:
        raise ValueError(f"factors of {bad[:3]} do not have rank r={r}")
    out = Path(save_directory)
    with staged_dir(out, overwrite=True) as stage:
        write_peft_lora(
            stage,
            {k: (b, a) for k, (a, b) in factors.items()},
            base_model_name_or_path=base_model_name_or_path,
            metadata=dict(metadata or {}),
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
        )
    return out


class AdapterlabTuner(BaseTuner):
    """The peft glue every adapterlab tuner shares: target check, layer replacement, load-time shape check.

    Subclasses set ``prefix``, ``tuner_layer_cls`` and ``tuner_name`` (the registered peft type name),
    and may extend :meth:`check_loaded` (e.g. with a sparsity-pattern check).
    """

    tuner_name: str = ""
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _pre_injection_hook(self, model: nn.Module, config: Any, adapter_name: str) -> None:
        check_target_modules(model, config.target_modules)

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        replace_with(
            self,
            self.tuner_layer_cls,
            peft_config,
            adapter_name,
            target,
            target_name,
            parent,
            current_key,
            self.tuner_name,
        )

    @classmethod
    def check_loaded(cls, model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refuse an adapter state dict that does not fit ``model`` (runs on every load)."""
        check_loaded_shapes(model, state_dict)

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        out = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        cls.check_loaded(model, out)
        return out
