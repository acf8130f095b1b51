"""Merge one low-rank adapter into its base: masked (SparsePEFT) and quantization-aware.

:func:`merge` is adapterlab's ``merge_and_unload`` for LoRA (also rsLoRA), DyLoRA and LoRI adapters
(and for models prepared by :func:`adapterlab.retrain.perp_`):

* ``keep_sparsity=True`` multiplies every layer's delta by the base's keep mask
  ``M = 1[W_base != 0]`` (SQFT's SparsePEFT merge) and checks afterwards that
  ``(W_merged == 0) ⊇ (W_base == 0)``, and that an N:M pattern of the base still holds;
* on a bitsandbytes 4-bit base it dequantizes the weight to fp32 through
  :func:`adapterlab.quant.dequantize_weight` (correct in both bitsandbytes CPU layouts, so after
  inference forwards too), adds the delta in fp32 and requantizes with the layer's own quant type
  and block size; 8-bit bases are requantized row-wise. NF4/FP4 map 0 to 0, so zeros of a pruned
  and quantized base stay zero;
* it reports the output change against the unmerged adapter on a fixed probe batch.

Everything is validated before the first weight is written (unknown adapter, unsupported layer,
mask of the wrong shape, ``keep_sparsity`` on a dense base, non-finite factors, a 4-bit layer that
bitsandbytes cannot run on this CPU), so a bad call leaves the model as it was.

Semantics:
    for each layer l holding adapter a:  A, B, s = factors(l, a)      # A (r, d_in), B (d_out, r)
        W = dequantize(l.base)                                        # fp32 (d_out, d_in)
        D = s * B @ A                                                 # fp32
        if keep_sparsity: D = D * (W != 0)                            # or the given mask
        l.base.weight = quantize_like(l.base, W + D)                  # cast / requantize once
    replace every tuner layer by its base layer

Reference:
    SQFT (SparsePEFT), https://arxiv.org/abs/2410.03750; QLoRA, https://arxiv.org/abs/2305.14314.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, overload

import torch
from torch import Tensor, nn

from adapterlab.pruning.functional import SparsityError, check_nm, detect_nm, parse_pattern
from adapterlab.quant import (
    check_cpu_4bit_inference,
    dequantize_weight,
    module_quantization,
    set_weight_,
)

logger = logging.getLogger(__name__)

SUPPORTED_ADAPTERS = "LoRA (incl. rsLoRA), DyLoRA, LoRI"


@dataclass
class LayerMerge:
    """What the merge did to one layer (weights counted after dequantization)."""

    name: str
    shape: tuple[int, int]
    quantization: str | None
    zeros_before: int
    zeros_after: int
    delta_norm: float
    kept_delta_norm: float
    nm_valid: bool | None = None


@dataclass
class IntoBaseReport:
    """Result of :func:`merge`: per-layer zeros, the N:M check and the output change on a probe."""

    adapter_name: str
    keep_sparsity: bool
    layers: list[LayerMerge] = field(default_factory=list)
    pattern: str | None = None
    output_rel_change: float | None = None
    output_max_abs_change: float | None = None

    @property
    def zeros_before(self) -> int:
        return sum(r.zeros_before for r in self.layers)

    @property
    def zeros_after(self) -> int:
        return sum(r.zeros_after for r in self.layers)

    @property
    def numel(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.numel if self.numel else 0.0

    @property
    def sparsity_after(self) -> float:
        return self.zeros_after / self.numel if self.numel else 0.0

    @property
    def nm_valid(self) -> bool | None:
        vals = [r.nm_valid for r in self.layers if r.nm_valid is not None]
        return all(vals) if vals else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter_name": self.adapter_name,
            "keep_sparsity": self.keep_sparsity,
            "pattern": self.pattern,
            "nm_valid": self.nm_valid,
            "sparsity_before": self.sparsity_before,
            "sparsity_after": self.sparsity_after,
            "output_rel_change": self.output_rel_change,
            "output_max_abs_change": self.output_max_abs_change,
            "layers": [asdict(r) for r in self.layers],
        }


# ---------------------------------------------------------------------------------------------
# adapter layers


@dataclass
class _Site:
    name: str  # base-model module name, e.g. "model.layers.0.self_attn.q_proj"
    layer: nn.Module  # the tuner layer
    kind: str  # "lowrank" (adapterlab) | "lora" (peft)


def _is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "unload")


def _sites(model: nn.Module, adapter: str) -> list[_Site]:
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    from adapterlab.tuners._lowrank import LowRankLayer

    sites: list[_Site] = []
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        key = name.removeprefix("base_model.model.").removeprefix("base_model.")
        if isinstance(module, LowRankLayer):
            if module._has_adapter(adapter):
                sites.append(_Site(key, module, "lowrank"))
            continue
        if isinstance(module, LoraLayer):
            if adapter not in module.lora_A:
                continue
            if module.use_dora.get(adapter, False):
                raise ValueError(
                    f"layer {key!r}: DoRA adapters are not supported by merge; supported: {SUPPORTED_ADAPTERS}"
                )
            if not isinstance(module.lora_A[adapter], nn.Linear) or getattr(module, "fan_in_fan_out", False):
                raise ValueError(
                    f"layer {key!r}: merge supports LoRA on nn.Linear layers (no fan_in_fan_out); "
                    f"got {type(module).__name__}"
                )
            sites.append(_Site(key, module, "lora"))
            continue
        adapters = getattr(module, "active_adapters", [])
        if adapter in adapters or any(
            adapter in getattr(module, n, {}) for n in getattr(module, "adapter_layer_names", ())
        ):
            raise ValueError(
                f"layer {key!r} is a {type(module).__name__}; merge supports {SUPPORTED_ADAPTERS} "
                f"(use the tuner's own merge_and_unload for other methods)"
            )
    return sites


def _factors(site: _Site, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A (r, d_in), B (d_out, r), s)`` detached."""
    layer = site.layer
    if site.kind == "lowrank":
        a, b, s = layer.merge_factors(adapter)
        return a.detach(), b.detach(), float(s)
    return layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(), float(layer.scaling[adapter])


