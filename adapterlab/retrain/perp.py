"""PERP: parameter-efficient retraining after pruning.

:func:`perp_` freezes a pruned model and marks a small, expressive subset trainable (see
``methods/perp.md`` §2):

============== ================================================================================
subset         what becomes trainable
============== ================================================================================
``bias``       every ``bias`` tensor outside norm layers (OPT has them; Llama has none)
``norm``       every parameter of LayerNorm / RMSNorm modules (weights and biases)
``head``       a plain LoRA on the output head (not pruned, so a dense merge is fine)
``mask_lora``  MaskLoRA on every pruned decoder linear: ``W_eff = W + s (B A) ⊙ M``, ``M = 1[W != 0]``
``scale_lora`` ScaleLoRA on every pruned decoder linear: ``W_eff = W ⊙ (B A)``, ``A = B = 1/√r``
``full``       every parameter (the full-retraining reference; keep the mask with
               :class:`adapterlab.callbacks.MaskKeeperCallback`)
============== ================================================================================

Presets: ``"default"`` = bias + norm + head + mask_lora (the reference repo's defaults),
``"bias_norm"``, ``"mask_lora"`` (bias + norm + mask_lora), ``"scale_lora"`` (bias + norm +
scale_lora), ``"full"``. A list of subset names is accepted too.

:func:`merge_perp_` folds the layers back into plain ``nn.Linear`` s (MaskLoRA: ``W += s (BA) ⊙ M``,
ScaleLoRA: ``W *= BA``, head LoRA: dense, untying a tied head) in fp32 and verifies that every zero
of the pruned base is still zero.

Semantics:
    MaskLoRA:  y = x (W + s * (B @ A) * M)^T + b            # dense (d_out, d_in) temporary per layer
    ScaleLoRA: y = x (W * (B @ A))^T + b
    head LoRA: y = head(x) + s * (x @ A^T) @ B^T

Reference:
    Zimmer et al., PERP, https://arxiv.org/abs/2312.15230
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterlab.pruning.functional import check_nm, parse_pattern
from adapterlab.pruning.pruner import prunable_linears
from adapterlab.quant import module_quantization

logger = logging.getLogger(__name__)

SUBSETS = ("bias", "norm", "head", "mask_lora", "scale_lora", "full")
PRESETS: dict[str, tuple[str, ...]] = {
    "default": ("bias", "norm", "head", "mask_lora"),
    "bias_norm": ("bias", "norm"),
    "mask_lora": ("bias", "norm", "mask_lora"),
    "scale_lora": ("bias", "norm", "scale_lora"),
    "full": ("full",),
}


# ---------------------------------------------------------------------------------------------
# layers


class PerpLayer(nn.Module):
    """Common base of the PERP wrappers: ``base_layer`` is the wrapped ``nn.Linear``."""

    base_layer: nn.Linear

    @property
    def weight(self) -> torch.Tensor:  # code that reads `.weight` of a linear keeps working
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def merged_weight(self) -> torch.Tensor:
        """The effective weight in fp32 ``(d_out, d_in)``."""
        raise TypeError(f"{type(self).__name__} does not define merged_weight()")


def _kaiming_a(r: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    a = torch.empty(r, d_in)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's default init
    return a


class MaskLoRALinear(PerpLayer):
    """LoRA whose delta is masked by the pruning mask in training and at merge.

    Semantics:
        M = (W != 0)  (fixed at wrap time)
        y = x (W + s * (B @ A) * M)^T + b,  s = alpha / r,  A kaiming-uniform (r, d_in), B = 0 (d_out, r)
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scale = r, float(alpha) / r
        d_out, d_in = base_layer.weight.shape
        self.perp_A = nn.Parameter(_kaiming_a(r, d_in, generator).to(base_layer.weight.device))  # (r, d_in)
        self.perp_B = nn.Parameter(torch.zeros(d_out, r, device=base_layer.weight.device))  # (d_out, r)
        self.register_buffer("pruned", base_layer.weight.detach() == 0, persistent=False)  # (d_out, d_in)

    def delta(self) -> torch.Tensor:
        """``s (B A) ⊙ M`` in fp32 ``(d_out, d_in)``, differentiable."""
        return ((self.perp_B @ self.perp_A) * self.scale).masked_fill(self.pruned, 0.0)  # (d_out, d_in)

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.detach().float() + self.delta().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        if w.dtype == self.perp_A.dtype:
            # W + s B A in one fused pass; W is 0 where pruned, so masking the sum = W + s (BA) ⊙ M
            w_eff = torch.addmm(w, self.perp_B, self.perp_A, alpha=self.scale).masked_fill(self.pruned, 0.0)
        else:
            w_eff = w + self.delta().to(w.dtype)  # (d_out, d_in)
        return F.linear(x, w_eff, self.base_layer.bias)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, sparsity={float(self.pruned.float().mean()):.3f}"


