"""Pruning driver: the ``Pruner`` interface and registry, ``prune_``, masks and ``PruneReport``.

``prune_`` prunes every ``nn.Linear`` inside the decoder blocks of a causal LM (q/k/v/o, gate/up/
down, fc1/fc2, ...); embeddings, norms and the LM head stay dense. Calibration-based methods run
the common sequential pipeline of pruning.md §1: capture the inputs (and all keyword arguments:
attention mask, position embeddings, position ids, ...) of block 0, then per block collect input
statistics with hooks on its linears, prune them, and re-run the **pruned** block to produce the
inputs of the next block.

Reference:
    Wanda — Sun et al. 2023, https://arxiv.org/abs/2306.11695
    SparseGPT — Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import numbers
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from adapterlab._named import Registry
from adapterlab.models import block_linears, decoder_layers
from adapterlab.progress import ProgressFactory, track
from adapterlab.pruning.functional import check_nm, parse_pattern, resolve_sparsity

logger = logging.getLogger(__name__)

__all__ = [
    "PRUNERS",
    "LayerSparsity",
    "PruneReport",
    "Pruner",
    "apply_masks_",
    "get_masks",
    "load_masks",
    "mask_hash",
    "prunable_linears",
    "prune_",
    "register_pruner",
    "save_masks",
    "sparsity_of",
]

#: Registry of pruning methods (``magnitude``, ``wanda``, ``sparsegpt``).
PRUNERS: Registry[type[Pruner]] = Registry("pruning method")


def register_pruner(name: str) -> Callable[[type[Pruner]], type[Pruner]]:
    """Class decorator: ``@register_pruner("wanda") class WandaPruner(Pruner): ...``."""

    def deco(cls: type[Pruner]) -> type[Pruner]:
        cls.name = name
        return PRUNERS.register(name)(cls)

    return deco


# --------------------------------------------------------------------------------------------
# the Pruner interface
# --------------------------------------------------------------------------------------------


class Pruner(ABC):
    """One pruning method, applied layer by layer.

    Subclasses are thin: they hold validated numbers, accumulate per-layer input statistics
    (calibration methods) and call the tensor math in :mod:`adapterlab.pruning.functional`.

    Attributes:
        name: the registry name (set by :func:`register_pruner`).
        needs_calibration: whether :func:`prune_` must run calibration data through the blocks.
        scopes: accepted comparison scopes for unstructured pruning; the first is the default.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    scopes: ClassVar[tuple[str, ...]] = ("matrix",)

    def __init__(self, sparsity: float, nm: tuple[int, int] | None = None, scope: str | None = None) -> None:
        """Validate and store the pattern.

        Args:
            sparsity: effective fraction pruned, in ``[0, 1)`` (``1 - N/M`` for N:M).
            nm: ``(N, M)`` for semi-structured pruning along the input dimension, else ``None``.
            scope: comparison scope (see :attr:`scopes`); ``None`` = the method's default.

        Raises:
            ValueError: ``scope`` is not one of :attr:`scopes`.
        """
        if scope is None:
            scope = self.scopes[0]
        if scope not in self.scopes:
            raise ValueError(
                f"unknown scope {scope!r} for pruning method {self.name!r}; choose one of: {', '.join(self.scopes)}"
            )
        self.sparsity = float(sparsity)
        self.nm = nm
        self.scope = scope

    def params(self) -> dict[str, Any]:
        """Method parameters recorded in the report (numbers and names only)."""
        return {"scope": self.scope}

    def init_stats(self, layer: nn.Linear) -> Any:
        """Fresh input statistics for ``layer`` (``None`` when the method needs none)."""
        return None

    def add_batch(self, stats: Any, x: Tensor) -> Any:
        """Fold one batch of layer inputs ``x`` (``(b, seq, d_in)``) into ``stats``; return them."""
        return stats

    @abstractmethod
    def prune_weight(self, weight: Tensor, stats: Any) -> Tensor:
        """The pruned weight (same shape; any dtype — the caller casts back) with exact zeros."""

    def prune_layer(self, name: str, weight: Tensor, stats: Any) -> tuple[Tensor, dict[str, Any]]:
        """:meth:`prune_weight` for the layer called ``name``, plus per-layer facts for its report row.

        Args:
            name: the module name (for log messages).
            weight: ``(d_out, d_in)``.
            stats: what :meth:`add_batch` accumulated for this layer.

        Returns:
            ``(pruned weight, facts)``; ``facts`` maps :class:`LayerSparsity` field names to values
            (e.g. SparseGPT's ``damping``); empty by default.
        """
        return self.prune_weight(weight, stats), {}

    def __repr__(self) -> str:
        pattern = f"{self.nm[0]}:{self.nm[1]}" if self.nm else "unstructured"
        return f"{type(self).__name__}(sparsity={self.sparsity:g}, pattern={pattern}, scope={self.scope})"


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


