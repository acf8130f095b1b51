"""Merging driver: the ``Merger`` interface and registry, ``merge_adapters`` and ``MergeResult``.

Low-rank adapters are merged as their **dense deltas** ``ΔW_t = s_t B_t A_t`` (scale folded in,
rsLoRA-aware), one module at a time: for each module the T deltas ``[T, d_out, d_in]`` are built,
merged and turned into the output right away (truncated-SVD LoRA factors, sparse entries, or added
into a copy of the base), so memory holds one module of T adapters plus the output — never T models.
Base weights are written by one rounding rule: ``(W.float() + ΔW).to(W.dtype)`` (fp32 add, one cast;
:func:`~adapterlab.folding.add_to_weight`), optionally masked by the base's zeros
(``keep_sparsity``), and the zeros of the base a merge fills are counted (``base_zeros_hit``).
Methods that need whole-model statistics (TIES with ``trim_scope="model"``) make extra passes over
the same stream. Merging the A and B factors separately (``factorwise=True``) is available for
comparison with peft's ``add_weighted_adapter`` but warns: it creates cross terms.

Sparse adapters take shorter routes when every input allows it (:mod:`adapterlab.merging.sparse`):
all-SHiRA inputs merge in **sparse form** on the union of their index sets (never a dense
``d_out × d_in`` matrix per adapter) and give a SHiRA adapter; all-LoRI inputs merged by ``linear`` /
``task_arithmetic`` are **concatenated** exactly (rank ``Σ r_t``, each B keeps its zeros). Anything
else (e.g. SHiRA mixed with LoRA) goes through the dense deltas, with a warning saying why.

Reference:
    TIES — https://arxiv.org/abs/2306.01708 ; DARE — https://arxiv.org/abs/2311.03099 ;
    task arithmetic — https://arxiv.org/abs/2212.04089 ; RMM — https://arxiv.org/abs/2510.14163 ;
    SHiRA — https://arxiv.org/abs/2406.13175 ; LoRI — https://arxiv.org/abs/2504.07448
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from adapterlab._registry import Registry
from adapterlab.adapters import AdapterLike, LoraSource, check_compatible, resolve_adapters
from adapterlab.extraction.functional import low_rank_factors
from adapterlab.folding import add_to_weight, write_merged_, zeros_hit_note
from adapterlab.lora_dir import write_lora_dir
from adapterlab.progress import ProgressFactory, track
from adapterlab.staging import staged_dir

if TYPE_CHECKING:
    from adapterlab.merging.rmm import RMMBundle
    from adapterlab.merging.sparse import SparseMergeContext

logger = logging.getLogger(__name__)

__all__ = [
    "MERGERS",
    "OUTPUTS",
    "MergeContext",
    "MergeResult",
    "Merger",
    "ModuleReport",
    "merge_adapters",
    "register_merger",
]

#: Registry of merge methods (linear, task_arithmetic, ties, dare_linear, dare_ties, rmm).
MERGERS: Registry[type[Merger]] = Registry("merge method")
#: Output forms: those of a dense merge, then ``shira`` (all-SHiRA inputs) and ``lori`` (all-LoRI, linear).
OUTPUTS = ("lora", "sparse", "full", "shira", "lori")
#: Parameter aliases accepted from YAML / kwargs (``lambda`` is a Python keyword).
ALIASES = {"lambda": "lambda_", "K": "n_basis"}


def register_merger(name: str) -> Callable[[type[Merger]], type[Merger]]:
    """Class decorator: ``@register_merger("ties") class TiesMerger(Merger): ...``."""

    def deco(cls: type[Merger]) -> type[Merger]:
        cls.name = name
        return MERGERS.register(name)(cls)

    return deco


def _check_fraction(where: str, value: Any, *, low_open: bool = True) -> float:
    """A number in (0, 1]; the error names the key path."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a number in (0, 1], got {value!r}")
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{where} must be in (0, 1], got {value}")
    return float(value)


def _check_choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{where} is {value!r}; choose one of: {', '.join(choices)}")
    return str(value)


def _check_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------------
# context: the per-module stream of task tensors


