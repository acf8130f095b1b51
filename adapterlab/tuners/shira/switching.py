"""Rapid switching and multi-adapter fusion of SHiRA adapters held in memory.

Switching touches only the ``K`` masked entries of each layer: the previous adapter's entries get
their cached base values back, then the new adapter's values are scatter-added (O(K) per layer
instead of LoRA's O(m n r) dense ``W +/- s B A``). Because the overwritten base values are kept
(never recomputed by subtraction), ``A -> B -> A`` and fuse -> unfuse are bit-identical in any dtype.

Reference:
    Bhardwaj et al., SHiRA, https://arxiv.org/abs/2406.13175 (Sec. 4, rapid switching; Sec. 5.3, fusion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from adapterlab.tuners.shira.layer import ShiraLayer


@dataclass
class FuseReport:
    """What :func:`fuse_adapters` / :func:`switch_adapter` did.

    Attributes:
        weights: adapter -> fusion weight now in the base weights.
        layers: number of SHiRA layers written.
        entries: base entries overwritten (sum of K over fused adapters and layers).
    """

    weights: dict[str, float] = field(default_factory=dict)
    layers: int = 0
    entries: int = 0


def _layers(model: nn.Module) -> list[ShiraLayer]:
    layers = [m for m in model.modules() if isinstance(m, ShiraLayer)]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no adapterlab SHiRA layers; build it with get_peft_model(model, ShiraConfig(...))"
        )
    return layers


def _validate(layers: list[ShiraLayer], weights: Mapping[str, float]) -> None:
    """Every check before any weight is written (a failed switch leaves the weights untouched)."""
    if not weights:
        raise ValueError("no adapter to fuse; expected at least one {name: weight}")
    found = dict.fromkeys(weights, False)
    for layer in layers:
        held = layer.adapterlab_shira_values  # one module attribute look-up per layer
        layer._writable_weight()  # quantized bases: clear error before anything changes
        for name in weights:
            if name in held:
                found[name] = True
                layer.check_adapter(name)
                if layer.shira_pending.get(name) == "calibrate":
                    raise ValueError(
                        f"adapter {name!r} has an uncalibrated grad/snip mask (e.g. {layer.key}); call calibrate_masks_ first"
                    )
    for name, w in weights.items():
        if not found[name]:
            loaded = sorted({a for layer in layers for a in layer.adapterlab_shira_values})
            raise ValueError(f"adapter {name!r} is not loaded; loaded SHiRA adapters: {', '.join(loaded) or '(none)'}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(float(w)):
            raise ValueError(f"fusion weight of {name!r} must be a finite number, got {w!r}")


def unfuse_adapters(model: nn.Module) -> int:
    """Restore the exact base weights of every SHiRA layer (undo all fused adapters).

    Returns:
        The number of layers that had fused adapters.
    """
    count = 0
    for layer in _layers(model):
        if layer.merged:
            layer.unmerge()
            count += 1
    return count


def fuse_adapters(model: nn.Module, weights: Mapping[str, float]) -> FuseReport:
    """Fuse several SHiRA adapters into the base weights: ``W = W_base + sum_i w_i alpha_i S_i``.

    Adapters fused before are unfused first (exactly), so the result depends only on ``weights``.
    Overlapping entries sum. Per layer the fp32 sum of all adapters is scatter-added into an fp32
    copy of only the touched base entries and cast once, so in every dtype the weight is
    ``(W_base.float() + sum_i w_i alpha_i S_i).to(W.dtype)`` bit for bit. Every adapter is validated
    before any weight changes.

    Args:
        model: a peft model (or any model) with adapterlab SHiRA layers.
        weights: adapter name -> fusion weight (e.g. ``{"style": 1.0, "task": 0.8}``).

    Returns:
        A :class:`FuseReport`.

    Raises:
        ValueError: an adapter is not loaded, was trained for other shapes, has an uncalibrated
            mask, or a weight is not a finite number (nothing is changed).
    """
    layers = _layers(model)
    weights = dict(weights)
    _validate(layers, weights)
    report = FuseReport(weights={k: float(v) for k, v in weights.items()})
    names = list(weights)
    for layer in layers:
        if layer.merged_adapters:
            layer.unmerge()
        held = layer.adapterlab_shira_values
        present = {n: float(weights[n]) for n in names if n in held}
        if present:
            layer.fuse_many_(present)  # the fp32 sum of all adapters on the touched entries, cast once
            report.entries += sum(held[n].numel() for n in present)
            report.layers += 1
        # layers without these adapters must not add another (unmerged) adapter in forward
        layer._active_adapter = names if len(names) > 1 else names[0]
    return report


def switch_adapter(model: nn.Module, name: str, *, weight: float = 1.0) -> FuseReport:
    """Make ``name`` the one fused adapter: restore the previous adapter's entries, scatter ``name`` in.

    Cost per layer is O(K) (gather + two scatters); the previous base values are restored from
    the cache, so ``switch_adapter(m, "a"); switch_adapter(m, "b"); switch_adapter(m, "a")`` gives
    bit-identical weights to the first call.

    Args:
        model: a peft model with adapterlab SHiRA layers (adapters already in memory, e.g. via
            ``PeftModel.load_adapter`` or :func:`adapterlab.tuners.shira.load_shira`).
        name: the adapter to switch to.
        weight: its fusion weight (strength knob, default 1).

    Raises:
        ValueError: ``name`` is not loaded or was trained for other shapes (weights untouched).
    """
    return fuse_adapters(model, {name: weight})