@dataclass
class LayerSparsity:
    """Zeros of one pruned weight matrix.

    Attributes:
        name: module name.
        shape: weight shape ``(d_out, d_in)``.
        zeros: exact zeros after pruning.
        numel: entries.
        nm_valid: the N:M check of this matrix (None when unstructured).
        damping: SparseGPT only: the dampening ``lambda`` added to ``diag H`` (after any retries of
            a failed Cholesky), else None.
    """

    name: str
    shape: tuple[int, ...]
    zeros: int
    numel: int
    nm_valid: bool | None = None
    damping: float | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "zeros": self.zeros,
            "numel": self.numel,
            "sparsity": self.sparsity,
        }
        if self.nm_valid is not None:
            d["nm_valid"] = self.nm_valid
        if self.damping is not None:
            d["damping"] = self.damping
        return d


@dataclass
class PruneReport:
    """What :func:`prune_` did: per-layer and global sparsity, the N:M check, the time taken.

    Attributes:
        method: registry name of the pruning method.
        pattern: ``"N:M"`` or ``None`` (unstructured).
        target_sparsity: the requested (unstructured) or implied (``1 - N/M``) sparsity.
        layers: one row per pruned weight matrix.
        global_sparsity: zeros / numel over all pruned layers.
        nm_valid: ``True``/``False`` when an N:M pattern was used (every group checked), else ``None``.
        seconds: wall time of the whole call.
        params: method parameters (scope, percdamp, blocksize, ...).
        n_calibration: number of calibration sequences used (0 without calibration).
    """

    method: str
    pattern: str | None
    target_sparsity: float
    layers: list[LayerSparsity] = field(default_factory=list)
    nm_valid: bool | None = None
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    n_calibration: int = 0

    @property
    def zeros(self) -> int:
        return sum(row.zeros for row in self.layers)

    @property
    def numel(self) -> int:
        return sum(row.numel for row in self.layers)

    @property
    def global_sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [row.to_dict() for row in self.layers]
        d["zeros"] = self.zeros
        d["numel"] = self.numel
        d["global_sparsity"] = self.global_sparsity
        return d

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the report as JSON (``sparsity_report.json``); returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def table(self) -> str:
        """A plain-text table: one line per layer plus a total line."""
        width = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>12}  {'zeros':>10}  {'sparsity':>8}"]
        for r in self.layers:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(f"{r.name:<{width}}  {shape:>12}  {r.zeros:>10}  {r.sparsity:>8.2%}")
        lines.append(f"{'total':<{width}}  {'':>12}  {self.zeros:>10}  {self.global_sparsity:>8.2%}")
        return "\n".join(lines)

    def __str__(self) -> str:
        pattern = self.pattern or "unstructured"
        check = "" if self.nm_valid is None else f", N:M valid: {self.nm_valid}"
        head = (
            f"{self.method} {pattern}: target {self.target_sparsity:.2%}, "
            f"global {self.global_sparsity:.2%} over {len(self.layers)} layers{check}, "
            f"{self.seconds:.1f} s"
        )
        return head + "\n" + self.table()


# --------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside the decoder blocks, by its full name in ``model``."""
    blocks = decoder_layers(model)
    wanted = {id(lin) for block in blocks for lin in block_linears(block).values()}
    return {n: m for n, m in model.named_modules() if id(m) in wanted}


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """Keep masks (``W != 0``) of every prunable layer, keyed by module name (CPU bool tensors)."""
    return {name: (lin.weight.detach() != 0).cpu() for name, lin in prunable_linears(model).items()}