@dataclass
class MergeContext:
    """What a merger sees: the sources, the union of modules, weights and the tensor stream.

    Attributes:
        sources: the T adapters.
        shapes: module name -> weight shape (union over adapters, sorted).
        weights: ``[T]`` fp32 task weights (the method's default if the caller gave none).
        factorwise: stream ``{"B": [T, d_out, r], "A": [T, r, d_in]}`` instead of ``{"delta": [T, d_out, d_in]}``.
    """

    sources: list[LoraSource]
    shapes: dict[str, tuple[int, int]]
    weights: Tensor
    factorwise: bool = False
    progress: ProgressFactory | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.sources)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("B", "A") if self.factorwise else ("delta",)

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The T task tensors of one module, fp32 (zeros for adapters that do not target it)."""
        shape = self.shapes[name]
        if not self.factorwise:
            return {
                "delta": torch.stack(
                    [s.delta(name) if name in s.modules else torch.zeros(shape) for s in self.sources]
                )  # [T, d_out, d_in]
            }
        bs, as_ = [], []
        for s in self.sources:
            m = s.modules[name]
            b, a = s.factors(name)
            root = math.sqrt(abs(m.scale))  # peft's factor-wise split: sqrt(scale) on both factors
            bs.append(b / root)
            as_.append(a * root)
        return {"B": torch.stack(bs), "A": torch.stack(as_)}  # [T, d_out, r], [T, r, d_in]

    def part_weights(self, part: str) -> Tensor:
        """Weights per part: the task weights; factor-wise ``sign(w)√|w|`` on B and ``√|w|`` on A."""
        if part == "delta":
            return self.weights
        root = self.weights.abs().sqrt()
        return root * torch.sign(self.weights) if part == "B" else root

    def stream(self, description: str) -> Iterator[tuple[str, dict[str, Tensor]]]:
        for name in track(list(self.shapes), description, progress=self.progress):
            yield name, self.tensors(name)


# ------------------------------------------------------------------------------------------------
# the Merger interface


class Merger(ABC):
    """One merge method. Subclasses are dataclasses of names and numbers (validated in
    ``__post_init__``) and call the tensor math in :mod:`adapterlab.merging.functional`.

    The default :meth:`run` streams modules: :meth:`prepare` (optional extra passes), then
    :meth:`merge` per module part, then :meth:`finish` for anything deferred.
    """

    name: ClassVar[str] = ""
    #: ``"ones"`` (task arithmetic, TIES, DARE) or ``"mean"`` (linear: 1/T each) when weights=None.
    default_weights: ClassVar[str] = "ones"
    #: False for methods that keep per-task information instead of one merged delta (RMM).
    takes_weights: ClassVar[bool] = True
    #: True when :meth:`merge_sparse` is valid: SHiRA adapters then merge on the union of their supports.
    sparse_form: ClassVar[bool] = False

    @classmethod
    def from_params(cls, params: Mapping[str, Any], where: str = "params") -> Merger:
        """Build from a dict; unknown keys raise an error naming ``where.key`` and the allowed keys."""
        allowed = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {}
        for key, value in params.items():
            real = ALIASES.get(key, key) if ALIASES.get(key, key) in allowed else key
            if real not in allowed:
                shown = sorted("lambda" if a == "lambda_" else a for a in allowed)
                raise ValueError(
                    f"{where}.{key}: unknown parameter for merge method {cls.name!r}; "
                    f"allowed: {', '.join(shown) or '(none)'}"
                )
            kwargs[real] = value
        return cls(**kwargs)

    def describe(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        if "lambda_" in out:
            out["lambda"] = out.pop("lambda_")
        return out

    def prepare(self, ctx: MergeContext) -> None:
        """Optional passes over ``ctx.stream`` before merging (whole-model statistics)."""

    @abstractmethod
    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor | None:
        """Merge one module part: ``x [T, *shape]`` -> ``[*shape]``, or None to defer to :meth:`finish`."""

    def finish(self) -> dict[tuple[str, str], Tensor]:
        """The deferred parts, once whole-model information is complete."""
        return {}

    # -- sparse form (SHiRA inputs) and exact concatenation (LoRI inputs) ----------------------
    def linear_coefficients(self, weights: Tensor) -> Tensor | None:
        """``c [T]`` with ``merged = Σ_t c_t ΔW_t`` for a fixed linear combination (linear, task
        arithmetic), else None. Such methods merge LoRI adapters exactly by concatenating factors."""
        return None

    def prepare_sparse(self, ctx: SparseMergeContext) -> None:
        """Optional passes over ``ctx.stream`` (sparse form) before merging."""

    def merge_sparse(self, key: tuple[str, str], x: Tensor, stored: Tensor, weights: Tensor) -> Tensor | None:
        """Merge one module in sparse form (only called when :attr:`sparse_form` is True).

        Args:
            key: ``(module, "values")``.
            x: ``[T, U]`` values on the union support of the module (0 where a task stores nothing).
            stored: ``[T, U]`` bool, where each task stores an entry (trim / drop work among these).
            weights: ``[T]``.

        Returns:
            ``[U]``, or None to defer to :meth:`finish`. The default suits element-wise methods: an entry
            a task does not store is a zero of its delta.
        """
        return self.merge(key, x, weights)

    def run(self, ctx: MergeContext, sink: _Sink) -> None:
        self.prepare(ctx)
        for name, parts in ctx.stream(f"{self.name}: merging"):
            for part, x in parts.items():
                out = self.merge((name, part), x, ctx.part_weights(part))
                if out is not None:
                    sink.put(name, part, out)
        for (name, part), out in self.finish().items():
            sink.put(name, part, out)


# ------------------------------------------------------------------------------------------------
# outputs


@dataclass
class ModuleReport:
    """One module of a merge / extraction: shape, output rank, retained energy, density, time."""

    name: str
    shape: tuple[int, int]
    rank: int | None = None
    energy: float | None = None
    density: float | None = None
    norm: float = 0.0
    error: float | None = None  # relative Frobenius error of the output vs the merged delta (or per-task, RMM)
    seconds: float = 0.0
    base_zeros_hit: int | None = None  # full output: zeros of the base weight the merge made non-zero

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Sink:
    """Collects merged parts per module and turns each finished module into the output form."""

    def __init__(
        self,
        output: str,
        ctx: MergeContext,
        *,
        rank: int | None,
        energy: float | None,
        model: nn.Module | None,
        keep_sparsity: bool = False,
    ) -> None:
        self.output, self.ctx, self.rank, self.energy, self.model = output, ctx, rank, energy, model
        self.keep_sparsity = keep_sparsity
        self.pending: dict[str, dict[str, Tensor]] = {}
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.sparse: dict[str, tuple[Tensor, Tensor]] = {}
        self.reports: dict[str, ModuleReport] = {}
        self.t0 = time.perf_counter()

    def _default_rank(self, name: str) -> int:
        return sum(s.modules[name].rank for s in self.ctx.sources if name in s.modules)

    def put(self, name: str, part: str, value: Tensor) -> None:
        got = self.pending.setdefault(name, {})
        got[part] = value
        if len(got) < len(self.ctx.parts):
            return
        del self.pending[name]
        t = time.perf_counter()
        shape = self.ctx.shapes[name]
        rep = ModuleReport(name, shape)
        if self.ctx.factorwise:
            B, A = got["B"], got["A"]  # [d_out, r], [r, d_in]
            delta = B @ A  # [d_out, d_in]
            if self.output == "lora":
                self.factors[name] = (B, A)
                rep.rank, rep.energy, rep.error = int(A.shape[0]), 1.0, 0.0
        else:
            delta = got["delta"]
            if self.output == "lora":
                k = (
                    self.rank
                    if self.rank is not None
                    else (None if self.energy is not None else self._default_rank(name))
                )
                lr = low_rank_factors(delta, rank=k, energy=self.energy, solver="gram")
                self.factors[name] = (lr.B, lr.A)
                rep.rank, rep.energy = lr.rank, lr.energy
                dn = float(delta.norm())
                rep.error = float((delta - lr.B @ lr.A).norm()) / dn if dn > 0 else 0.0
        rep.norm = float(delta.norm())
        nnz = int(torch.count_nonzero(delta))
        rep.density = nnz / delta.numel()
        if self.output == "sparse":
            flat = delta.reshape(-1)  # [d_out*d_in]
            idx = torch.nonzero(flat).reshape(-1)  # [nnz]
            self.sparse[name] = (idx, flat[idx].clone())
        elif self.output == "full":
            assert self.model is not None
            rep.base_zeros_hit = write_merged_(self.model, name, delta, keep_sparsity=self.keep_sparsity)
        rep.seconds = time.perf_counter() - t
        self.reports[name] = rep


# ------------------------------------------------------------------------------------------------
# result


@dataclass
class MergeResult:
    """The outcome of :func:`merge_adapters`.

    Attributes:
        method: the merge method.
        params: its parameters (after defaults), plus ``output`` / ``rank`` / ``energy``.
        weights: the task weights used.
        sources: ``{name, path, sha256}`` per input adapter.
        output: ``"lora"`` | ``"sparse"`` | ``"full"`` | ``"rmm"`` | ``"shira"`` | ``"lori"``.
        modules: per-module :class:`ModuleReport` (rank, retained energy, density, time).
        factors: ``lora`` / ``lori``: module -> ``(B [d_out, k], A [k, d_in])``, weight layout, scale 1.
        sparse: ``sparse`` / ``shira``: module -> ``(flat indices [nnz] int64, values [nnz])``.
        b_masks: ``lori``: module -> bool ``[d_out, k]``, the stored positions of B (the inputs' masks).
        model: ``full``: the merged model (a copy of the base).
        bundle: ``rmm``: the :class:`~adapterlab.merging.rmm.RMMBundle`.
        base_zeros_hit: ``full``: how many zero entries of the base the merge made non-zero (0 with
            ``keep_sparsity=True``); None when no base weights were written.
    """

    method: str
    params: dict[str, Any]
    weights: list[float]
    sources: list[dict[str, Any]]
    output: str
    modules: list[ModuleReport]
    shapes: dict[str, tuple[int, int]]
    factors: dict[str, tuple[Tensor, Tensor]] | None = None
    sparse: dict[str, tuple[Tensor, Tensor]] | None = None
    model: nn.Module | None = None
    bundle: RMMBundle | None = None
    b_masks: dict[str, Tensor] | None = None
    embeddings: frozenset[str] = frozenset()
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    base_zeros_hit: int | None = None

    # -- access ------------------------------------------------------------------------------
    def delta(self, name: str) -> Tensor:
        """The merged dense fp32 delta of one module (weight layout)."""
        if name not in self.shapes:
            raise KeyError(
                f"no module {name!r} in this merge; modules: {len(self.shapes)} (e.g. {next(iter(self.shapes), '')!r})"
            )
        if self.factors is not None:
            if name not in self.factors:
                return torch.zeros(self.shapes[name])
            B, A = self.factors[name]
            return B.float() @ A.float()  # [d_out, k] @ [k, d_in]
        if self.sparse is not None:
            out = torch.zeros(self.shapes[name]).reshape(-1)
            idx, val = self.sparse[name]
            out[idx] = val.float()
            return out.reshape(self.shapes[name])
        if self.bundle is not None:
            return self.bundle.merged_delta(name)
        raise ValueError("output='full' keeps the merged model, not deltas; compare result.model with the base")

    def apply_(self, model: nn.Module) -> None:
        """Add the merged deltas into ``model``'s weights in place (fp32 add, cast once)."""
        if self.output == "full":
            raise ValueError("output='full' is already a merged model (result.model)")
        for name in self.shapes:
            w = model.get_submodule(name).weight
            with torch.no_grad():
                w.copy_(add_to_weight(w, self.delta(name)))

    def reconstruct(self, task: str | int) -> MergeResult:
        """RMM only: the adapter of one task (by name or index) as a LoRA :class:`MergeResult`."""
        if self.bundle is None:
            raise ValueError(f"reconstruct() needs an rmm merge; this is a {self.method!r} merge")
        return self.bundle.reconstruct(task)

    def report(self) -> dict[str, Any]:
        """A JSON-able summary (written as ``merge_report.json``)."""
        energies = [m.energy for m in self.modules if m.energy is not None]
        return {
            "method": self.method,
            "params": self.params,
            "weights": self.weights,
            "sources": self.sources,
            "output": self.output,
            "seconds": self.seconds,
            "warnings": self.warnings,
            "min_energy": min(energies) if energies else None,
            "base_zeros_hit": self.base_zeros_hit,
            "modules": [m.to_dict() for m in self.modules],
        }

    # -- save --------------------------------------------------------------------------------
    def save(self, path: str | Path, *, overwrite: bool = False, tokenizer: Any = None) -> Path:
        """Write the result to a folder (staged, renamed into place; nothing partial on error).

        * ``lora``: a PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``).
        * ``sparse``: ``sparse_delta.safetensors`` (``<module>.indices`` / ``.values``) +
          ``sparse_adapter.json`` — adapterlab's sparse-delta format (not a peft type).
        * ``full``: a transformers model folder (``save_pretrained``; the tokenizer if given).
        * ``rmm``: the task-average merged LoRA as a PEFT folder plus ``rmm_bundle.safetensors`` and
          ``rmm_config.json`` (see :class:`~adapterlab.merging.rmm.RMMBundle`).
        * ``shira``: a SHiRA adapter folder (peft type ``adapterlab_shira``; ``PeftModel.from_pretrained``
          after ``import adapterlab``).
        * ``lori``: a LoRI adapter folder (peft type ``adapterlab_lori``, ``store_a=True``, rank ``Σ r_t``,
          ``lora_alpha = r`` so the scale is 1; B compact where the inputs' B were).

        Every form also gets ``merge_report.json``.
        """
        meta = {"method": self.method, "params": self.params, "weights": self.weights, "sources": self.sources}
        with staged_dir(path, overwrite) as stage:
            if self.output == "lora":
                assert self.factors is not None
                write_lora_dir(
                    stage,
                    self.factors,
                    embeddings=self.embeddings,
                    fan_in_fan_out=self.fan_in_fan_out,
                    base_model_name_or_path=self.base_model_name_or_path,
                    dtype=self.dtype,
                    metadata=meta,
                )
            elif self.output == "sparse":
                assert self.sparse is not None
                from adapterlab.io import save_tensors

                tensors: dict[str, Tensor] = {}
                for name, (idx, val) in self.sparse.items():
                    tensors[f"{name}.indices"] = idx
                    tensors[f"{name}.values"] = val.to(self.dtype)
                save_tensors(stage / "sparse_delta.safetensors", tensors, metadata={"format": "pt"})
                info = {
                    "format": "adapterlab_sparse_delta",
                    "base_model_name_or_path": self.base_model_name_or_path,
                    "modules": {n: list(s) for n, s in self.shapes.items()},
                    **meta,
                }
                (stage / "sparse_adapter.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            elif self.output == "full":
                assert self.model is not None
                self.model.save_pretrained(str(stage))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(stage))
            elif self.output == "rmm":
                assert self.bundle is not None
                self.bundle.write(stage, metadata=meta)
            elif self.output == "shira":
                assert self.sparse is not None
                from adapterlab.merging.sparse import write_shira_dir

                write_shira_dir(
                    stage,
                    self.sparse,
                    self.shapes,
                    base_model_name_or_path=self.base_model_name_or_path,
                    dtype=self.dtype,
                    metadata=meta,
                )
            elif self.output == "lori":
                assert self.factors is not None and self.b_masks is not None
                from adapterlab.merging.sparse import write_lori_dir

                write_lori_dir(
                    stage,
                    self.factors,
                    self.b_masks,
                    base_model_name_or_path=self.base_model_name_or_path,
                    dtype=self.dtype,
                    metadata=meta,
                )
            (stage / "merge_report.json").write_text(
                json.dumps(self.report(), indent=2, default=str) + "\n", encoding="utf-8"
            )
        return Path(path)


# ------------------------------------------------------------------------------------------------
# merge_adapters


def _weights(weights: Sequence[float] | None, n: int, merger: Merger) -> Tensor:
    if weights is None:
        value = 1.0 / n if merger.default_weights == "mean" else 1.0
        return torch.full((n,), value, dtype=torch.float32)
    if not merger.takes_weights:
        raise ValueError(f"weights: merge method {merger.name!r} takes no task weights (it keeps every task)")
    w = list(weights)
    if len(w) != n:
        raise ValueError(f"weights: expected {n} numbers (one per adapter), got {len(w)}")
    return torch.tensor([_check_number(f"weights[{i}]", x) for i, x in enumerate(w)], dtype=torch.float32)


def _check_base_shapes(base: nn.Module, shapes: Mapping[str, tuple[int, int]]) -> None:
    for name, shape in shapes.items():
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise ValueError(f"base: the base model has no module {name!r} that the adapters target") from None
        got = tuple(module.weight.shape)
        if got != shape:
            raise ValueError(
                f"base: module {name!r} has weight shape {list(got)} but the adapters' delta is {list(shape)}; "
                f"the adapters were made for another base"
            )


def _skeleton(base: nn.Module | str | Path) -> nn.Module:
    """The base itself, or a weightless (meta-device) model built from a folder's config."""
    if isinstance(base, nn.Module):
        return base.get_base_model() if hasattr(base, "get_base_model") else base
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterlab.models import resolve_model_path

    path = resolve_model_path(base)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base: {str(base)!r} is not a model folder (no config.json)")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a model folder's ``config.json`` records (``dtype`` / ``torch_dtype``), else fp32."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    dtype = getattr(torch, str(name), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _load_base(base: nn.Module | str | Path) -> nn.Module:
    """A copy of the base to merge into, in the checkpoint's dtype (a bf16 folder stays bf16)."""
    if isinstance(base, nn.Module):
        inner = base.get_base_model() if hasattr(base, "get_base_model") else base
        return copy.deepcopy(inner)
    from adapterlab.models import load_model, resolve_model_path

    return load_model(base, dtype=_checkpoint_dtype(resolve_model_path(base)))


def merge_adapters(
    adapters: Sequence[AdapterLike] | Mapping[str, AdapterLike],
    method: str,
    *,
    weights: Sequence[float] | None = None,
    output: str | None = None,
    rank: int | None = None,
    energy: float | None = None,
    base: nn.Module | str | Path | None = None,
    dtype: torch.dtype | None = None,
    factorwise: bool = False,
    check_base: bool = True,
    drop_zeros: bool = False,
    keep_sparsity: bool = False,
    registry: Any = None,
    progress: ProgressFactory | None = None,
    **params: Any,
) -> MergeResult:
    """Merge T adapters of one base (LoRA, SHiRA, LoRI-D / LoRI-S) with a registered method.

    Three routes, chosen from the inputs (see :mod:`adapterlab.merging.sparse`):

    * **sparse form** — every adapter is SHiRA and the method is linear, task_arithmetic, ties,
      dare_linear or dare_ties, output ``shira`` / ``sparse`` / ``full``: per module the T index sets
      are united and the method works on a ``[T, nnz_union]`` value matrix; no dense ``d_out × d_in``
      delta is built. TIES ``density`` is relative to each adapter's **stored** entries: it keeps the
      top ``⌊density·K⌋`` of the K values an adapter stores in a module (``trim_scope="tensor"``) or the
      top ``⌈density·ΣK⌉`` over all its modules (``"model"``); DARE drops among the stored entries.
    * **concatenation** — every adapter is LoRI and the method is linear / task_arithmetic, output
      ``lori`` / ``lora`` without ``rank`` / ``energy``: ``B = [c_1 s_1 B_1, …]``, ``A = [A_1; …]``, exact
      (``B A = Σ c_t ΔW_t``), rank ``Σ r_t``, each B keeps its zeros.
    * **dense deltas** — everything else (LoRA, LoRI with TIES / DARE / RMM, SHiRA mixed with other types
      — which warns —, or ``output="lora"`` for SHiRA: truncated SVD of the merged dense delta).

    Args:
        adapters: PEFT LoRA / SHiRA / LoRI folders, ``"hub:NAME"`` registry refs, peft models, or a
            name -> adapter mapping (names label tasks, e.g. for RMM's ``reconstruct``).
        method: ``linear`` (Σ w_t ΔW_t, w = 1/T by default), ``task_arithmetic`` (λ Σ w_t ΔW_t),
            ``ties``, ``dare_linear``, ``dare_ties`` or ``rmm``.
        weights: one number per adapter (default per method, see above).
        output: ``"lora"`` (truncated SVD per module; rank ``rank`` or by ``energy``; default rank =
            the sum of the input ranks, which is exact for linear / task arithmetic), ``"sparse"``
            (the nonzero entries of the merged deltas), ``"full"`` (a merged copy of ``base``),
            ``"shira"`` (all-SHiRA inputs: a SHiRA adapter on the union support) or ``"lori"``
            (all-LoRI inputs, linear / task_arithmetic: the concatenated LoRI adapter). Default: ``shira``
            for all-SHiRA inputs of a sparse-form method, ``lori`` for all-LoRI linear merges, else ``lora``.
            RMM always produces its bundle.
        rank / energy: LoRA output rank, or the retained-energy threshold per module (exclusive).
        base: the base model (or folder); needed for ``"full"``, and when given its shapes are checked.
        dtype: dtype of the saved tensors (default: the first adapter's).
        factorwise: merge the A and B factors separately (peft's non-SVD behaviour; warns).
        check_base: refuse adapters whose ``base_model_name_or_path`` differ.
        drop_zeros: sparse form only: leave exact zeros of the merged values (e.g. trimmed by TIES) out of
            a ``shira`` / ``sparse`` output; by default the output's support is the union support.
        keep_sparsity: ``output="full"`` only: mask the merged delta by the base's zero pattern (``W != 0``)
            and check afterwards that every zero of the base is still zero. Either way the result reports
            ``base_zeros_hit``, the zeros of the base the merge made non-zero (and warns when it is not 0).
            Base weights are always written as ``(W.float() + Δ).to(W.dtype)`` (fp32 add, one cast).
        registry: AdapterRegistry used for ``hub:`` refs.
        progress: a progress factory (see :mod:`adapterlab.progress`).
        **params: method parameters, e.g. ``density=0.2, lambda_=1.0, elect="mass", trim_scope="model"``
            for TIES (``lambda`` is accepted as a dict key: ``**{"lambda": 1.0}``); ``density, seed,
            lambda_`` (+ ``elect``) for DARE; ``K`` (alias of ``n_basis``), ``coeff_scope``, ``gauge``
            for RMM (whose result has ``.bundle`` and ``.reconstruct(task)``).

    Returns:
        :class:`MergeResult`; ``.save(dir)`` writes it. With ``output="full"`` its ``base_zeros_hit`` (also per
        module and in ``merge_report.json``) counts the zeros of the base the merge made non-zero.

    Raises:
        ValueError: empty list, unknown method, parameter or peft type, values out of range, adapters for
            different bases or shapes, an output the inputs cannot give — each message starts with the key path.
    """
    from adapterlab.merging.sparse import choose_route, merge_lori_concat, merge_sparse_form

    t0 = time.perf_counter()
    merger_cls = MERGERS.get(method)
    merger = merger_cls.from_params(params)
    sources = resolve_adapters(adapters, registry=registry)
    shapes = check_compatible(sources, check_base=check_base)
    w = _weights(weights, len(sources), merger)
    notes: list[str] = []
    if output is not None:
        _check_choice("output", output, OUTPUTS)
    route, output, why = choose_route(sources, merger, w, output, rank=rank, energy=energy, factorwise=factorwise)
    if why:
        warnings.warn(why, UserWarning, stacklevel=2)
        notes.append(why)
    if method == "rmm":
        if output != "lora" or rank is not None or energy is not None or factorwise:
            raise ValueError("output/rank/energy/factorwise: rmm keeps a basis of factors; these options do not apply")
    else:
        if rank is not None and energy is not None:
            raise ValueError("rank/energy: give at most one of rank and energy")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if energy is not None:
            _check_fraction("energy", energy)
        if output != "lora" and (rank is not None or energy is not None):
            raise ValueError(f"rank/energy apply to output='lora' only, not {output!r}")
        if factorwise:
            ranks = {s.modules[n].rank for s in sources for n in shapes if n in s.modules}
            missing = [n for n in shapes if any(n not in s.modules for s in sources)]
            if len(ranks) > 1 or missing:
                raise ValueError(
                    "factorwise: merging factors needs every adapter to target the same modules at one rank"
                )
            msg = (
                f"factorwise=True merges LoRA A and B factors separately with {method!r}: the factors of "
                f"different adapters are not aligned and the product gains cross terms; this is not "
                f"{method} of the deltas (adapterlab's default merges dense deltas)"
            )
            warnings.warn(msg, UserWarning, stacklevel=2)
            notes.append(msg)
    if not isinstance(keep_sparsity, bool):
        raise ValueError(f"keep_sparsity must be True or False, got {keep_sparsity!r}")
    if keep_sparsity and output != "full":
        raise ValueError(
            f"keep_sparsity applies to output='full' only (it masks the merge by the base's zeros), not {output!r}"
        )
    if output == "full" and base is None:
        raise ValueError("base: output='full' needs the base model (base=model or folder)")
    model = None
    if base is not None:
        _check_base_shapes(_skeleton(base), shapes)
        if output == "full" and method != "rmm":
            model = _load_base(base)
            if keep_sparsity and not any(bool((model.get_submodule(n).weight == 0).any()) for n in shapes):
                raise ValueError(
                    "keep_sparsity=True but the base is dense: no module the adapters target has a zero weight "
                    "(prune the base first, e.g. adapterlab.prune_, or pass keep_sparsity=False)"
                )
    first = sources[0]
    out_dtype = dtype or first.value_dtype()
    embeddings = frozenset(n for s in sources for n, m in s.modules.items() if m.embedding)
    fan = any(bool(s.config.get("fan_in_fan_out")) for s in sources)
    common = dict(
        method=merger.name,
        weights=[float(x) for x in w],
        sources=[s.info() for s in sources],
        shapes=shapes,
        embeddings=embeddings,
        fan_in_fan_out=fan,
        base_model_name_or_path=first.base_model,
        dtype=out_dtype,
        warnings=notes,
    )
    if route == "sparse":
        result = merge_sparse_form(
            sources,
            shapes,
            merger,
            w,
            output=output,
            model=model,
            drop_zeros=drop_zeros,
            keep_sparsity=keep_sparsity,
            progress=progress,
            common=common,
        )
        result.seconds = time.perf_counter() - t0
        return result
    if route == "concat":
        result = merge_lori_concat(sources, shapes, merger, w, output=output, common=common)
        result.seconds = time.perf_counter() - t0
        return result
    ctx = MergeContext(sources, shapes, w, factorwise=factorwise, progress=progress)
    if method == "rmm":
        from adapterlab.merging.rmm import RmmMerger

        assert isinstance(merger, RmmMerger)
        bundle = merger.fit(ctx, dtype=out_dtype)
        result = MergeResult(
            params=merger.describe(), output="rmm", modules=bundle.module_reports(), bundle=bundle, **common
        )
        result.seconds = time.perf_counter() - t0
        return result
    sink = _Sink(output, ctx, rank=rank, energy=energy, model=model, keep_sparsity=keep_sparsity)
    merger.run(ctx, sink)
    if sink.pending:
        raise RuntimeError(f"merge method {merger.name!r} left modules unfinished: {sorted(sink.pending)[:3]}")
    hits = None
    if output == "full":
        hits = {n: int(sink.reports[n].base_zeros_hit or 0) for n in shapes}
        note = zeros_hit_note(hits)
        if note:
            logger.warning(note)
            notes.append(note)
    params = {**merger.describe(), "output": output, "rank": rank, "energy": energy, "factorwise": factorwise}
    if output == "full":
        params["keep_sparsity"] = keep_sparsity
    result = MergeResult(
        params=params,
        output=output,
        modules=[sink.reports[n] for n in shapes],
        factors=sink.factors if output == "lora" else None,
        sparse=sink.sparse if output == "sparse" else None,
        model=model,
        base_zeros_hit=None if hits is None else sum(hits.values()),
        **common,
    )
    result.seconds = time.perf_counter() - t0
    return result