class ScaleLoRALinear(PerpLayer):
    """Multiplicative low-rank rescaling ``W ⊙ (B A)``; ``A = B = 1/√r`` so ``BA = 1`` at start.

    Semantics:
        y = x (W * (B @ A))^T + b      # no alpha scaling; zeros of W stay zero
    """

    def __init__(self, base_layer: nn.Linear, r: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r = r
        d_out, d_in = base_layer.weight.shape
        dev = base_layer.weight.device
        self.perp_A = nn.Parameter(torch.full((r, d_in), 1.0 / math.sqrt(r), device=dev))  # (r, d_in)
        self.perp_B = nn.Parameter(torch.full((d_out, r), 1.0 / math.sqrt(r), device=dev))  # (d_out, r)

    def factor(self) -> torch.Tensor:
        return self.perp_B @ self.perp_A  # (d_out, r) @ (r, d_in) -> (d_out, d_in)

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.detach().float() * self.factor().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_layer.weight
        return F.linear(x, w * self.factor().to(w.dtype), self.base_layer.bias)

    def extra_repr(self) -> str:
        return f"r={self.r}"


class HeadLoRA(PerpLayer):
    """A plain LoRA on the (unpruned) output head, in factor form (no dense vocab x d temporary).

    Semantics:
        y = head(x) + s * (x @ A^T) @ B^T,  s = alpha / r
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.scale = r, float(alpha) / r
        d_out, d_in = base_layer.weight.shape
        self.perp_A = nn.Parameter(_kaiming_a(r, d_in, generator).to(base_layer.weight.device))  # (r, d_in)
        self.perp_B = nn.Parameter(torch.zeros(d_out, r, device=base_layer.weight.device))  # (d_out, r)

    def merged_weight(self) -> torch.Tensor:
        delta = (self.perp_B.detach() @ self.perp_A.detach()) * self.scale  # (d_out, d_in)
        return self.base_layer.weight.detach().float() + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        low = (x.to(self.perp_A.dtype) @ self.perp_A.T) @ self.perp_B.T  # (..., r) -> (..., d_out)
        return out + (low * self.scale).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}"


# ---------------------------------------------------------------------------------------------
# perp_


@dataclass
class PerpReport:
    """What :func:`perp_` made trainable."""

    scope: tuple[str, ...]
    trainable: int
    total: int
    by_subset: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    @property
    def needs_mask_keeper(self) -> bool:
        """Base weights are trainable: use :class:`adapterlab.callbacks.MaskKeeperCallback`."""
        return "full" in self.scope

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction": self.fraction, "needs_mask_keeper": self.needs_mask_keeper}

    def __str__(self) -> str:
        parts = ", ".join(f"{k} {v:,}" for k, v in self.by_subset.items())
        return f"PERP {'+'.join(self.scope)}: {self.trainable:,} / {self.total:,} trainable ({100 * self.fraction:.3f} %): {parts}"


def resolve_scope(scope: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name or a list of subset names -> the subset tuple (validated)."""
    if isinstance(scope, str):
        if scope in PRESETS:
            return PRESETS[scope]
        if scope in SUBSETS:
            return (scope,)
        raise ValueError(
            f"scope={scope!r} is unknown; choose a preset ({', '.join(PRESETS)}) or subsets ({', '.join(SUBSETS)})"
        )
    subsets = tuple(dict.fromkeys(scope))
    bad = [s for s in subsets if s not in SUBSETS]
    if bad or not subsets:
        raise ValueError(f"scope has unknown subset(s) {bad or scope!r}; choose from: {', '.join(SUBSETS)}")
    if "mask_lora" in subsets and "scale_lora" in subsets:
        raise ValueError("scope: mask_lora and scale_lora wrap the same layers; choose one of them")
    return subsets


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith(
        ("Norm", "RMSNorm", "LayerNorm")
    )


def has_perp_layers(model: nn.Module) -> bool:
    """Whether ``model`` contains layers added by :func:`perp_`."""
    return any(isinstance(m, PerpLayer) for m in model.modules())


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _head_name(model: nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def perp_(
    model: nn.Module,
    scope: str | Sequence[str] = "default",
    *,
    r: int = 16,
    alpha: float = 32.0,
    head_r: int | None = None,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
) -> PerpReport:
    """Freeze ``model`` (pruned) and mark the PERP subset ``scope`` trainable, in place.

    Args:
        model: a pruned causal LM in full precision (not a PeftModel, not quantized).
        scope: a preset (``default``, ``bias_norm``, ``mask_lora``, ``scale_lora``, ``full``) or a
            list of subsets (``bias``, ``norm``, ``head``, ``mask_lora``, ``scale_lora``, ``full``).
        r: rank of MaskLoRA / ScaleLoRA.
        alpha: MaskLoRA / head LoRA ``lora_alpha`` (scale ``alpha / r``); ScaleLoRA has no scale.
        head_r: rank of the head LoRA (default ``r``).
        target_modules: suffixes of the decoder linears to wrap (e.g. ``["q_proj", "v_proj"]``);
            default every linear inside the decoder blocks.
        seed: seed of the LoRA ``A`` initialisation.

    Returns:
        A :class:`PerpReport` (trainable count and fraction, per subset, parameter names).

    Raises:
        ValueError: unknown scope / subset, bad rank, a quantized or peft-wrapped model, a model
            already prepared, or ``target_modules`` matching nothing.

    Reference:
        Zimmer et al., PERP, https://arxiv.org/abs/2312.15230
    """
    subsets = resolve_scope(scope)
    for key, val in (("r", r), ("head_r", r if head_r is None else head_r)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if hasattr(model, "peft_config"):
        raise ValueError("perp_ expects a plain (pruned) model, got a peft model; call it before any adapter")
    if has_perp_layers(model):
        raise ValueError("the model is already prepared by perp_ (merge it with merge_perp_ first)")
    quantized = sorted({q for m in model.modules() if (q := module_quantization(m))})
    if quantized:
        raise ValueError(f"perp_ needs a full-precision base, got a {', '.join(quantized)} model")

    linears = prunable_linears(model)
    if target_modules is not None:
        wanted = tuple(target_modules)
        linears = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] in wanted or n.endswith(wanted)}
        if not linears:
            raise ValueError(f"target_modules={list(wanted)!r} match no decoder linear layer")

    model.requires_grad_(False)
    by_subset: dict[str, int] = {}
    gen = torch.Generator().manual_seed(seed)
    if "full" in subsets:
        model.requires_grad_(True)
        by_subset["full"] = sum(p.numel() for p in model.parameters())
    if "norm" in subsets:
        n = 0
        for m in model.modules():
            if _is_norm(m):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
                    n += p.numel()
        by_subset["norm"] = n
    if "bias" in subsets:
        n = 0
        for m in model.modules():
            if _is_norm(m):
                continue
            b = m._parameters.get("bias")
            if isinstance(b, nn.Parameter):
                b.requires_grad_(True)
                n += b.numel()
        by_subset["bias"] = n
    wrap = next((s for s in ("mask_lora", "scale_lora") if s in subsets), None)
    if wrap is not None:
        n = 0
        for name, lin in linears.items():
            layer = MaskLoRALinear(lin, r, alpha, gen) if wrap == "mask_lora" else ScaleLoRALinear(lin, r)
            _set_child(model, name, layer)
            n += layer.perp_A.numel() + layer.perp_B.numel()
        by_subset[wrap] = n
    if "head" in subsets:
        name = _head_name(model)
        if name is None:
            raise ValueError("scope includes 'head' but the model has no output head (get_output_embeddings)")
        head = model.get_submodule(name)
        layer = HeadLoRA(head, r if head_r is None else head_r, alpha, gen)
        _set_child(model, name, layer)
        by_subset["head"] = layer.perp_A.numel() + layer.perp_B.numel()

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    report = PerpReport(
        scope=subsets,
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total=sum(p.numel() for p in model.parameters()),
        by_subset=by_subset,
        names=names,
    )
    logger.info("%s", report)
    return report


# ---------------------------------------------------------------------------------------------
# merge


@dataclass
class PerpMergeReport:
    """What :func:`merge_perp_` did: layers folded, zeros before/after, N:M check, head untied."""

    layers: int = 0
    zeros_before: int = 0
    zeros_after: int = 0
    numel: int = 0
    pattern: str | None = None
    nm_valid: bool | None = None
    head_merged: bool = False
    head_untied: bool = False

    @property
    def sparsity_before(self) -> float:
        return self.zeros_before / self.numel if self.numel else 0.0

    @property
    def sparsity_after(self) -> float:
        return self.zeros_after / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sparsity_before": self.sparsity_before, "sparsity_after": self.sparsity_after}


@torch.no_grad()
def merge_perp_(model: nn.Module, *, pattern: str | None = None) -> PerpMergeReport:
    """Fold every PERP layer of ``model`` into a plain ``nn.Linear`` (in place) and verify sparsity.

    MaskLoRA ``W += s (BA) ⊙ M`` and ScaleLoRA ``W *= BA`` (fp32, cast once) keep every zero; the
    head LoRA is merged densely. A head tied to the input embedding is untied first (its own copy
    of the weight, ``config.tie_word_embeddings = False``) so the embedding stays unchanged.

    Args:
        model: a model prepared by :func:`perp_`.
        pattern: ``"N:M"`` to check after the merge (default: 2:4 / 4:8 / 1:4 detected per layer).

    Returns:
        A :class:`PerpMergeReport`.

    Raises:
        ValueError: the model has no PERP layers, or a bad ``pattern``.
        RuntimeError: a pruned weight became non-zero (never expected).
    """
    from adapterlab.pruning.functional import SparsityError, detect_nm

    nm_arg = parse_pattern(pattern)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PerpLayer)]
    if not layers:
        raise ValueError("the model has no PERP layers (prepare it with adapterlab.perp_)")
    report = PerpMergeReport()
    patterns: set[str] = set()
    nm_results: list[bool] = []
    for name, layer in layers:
        base = layer.base_layer
        merged = layer.merged_weight()  # fp32 (d_out, d_in)
        if isinstance(layer, HeadLoRA):
            emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            if emb is not None and emb.weight is base.weight:
                base.weight = nn.Parameter(merged.to(base.weight.dtype), requires_grad=base.weight.requires_grad)
                cfg = getattr(model, "config", None)
                if cfg is not None:
                    cfg.tie_word_embeddings = False
                    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else None
                    if text is not None and text is not cfg:
                        text.tie_word_embeddings = False
                report.head_untied = True
            else:
                base.weight.data = merged.to(base.weight.dtype)
            report.head_merged = True
            _set_child(model, name, base)
            continue
        zero = base.weight == 0
        base.weight.data = merged.to(base.weight.dtype)
        lost = zero & (base.weight != 0)
        if bool(lost.any()):
            raise SparsityError(f"layer {name!r}: {int(lost.sum())} pruned weight(s) became non-zero in the merge")
        nm = nm_arg or detect_nm(zero)
        if nm is not None:
            ok = check_nm(base.weight, *nm)
            nm_results.append(ok)
            patterns.add(f"{nm[0]}:{nm[1]}")
            if not ok:
                raise SparsityError(f"layer {name!r}: the {nm[0]}:{nm[1]} pattern no longer holds")
        report.layers += 1
        report.zeros_before += int(zero.sum())
        report.zeros_after += int((base.weight == 0).sum())
        report.numel += base.weight.numel()
        _set_child(model, name, base)
    report.pattern = ",".join(sorted(patterns)) or None
    report.nm_valid = all(nm_results) if nm_results else None
    logger.info(
        "merged %d PERP layer(s): sparsity %.4f -> %.4f%s",
        report.layers,
        report.sparsity_before,
        report.sparsity_after,
        " (head merged)" if report.head_merged else "",
    )
    return report


def perp_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of a PERP-prepared model (LoRA factors, biases, norms), detached copies.

    Save them with :func:`adapterlab.io.save_tensors`; together with the pruning recipe they
    reproduce the retrained model.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