def apply_masks_(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Zero the weights of ``model`` where ``masks[name]`` is ``False`` (in place).

    Raises:
        ValueError: a mask names no module of ``model``, the module has no weight, or the shapes
            differ; nothing is modified in that case.
    """
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            choices = ", ".join(list(prunable_linears(model))[:8])
            raise ValueError(f"mask {name!r} names no weighted module of the model (e.g. {choices}, ...)")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask {name!r} has shape {tuple(mask.shape)}, the weight has {tuple(weight.shape)}")
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.masked_fill_(~mask.to(device=weight.device, dtype=torch.bool), 0)


def mask_hash(masks: Mapping[str, Tensor]) -> str:
    """sha256 over the sorted names, shapes and bit-packed contents of boolean masks."""
    import numpy as np

    digest = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach().to("cpu", torch.bool).contiguous()
        digest.update(name.encode())
        digest.update(json.dumps(list(mask.shape)).encode())
        digest.update(np.packbits(mask.reshape(-1).numpy()).tobytes())
    return digest.hexdigest()


def save_masks(path: str | os.PathLike[str], masks: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save boolean masks to safetensors with their :func:`mask_hash` in the metadata; return it."""
    from safetensors.torch import save_file

    tensors = {name: m.detach().to("cpu", torch.bool).contiguous() for name, m in masks.items()}
    digest = mask_hash(tensors)
    meta = {"format": "adapterlab-masks", "mask_sha256": digest, **(metadata or {})}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
    return digest


def load_masks(path: str | os.PathLike[str], *, verify: bool = True) -> dict[str, Tensor]:
    """Load masks written by :func:`save_masks`, checking the stored hash.

    Raises:
        ValueError: the stored ``mask_sha256`` does not match the contents.
    """
    from adapterlab.io import open_tensors  # the one validated reader (one-line errors naming the file)

    with open_tensors(path) as f:
        meta = f.metadata() or {}
        masks = {k: f.get(k) for k in f.keys()}
    stored = meta.get("mask_sha256")
    if verify and stored is not None and stored != mask_hash(masks):
        raise ValueError(f"mask file {str(path)!r} is corrupt: its mask_sha256 does not match")
    return masks


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights of every prunable (decoder-block) linear."""
    zeros = numel = 0
    for lin in prunable_linears(model).values():
        zeros += int((lin.weight == 0).sum())
        numel += lin.weight.numel()
    return zeros / numel if numel else 0.0


# --------------------------------------------------------------------------------------------
# sequential calibration helpers
# --------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the block-0 hook once its inputs are captured."""


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured arguments (tensors compared by value)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _hidden(out: Any) -> Tensor:
    """Hidden states from a block's output (transformers 5 returns the tensor, older a tuple)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    for attr in ("last_hidden_state", "hidden_states"):
        hidden = getattr(out, attr, None)
        if isinstance(hidden, Tensor):
            return hidden
    raise TypeError(f"cannot read hidden states from a decoder block output of type {type(out).__name__}")


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


#: One captured block call: (hidden states (b, seq, hidden), extra positional args, kwargs).
_Call = tuple[Tensor, tuple[Any, ...], dict[str, Any]]


def _capture_block0_inputs(model: nn.Module, block0: nn.Module, calibration: Tensor, batch_size: int) -> list[_Call]:
    """Run the model on the calibration ids and record what block 0 receives, per batch."""
    calls: list[_Call] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        if "past_key_values" in kwargs:
            kwargs["past_key_values"] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if calls and _same(calls[-1][1], rest) and _same(calls[-1][2], kwargs):
            rest, kwargs = calls[-1][1], calls[-1][2]  # share identical masks/positions
        calls.append((hidden.detach(), rest, kwargs))
        raise _StopForward

    device = model.get_input_embeddings().weight.device
    handle = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for chunk in calibration.split(batch_size):  # (n, seq) -> batches of (b, seq)
            try:
                model(input_ids=chunk.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(calls) != math.ceil(calibration.shape[0] / batch_size):
        raise RuntimeError("could not capture the inputs of decoder block 0 during calibration")
    return calls


@contextlib.contextmanager
def _stat_hooks(pruner: Pruner, linears: dict[str, nn.Linear], stats: dict[str, Any]) -> Iterator[None]:
    """Forward hooks that fold every linear's input into ``stats[name]`` while active."""
    handles = []
    for name, lin in linears.items():

        def hook(module: nn.Module, args: tuple[Any, ...], out: Any, name: str = name) -> None:
            stats[name] = pruner.add_batch(stats[name], args[0].detach())

        handles.append(lin.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_block(block: nn.Module, calls: list[_Call], *, keep: bool = True) -> list[Tensor]:
    """Replay the captured calls through ``block``; return its outputs when ``keep``."""
    device = _device_of(block)
    outs = []
    for hidden, rest, kwargs in calls:
        if hidden.device != device:
            hidden, rest, kwargs = hidden.to(device), _to(rest, device), _to(kwargs, device)
        out = _hidden(block(hidden, *rest, **kwargs)).detach()
        if keep:
            outs.append(out)
    return outs


def _prune_linear_(pruner: Pruner, name: str, lin: nn.Linear, stats: Any) -> dict[str, Any]:
    new, facts = pruner.prune_layer(name, lin.weight.data, stats)
    lin.weight.data.copy_(new.to(dtype=lin.weight.dtype, device=lin.weight.device))
    return facts


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_method_kwargs(cls: type[Pruner], method: str, kwargs: dict[str, Any]) -> None:
    params = inspect.signature(cls.__init__).parameters
    allowed = [
        name
        for name, p in params.items()
        if name not in ("self", "sparsity", "nm", "scope")
        and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    ]
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"unknown option {key!r} for pruning method {method!r}; "
                f"choose one of: {', '.join(['scope', 'batch_size', *allowed])}"
            )


def _check_calibration(model: nn.Module, calibration: Any, method: str) -> Tensor:
    if calibration is None:
        raise ValueError(
            f"pruning method {method!r} needs calibration data: pass calibration=<LongTensor of "
            f"input_ids, shape (n_samples, seqlen)> (e.g. adapterlab.data.calibration_ids(...))"
        )
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a LongTensor of shape (n_samples, seqlen), got {shape}")
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool or calibration.is_complex():
        raise ValueError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    vocab = model.get_input_embeddings().num_embeddings
    lo, hi = int(calibration.min()), int(calibration.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab}), got [{lo}, {hi}]")
    return calibration.long()