def _delta(site: _Site, adapter: str) -> torch.Tensor:
    if site.kind == "lowrank":
        return site.layer.delta_weight(adapter).float()  # (d_out, d_in)
    a, b, s = _factors(site, adapter)
    return (b.float() @ a.float()) * s  # (d_out, r) @ (r, d_in) -> (d_out, d_in)


def _lora_bias(site: _Site, adapter: str) -> torch.Tensor | None:
    if site.kind != "lora" or not site.layer.lora_bias.get(adapter, False):
        return None
    bias = site.layer.lora_B[adapter].bias
    return None if bias is None else bias.detach().float() * float(site.layer.scaling[adapter])


# ---------------------------------------------------------------------------------------------
# probe


def _probe_ids(model: nn.Module, probe: bool | torch.Tensor) -> torch.Tensor | None:
    if probe is False or probe is None:
        return None
    if isinstance(probe, torch.Tensor):
        if probe.dim() != 2 or probe.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"probe must be a (batch, seqlen) tensor of token ids, got {tuple(probe.shape)} {probe.dtype}"
            )
        return probe.long()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return None
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, int(vocab), (2, 32), generator=g)


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids.to(device)).logits.float().cpu()
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------------------
# merge


@overload
def merge(
    model: nn.Module,
    *,
    keep_sparsity: bool = ...,
    adapter_name: str | None = ...,
    masks: Mapping[str, torch.Tensor] | None = ...,
    pattern: str | None = ...,
    probe: bool | torch.Tensor = ...,
    return_report: Literal[False] = ...,
) -> nn.Module: ...


@overload
def merge(
    model: nn.Module,
    *,
    keep_sparsity: bool = ...,
    adapter_name: str | None = ...,
    masks: Mapping[str, torch.Tensor] | None = ...,
    pattern: str | None = ...,
    probe: bool | torch.Tensor = ...,
    return_report: Literal[True],
) -> tuple[nn.Module, Any]: ...