# --------------------------------------------------------------------------------------------
# prune_
# --------------------------------------------------------------------------------------------


def prune_(
    model: nn.Module,
    method: str,
    sparsity: float | None,
    *,
    pattern: str | None = None,
    calibration: Tensor | None = None,
    scope: str | None = None,
    progress: ProgressFactory | None = None,
    batch_size: int = 8,
    **method_kwargs: Any,
) -> PruneReport:
    """Prune every linear layer inside the decoder blocks of ``model`` in place.

    Args:
        model: a causal LM whose blocks use ``nn.Linear`` (Llama/Mistral/Qwen/OPT families;
            GPT-2's ``Conv1D`` layers are not supported).
        method: ``magnitude`` | ``wanda`` | ``sparsegpt`` (see :data:`PRUNERS`).
        sparsity: fraction pruned per comparison group, in ``[0, 1)``; ignored (may be ``None``)
            with an N:M pattern, whose sparsity is ``1 - N/M``.
        pattern: ``None`` (unstructured) or ``"N:M"``: keep N of every M consecutive input weights.
        calibration: ``(n_samples, seqlen)`` LongTensor of input ids; required by wanda/sparsegpt.
        scope: comparison scope, method-specific (magnitude: ``matrix`` (default) | ``row``).
        progress: progress factory (see :mod:`adapterlab.progress`); advances once per block.
        batch_size: calibration sequences per forward pass.
        **method_kwargs: method options (sparsegpt: ``percdamp``, ``blocksize``).

    Returns:
        A :class:`PruneReport` with per-layer zeros and the N:M validity check.

    Raises:
        ValueError: unknown method/pattern/scope/option, sparsity outside ``[0, 1)``, ``N > M``,
            ``d_in % M != 0`` or missing calibration — raised before anything is modified.

    Reference:
        Wanda https://arxiv.org/abs/2306.11695; SparseGPT https://arxiv.org/abs/2301.00774
    """
    start = time.perf_counter()
    cls, pruner, nm, target = _make_pruner(method, sparsity, pattern, scope, batch_size, method_kwargs)

    blocks = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    per_block = [{names[id(lin)]: lin for lin in block_linears(block).values()} for block in blocks]
    _check_linears(model, per_block, nm, pattern)
    calib: Tensor | None = None
    if cls.needs_calibration:
        calib = _check_calibration(model, calibration, method)
    elif calibration is not None:
        logger.debug("pruning method %r uses no calibration data; ignoring it", method)

    logger.info("pruning %d blocks with %r", len(blocks), pruner)
    facts: dict[str, dict[str, Any]] = {}  # layer -> per-layer facts from the pruner (report rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            calls = _capture_block0_inputs(model, blocks[0], calib, batch_size) if calib is not None else None
            last = len(blocks) - 1
            for i in track(range(len(blocks)), f"{method}: blocks", progress=progress):
                block_facts, calls = prune_block_(pruner, blocks[i], per_block[i], calls, next_inputs=i < last)
                facts.update(block_facts)
    finally:
        model.train(was_training)

    layers: list[LayerSparsity] = []
    nm_valid: bool | None = True if nm is not None else None
    for linears in per_block:
        rows, valid = layer_rows(linears, facts, nm)
        layers += rows
        if valid is False:
            nm_valid = False
    return make_report(cls, pruner, nm, target, layers, nm_valid, start, calib)