def merge(
    model: nn.Module,
    *,
    keep_sparsity: bool = False,
    adapter_name: str | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    pattern: str | None = None,
    probe: bool | torch.Tensor = True,
    return_report: bool = False,
) -> nn.Module | tuple[nn.Module, Any]:
    """Merge a low-rank adapter into its base and return the base model (like ``merge_and_unload``).

    Args:
        model: a ``PeftModel`` holding a LoRA / rsLoRA / DyLoRA / LoRI adapter on a plain, pruned,
            or bitsandbytes 4-/8-bit base; or a model prepared by :func:`adapterlab.retrain.perp_`
            (then the PERP layers are merged in place, see :func:`adapterlab.retrain.merge_perp_`).
        keep_sparsity: mask each delta by the base's keep mask (``W != 0``) and verify afterwards
            that every zero of the base is still zero (and the base's N:M pattern still holds).
        adapter_name: the adapter to merge (default: the active one). Other adapters are dropped.
        masks: optional keep masks ``{base module name: bool (d_out, d_in)}`` (e.g.
            :func:`adapterlab.pruning.get_masks` of the pruned base), intersected with ``W != 0``
            (so a zero of the base always stays zero); only with ``keep_sparsity=True``.
        pattern: ``"N:M"`` to check after the merge; default: detected on the base (2:4, 4:8, 1:4).
        probe: compare the logits of the unmerged and merged model on a probe batch (True: two
            seeded random sequences of 32 ids; a ``(batch, seqlen)`` id tensor; False: skip).
        return_report: also return an :class:`IntoBaseReport`.

    Returns:
        The base model with the adapter merged (and the report with ``return_report=True``).

    Raises:
        ValueError: unknown adapter, unsupported layer (DoRA, embeddings, SPP, ...), a mask whose
            name or shape does not match, ``keep_sparsity`` on a base without zeros, non-finite
            factors, or a 4-bit layer bitsandbytes cannot run on this CPU. Nothing is modified.
        SparsityError: the verification failed (a bug, never expected).

    Reference:
        SQFT SparsePEFT, https://arxiv.org/abs/2410.03750
    """
    from adapterlab.retrain.perp import has_perp_layers, merge_perp_

    if not isinstance(keep_sparsity, bool):
        raise ValueError(f"keep_sparsity must be True or False, got {keep_sparsity!r}")
    if not _is_peft_model(model):
        if has_perp_layers(model):
            perp_report = merge_perp_(model, pattern=pattern)
            return (model, perp_report) if return_report else model
        raise ValueError(
            f"merge expects a peft PeftModel holding a {SUPPORTED_ADAPTERS} adapter, or a model prepared "
            f"by adapterlab.perp_; got {type(model).__name__}"
        )
    if masks is not None and not keep_sparsity:
        raise ValueError("masks are only used with keep_sparsity=True")
    nm_arg = parse_pattern(pattern)

    adapters = list(model.peft_config)
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active if isinstance(active, str) else (active[0] if active else None)
    if adapter_name not in adapters:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not an adapter of this model; choose one of: {', '.join(adapters)}"
        )
    sites = _sites(model, adapter_name)
    if not sites:
        raise ValueError(f"adapter {adapter_name!r} has no layers in this model")

    # ---- validate everything before the first write ----
    quantized = any(module_quantization(s.layer) for s in sites)
    if any((module_quantization(s.layer) or "").startswith("bnb-4bit") for s in sites):
        check_cpu_4bit_inference(model)
    names = {s.name for s in sites}
    if masks is not None:
        unknown = sorted(set(masks) - names)
        if unknown:
            raise ValueError(
                f"masks name {len(unknown)} layer(s) the adapter does not touch, e.g. {unknown[0]!r}; "
                f"expected names such as {', '.join(sorted(names)[:3])}"
            )
    total_zeros = 0
    for s in sites:
        a, b, _ = _factors(s, adapter_name)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"adapter {adapter_name!r} has NaN/Inf factors in layer {s.name!r}")
        shape = (s.layer.out_features, s.layer.in_features)
        if masks is not None and s.name in masks:
            m = masks[s.name]
            if tuple(m.shape) != shape:
                raise ValueError(f"mask {s.name!r} has shape {tuple(m.shape)}, the layer's weight has {shape}")
            total_zeros += int((~m.bool()).sum())
        elif keep_sparsity:
            total_zeros += int((dequantize_weight(s.layer) == 0).sum())
    if keep_sparsity and total_zeros == 0:
        raise ValueError(
            "keep_sparsity=True but the base is dense: no layer the adapter touches has a zero weight "
            "(prune the base first, e.g. adapterlab.prune_, or pass keep_sparsity=False)"
        )

    ids = _probe_ids(model, probe)
    before = _logits(model, ids) if ids is not None else None

    # ---- merge layer by layer ----
    report = IntoBaseReport(adapter_name=adapter_name, keep_sparsity=keep_sparsity)
    patterns: set[str] = set()
    for s in sites:
        base = s.layer.get_base_layer()
        w = dequantize_weight(base)  # (d_out, d_in) fp32
        zero = w == 0
        delta = _delta(s, adapter_name).to(w.device)
        full_norm = float(delta.norm())
        if keep_sparsity:
            keep = ~zero
            if masks is not None and s.name in masks:
                keep = keep & masks[s.name].to(w.device, torch.bool)  # a given mask can only be stricter
            delta = delta * keep
        set_weight_(base, w + delta)
        bias = _lora_bias(s, adapter_name)
        if bias is not None and base.bias is not None:
            base.bias.data = (base.bias.data.float() + bias.to(base.bias.device)).to(base.bias.dtype)
        after = dequantize_weight(base)
        nm = nm_arg or (detect_nm(zero) if keep_sparsity else None)
        nm_ok = None
        if keep_sparsity:
            lost = zero & (after != 0)
            if bool(lost.any()):
                raise SparsityError(
                    f"layer {s.name!r}: {int(lost.sum())} pruned weight(s) became non-zero in the merge"
                )
            if nm is not None:
                nm_ok = check_nm(after, *nm)
                patterns.add(f"{nm[0]}:{nm[1]}")
                if not nm_ok:
                    raise SparsityError(f"layer {s.name!r}: the {nm[0]}:{nm[1]} pattern no longer holds")
        elif nm is not None:
            nm_ok = check_nm(after, *nm)
            patterns.add(f"{nm[0]}:{nm[1]}")
        report.layers.append(
            LayerMerge(
                name=s.name,
                shape=(int(w.shape[0]), int(w.shape[1])),
                quantization=module_quantization(base),
                zeros_before=int(zero.sum()),
                zeros_after=int((after == 0).sum()),
                delta_norm=full_norm,
                kept_delta_norm=float(delta.norm()),
                nm_valid=nm_ok,
            )
        )
    report.pattern = ",".join(sorted(patterns)) or None

    merged_model = model.unload()
    if before is not None:
        out = _logits(merged_model, ids)
        report.output_rel_change = float((out - before).norm() / before.norm().clamp_min(1e-12))
        report.output_max_abs_change = float((out - before).abs().max())
    logger.info(
        "merged adapter %r into %d layer(s)%s%s: sparsity %.4f -> %.4f, output change %s",
        adapter_name,
        len(sites),
        " (quantized base)" if quantized else "",
        " keeping sparsity" if keep_sparsity else "",
        report.sparsity_before,
        report.sparsity_after,
        "n/a" if report.output_rel_change is None else f"{report.output_rel_change:.3g} (relative)",
    )
    return (merged_model, report) if return_report else merged_model


# ------------------------------------------------------------------------------------------------
# writing a delta into base weights: one rounding rule


def add_to_weight(w: Tensor, delta: Tensor, *, keep_sparsity: bool = False) -> Tensor:
    """The merged weight ``(w.float() + Δ).to(w.dtype)``: fp32 add, one cast (Δ is never rounded first).

    Args:
        w: ``[*shape]`` base weight (or a gathered subset of its entries), any float dtype.
        delta: ``[*shape]`` merged delta (any float dtype; added in fp32).
        keep_sparsity: add ``Δ ⊙ 1[w != 0]`` instead, so that every zero of ``w`` stays zero.

    Returns:
        ``[*shape]`` in ``w.dtype``.

    Semantics:
        base = float32(w)
        d = where(base == 0, 0, delta) if keep_sparsity else delta
        merged = cast(base + float32(d), w.dtype)
    """
    base = w.detach().to(torch.float32)
    d = delta.to(device=base.device, dtype=torch.float32)
    if keep_sparsity:
        d = torch.where(base == 0, torch.zeros((), dtype=torch.float32, device=base.device), d)  # NaN-safe mask
    return (base + d).to(w.dtype)


def write_merged_(
    model: nn.Module, name: str, delta: Tensor, *, keep_sparsity: bool = False, index: Tensor | None = None
) -> int:
    """Write ``(W.float() + Δ).to(W.dtype)`` into ``model``'s weight ``name`` (one rounding), in place.

    Args:
        model: the model whose weight is written (a copy of the base).
        name: module name.
        delta: ``[d_out, d_in]`` fp32 merged delta, or ``[U]`` values at the flat positions ``index``.
        keep_sparsity: mask the delta by the base's zeros (``W != 0``) and check afterwards that every
            zero of the base is still zero.
        index: ``[U]`` int64 flat row-major positions (sparse form), or None for a dense delta.

    Returns:
        How many zeros of the base weight are non-zero after the write (counted on the written weight).

    Raises:
        SparsityError: ``keep_sparsity`` and a zero of the base became non-zero (never expected).
    """
    w = model.get_submodule(name).weight
    with torch.no_grad():
        if index is None:
            zero = w == 0  # [d_out, d_in]
            w.copy_(add_to_weight(w, delta, keep_sparsity=keep_sparsity))
            hit = int((zero & (w != 0)).sum())
        else:
            flat = w.data.view(-1)  # [d_out * d_in], a view: index_put_ writes the weight in place
            old = flat.index_select(0, index)  # [U]
            flat.index_put_((index,), add_to_weight(old, delta, keep_sparsity=keep_sparsity))
            hit = int(((old == 0) & (flat.index_select(0, index) != 0)).sum())  # entries off the union are untouched
    if keep_sparsity and hit:
        raise SparsityError(f"module {name!r}: {hit} zero weight(s) of the base became non-zero in the merge")
    return hit


def zeros_hit_note(hits: Mapping[str, int]) -> str | None:
    """The warning for a full merge that filled zeros of the base (None when it filled none)."""
    hit = {n: h for n, h in hits.items() if h}
    if not hit:
        return None
    return (
        f"output='full': {sum(hit.values())} zero weight(s) of the base in {len(hit)} module(s) (e.g. "
        f"{next(iter(hit))!r}) are non-zero after the merge where the base weight is 0, so the base's sparsity is "
        f"not kept there; pass keep_sparsity=True to mask the merge by the base's zeros"
    )