def _make_pruner(
    method: str,
    sparsity: float | None,
    pattern: str | None,
    scope: str | None,
    batch_size: int,
    method_kwargs: dict[str, Any],
) -> tuple[type[Pruner], Pruner, tuple[int, int] | None, float]:
    """``(class, pruner, (N, M) or None, effective sparsity)``, every argument validated (see :func:`prune_`)."""
    cls = PRUNERS.get(method)
    nm = parse_pattern(pattern)
    if nm is not None and sparsity is not None:
        implied = 1.0 - nm[0] / nm[1]
        if not isinstance(sparsity, numbers.Real) or abs(float(sparsity) - implied) > 1e-9:
            logger.warning("pattern %s implies sparsity %.4g; ignoring sparsity=%r", pattern, implied, sparsity)
    target = resolve_sparsity(sparsity, nm)
    _check_method_kwargs(cls, method, method_kwargs)
    pruner = cls(target, nm, scope, **method_kwargs)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return cls, pruner, nm, target


def _check_linears(
    model: nn.Module, per_block: list[dict[str, nn.Linear]], nm: tuple[int, int] | None, pattern: str | None
) -> None:
    """Refuse a model without decoder linears, or an N:M pattern some layer's ``d_in`` does not divide."""
    if not any(per_block):
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layers inside its decoder blocks "
            f"(HF Conv1D layers, e.g. GPT-2, are not supported)"
        )
    if nm is not None:
        for linears in per_block:
            for name, lin in linears.items():
                if lin.in_features % nm[1]:
                    raise ValueError(
                        f"pattern {pattern!r} needs d_in % M == 0, but layer {name!r} has "
                        f"d_in={lin.in_features} (M={nm[1]})"
                    )


def prune_block_(
    pruner: Pruner,
    block: nn.Module,
    linears: dict[str, nn.Linear],
    calls: list[_Call] | None,
    *,
    next_inputs: bool,
) -> tuple[dict[str, dict[str, Any]], list[_Call] | None]:
    """Prune the linears of one decoder block in place: the step :func:`prune_` takes per block (and the
    streamed pruner of :mod:`adapterlab.pruning.streamed` too).

    Without ``calls`` (magnitude) each linear is pruned from its weight alone. With the captured block
    inputs ``calls`` (each ``(hidden (b, seq, hidden), args, kwargs)``), the block is run once with hooks
    that fold every linear's inputs into the pruner's statistics, the linears are pruned, and, when
    ``next_inputs``, the **pruned** block is run again to give the inputs of the next block.

    Returns:
        ``(per-layer facts for the report rows, the next block's calls or None)``.
    """
    facts: dict[str, dict[str, Any]] = {}
    if calls is None:
        for name, lin in linears.items():
            facts[name] = _prune_linear_(pruner, name, lin, None)
        return facts, None
    stats = {name: pruner.init_stats(lin) for name, lin in linears.items()}
    with _stat_hooks(pruner, linears, stats):
        _run_block(block, calls, keep=False)
    for name, lin in linears.items():
        facts[name] = _prune_linear_(pruner, name, lin, stats.pop(name))
    if not next_inputs:
        return facts, None
    outs = _run_block(block, calls)  # the pruned block's outputs feed the next block
    return facts, [(o, rest, kw) for o, (_, rest, kw) in zip(outs, calls)]


def layer_rows(
    linears: dict[str, nn.Linear], facts: dict[str, dict[str, Any]], nm: tuple[int, int] | None
) -> tuple[list[LayerSparsity], bool | None]:
    """The report rows of pruned linears and whether all of them satisfy ``nm`` (None when unstructured)."""
    rows = []
    valid: bool | None = True if nm is not None else None
    for name, lin in linears.items():
        w = lin.weight.detach()
        rows.append(LayerSparsity(name, tuple(w.shape), int((w == 0).sum()), w.numel(), **facts.get(name, {})))
        if nm is not None and not check_nm(w, *nm):
            valid = False
    return rows, valid


def make_report(
    cls: type[Pruner],
    pruner: Pruner,
    nm: tuple[int, int] | None,
    target: float,
    layers: list[LayerSparsity],
    nm_valid: bool | None,
    start: float,
    calib: Tensor | None,
) -> PruneReport:
    """The :class:`PruneReport` of a finished run that began at ``time.perf_counter() == start``."""
    report = PruneReport(
        method=cls.name or pruner.name,
        pattern=f"{nm[0]}:{nm[1]}" if nm else None,
        target_sparsity=target,
        layers=layers,
        nm_valid=nm_valid,
        seconds=time.perf_counter() - start,
        params=pruner.params(),
        n_calibration=int(calib.shape[0]) if calib is not None else 0,
    )
    logger.info(
        "pruned %d layers to %.2f%% global sparsity in %.1f s",
        len(layers),
        100 * report.global_sparsity,
        report.seconds,
    )
    return report
