"""Any adapter as a plain PEFT LoRA (what vLLM, LoRAX and SGLang serve): exact where the math allows,
a truncated SVD with a per-module error report otherwise.

Every input is first described as a :class:`LoraInput`: one :class:`ModuleSource` per target module,
either in **factor form** (``delta = s · B @ A`` exactly: LoRA, rsLoRA, LoRI-D / LoRI-S, DyLoRA at a
rank, a shared-basis bundle member, an RMM task, a LoRA merge) or as a **dense delta** computed for
that one module when asked (SHiRA's scattered entries, SNELL's sparsified kernel, SPP's and LoRS's
masked deltas; never all modules at once). :func:`to_lora` then turns each module into LoRA factors:

* factor form, no ``rank`` / ``energy`` (or ``rank >= r``): the stored factors themselves, zero-padded
  to ``rank`` (exact: error 0; the scale is carried by ``lora_alpha``, so half-precision factors keep
  their bits);
* factor form, ``rank < r`` or ``energy``: the best rank-k approximation of ``s · B A`` from the SVD of
  the small ``r x r`` core (``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, ``M = R_B R_Aᵀ``, factorised by
  :func:`~adapterlab.extraction.functional.low_rank_factors`; ``Q`` orthonormal, so the spectrum and
  the error are those of the full delta);
* dense delta: :func:`~adapterlab.extraction.functional.low_rank_factors` of that delta (``rank`` fixed
  or the smallest k keeping ``energy`` of it), and the error measured on the residual.

The per-module error is ``‖ΔW − B'A'‖_F / ‖ΔW‖_F``; the total is ``sqrt(Σ ‖ΔW − B'A'‖²) / sqrt(Σ ‖ΔW‖²)``.
``max_error`` refuses (before anything is written) when any module is above it, which bounds the
total too. ``for_vllm`` pads every module to one rank of vLLM's set (:data:`VLLM_RANKS`) with zero
columns (exact), so the folder needs no ``rank_pattern``.

Reference:
    Eckart–Young–Mirsky (the truncated SVD is the best rank-k approximation in Frobenius norm);
    PHLoRA §2, https://arxiv.org/abs/2509.10971 (the sqrt(S) split).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterlab.extraction.functional import low_rank_factors
from adapterlab.io import check_finite
from adapterlab.progress import ProgressFactory, track

__all__ = [
    "TUNER_KINDS",
    "VLLM_RANKS",
    "LoraExport",
    "LoraInput",
    "ModuleExport",
    "ModuleSource",
    "adapter_kind",
    "lora_input",
    "to_lora",
    "vllm_rank",
]

#: The ranks vLLM accepts for ``--max-lora-rank`` (an adapter is padded up to one of them).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: The report written into every exported folder.
REPORT_FILE = "export_report.json"
#: adapterlab tuners read through the tuner layer on a base (peft type -> what the layer gives).
TUNER_KINDS: dict[str, str] = {
    "ADAPTERLAB_DYLORA": "dylora",
    "ADAPTERLAB_SNELL": "snell",
    "ADAPTERLAB_SPP": "spp",
    "ADAPTERLAB_LORS": "lors",
}
#: Kinds whose delta is not low rank: a rank or an energy must be chosen.
DENSE_KINDS = ("shira", "snell", "spp", "lors", "sparse")


@dataclass
class ModuleSource:
    """One module of an input adapter, read when asked.

    Attributes:
        name: the base-model module path (``model.layers.0.self_attn.q_proj``).
        shape: ``(d_out, d_in)`` of the base weight (= of the delta).
        factors: ``() -> (B [d_out, r] fp32, A [r, d_in] fp32, s)`` with ``delta = s · B @ A`` exactly.
        delta: ``() -> [d_out, d_in] fp32``: the dense delta of this module only.
        embedding: an embedding layer (written as ``lora_embedding_A`` / ``_B``).
    """

    name: str
    shape: tuple[int, int]
    factors: Callable[[], tuple[Tensor, Tensor, float]] | None = None
    delta: Callable[[], Tensor] | None = None
    embedding: bool = False


@dataclass
class LoraInput:
    """An adapter described module by module (see the module docstring).

    Attributes:
        kind: ``lora``, ``rslora``, ``lori``, ``lori-s``, ``dylora``, ``shira``, ``snell``, ``spp``, ``lors``,
            ``shared-basis``, ``rmm``, ``merge`` or ``sparse``.
        dtype: the adapter's stored dtype (the output's default).
        source: ``{name, path, sha256, ref, ...}`` recorded in the report and the file header.
    """

    kind: str
    modules: list[ModuleSource]
    dtype: torch.dtype = torch.float32
    base_model_name_or_path: str | None = None
    fan_in_fan_out: bool = False
    source: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModuleExport:
    """One row of the export report.

    ``how`` is ``exact`` (the factors themselves), ``truncated`` (SVD of the factor form), ``svd``
    (SVD of a dense delta) or ``zero`` (an all-zero delta, left out). ``error`` is the relative
    Frobenius error of the written factors (0 for exact rows), ``energy`` the retained spectral energy.
    """

    name: str
    shape: tuple[int, int]
    how: str
    rank: int
    source_rank: int | None
    error: float
    energy: float
    norm: float
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "how": self.how,
            "rank": self.rank,
            "source_rank": self.source_rank,
            "error": self.error,
            "energy": self.energy,
            "norm": self.norm,
            "seconds": self.seconds,
        }


@dataclass
class LoraExport:
    """The result of :func:`to_lora`: per module ``delta = scales[m] · B @ A`` (fp32, weight layout).

    ``save(dir)`` writes a PEFT LoRA folder (in :attr:`dtype`) plus ``export_report.json``.
    """

    kind: str
    factors: dict[str, tuple[Tensor, Tensor]]
    scales: dict[str, float]
    modules: list[ModuleExport]
    dtype: torch.dtype
    base_model_name_or_path: str | None
    embeddings: frozenset[str] = frozenset()
    fan_in_fan_out: bool = False
    for_vllm: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_error(self) -> float:
        """``sqrt(Σ (error_m · ‖ΔW_m‖)²) / sqrt(Σ ‖ΔW_m‖²)`` (0 for a zero adapter)."""
        num = sum((m.error * m.norm) ** 2 for m in self.modules)
        den = sum(m.norm**2 for m in self.modules)
        return math.sqrt(num / den) if den > 0 else 0.0

    @property
    def exact(self) -> bool:
        return all(m.how in ("exact", "zero") for m in self.modules)

    @property
    def rank(self) -> int:
        return max((int(a.shape[0]) for _, a in self.factors.values()), default=0)

    def delta(self, name: str) -> Tensor:
        """``s · B @ A`` of one module, fp32 ``[d_out, d_in]``."""
        B, A = self.factors[name]
        return (B @ A) * self.scales[name]  # [d_out, k] @ [k, d_in]

    def report(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "exact": self.exact,
            "total_error": self.total_error,
            "max_module_error": max((m.error for m in self.modules), default=0.0),
            "rank": self.rank,
            "for_vllm": self.for_vllm,
            "dtype": str(self.dtype).removeprefix("torch."),
            "base_model_name_or_path": self.base_model_name_or_path,
            "settings": self.settings,
            "source": self.source,
            "seconds": self.seconds,
            "modules": [m.to_dict() for m in self.modules],
        }

    def _written_factors(self) -> tuple[dict[str, tuple[Tensor, Tensor]], float | None]:
        """The factors to write and the ``lora_alpha`` that carries the scale (None: folded, scale 1).

        One rank everywhere (always with ``for_vllm``): ``lora_alpha = c · r`` with c the most common
        module scale; the other modules get ``s / c`` folded into B (in fp32). Mixed ranks: every scale is
        folded into B and the writer sets ``lora_alpha = r`` per module (``rank_pattern`` / ``alpha_pattern``).
        """
        ranks = {int(a.shape[0]) for _, a in self.factors.values()}
        if len(ranks) != 1:
            return {n: (B * self.scales[n], A) for n, (B, A) in self.factors.items()}, None
        c = Counter(self.scales.values()).most_common(1)[0][0]
        out = {n: (B if self.scales[n] == c else B * (self.scales[n] / c), A) for n, (B, A) in self.factors.items()}
        return out, c * ranks.pop()

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the PEFT LoRA folder and ``export_report.json`` (staged: nothing partial on error)."""
        from adapterlab.lora_dir import write_lora_dir
        from adapterlab.staging import staged_dir

        factors, alpha = self._written_factors()
        for name, (B, _) in factors.items():
            check_finite(B, f"export: module {name!r}: the scaled factor B", " (an fp32 overflow); nothing was written")
        meta = {"method": "export", "kind": self.kind, "total_error": self.total_error, "source": self.source}
        with staged_dir(path, overwrite) as stage:
            write_lora_dir(
                stage,
                factors,
                embeddings=set(self.embeddings),
                fan_in_fan_out=self.fan_in_fan_out,
                base_model_name_or_path=self.base_model_name_or_path,
                dtype=self.dtype,
                metadata=meta,
                lora_alpha=alpha,
            )
            text = json.dumps(self.report(), indent=2, default=str) + "\n"
            (stage / REPORT_FILE).write_text(text, encoding="utf-8")
        return Path(path)


# ------------------------------------------------------------------------------------------------
# the conversion


def vllm_rank(rank: int) -> int:
    """The smallest rank of :data:`VLLM_RANKS` that is ``>= rank``.

    Raises:
        ValueError: ``rank`` above vLLM's largest (512).
    """
    for r in VLLM_RANKS:
        if r >= rank:
            return r
    raise ValueError(
        f"rank {rank} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}; lower --rank or --energy "
        f"(allowed: {', '.join(map(str, VLLM_RANKS))})"
    )


def _pad(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero columns of B / rows of A up to ``rank`` (the product is unchanged)."""
    k = int(A.shape[0])
    if k >= rank:
        return B, A
    B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], 1)  # [d_out, k] -> [d_out, rank]
    A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], 0)  # [k, d_in] -> [rank, d_in]
    return B, A


def _check_settings(rank: Any, energy: Any, max_error: Any) -> None:
    if rank is not None and energy is not None:
        raise ValueError("--rank/--energy: give at most one of them")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"--rank must be a positive integer, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0
    ):
        raise ValueError(f"--energy must be in (0, 1], got {energy!r}")
    if max_error is not None and (
        isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0.0 <= float(max_error)
    ):
        raise ValueError(f"--max-error must be a number >= 0, got {max_error!r}")


def _svd(name: str, fn: Callable[[], Any]) -> Any:
    """Run one factorisation; a LAPACK failure is one line naming the module."""
    try:
        return fn()
    except RuntimeError as exc:  # torch.linalg.LinAlgError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"module {name!r}: the SVD failed ({reason}); nothing was written") from None


def _truncate_factored(
    name: str, B: Tensor, A: Tensor, *, rank: int | None, energy: float | None
) -> tuple[Tensor, Tensor, float, float, float]:
    """Best rank-k approximation of ``B @ A`` from the SVD of its small core.

    Args:
        B: ``[d_out, r]`` fp32 (scale folded in); A: ``[r, d_in]`` fp32.

    Returns:
        ``(B' [d_out, k], A' [k, d_in], relative error, retained energy, ‖B A‖_F)``.
    """
    Qb, Rb = torch.linalg.qr(B)  # [d_out, p], [p, r]
    Qa, Ra = torch.linalg.qr(A.T)  # [d_in, q], [q, r]
    core = Rb @ Ra.T  # [p, r] @ [r, q] -> [p, q]; B A = Qb core Qaᵀ
    lr = _svd(name, lambda: low_rank_factors(core, rank=rank, energy=energy))
    norm = math.sqrt(lr.total_energy)
    if lr.rank == 0:
        return B.new_zeros(B.shape[0], 0), A.new_zeros(0, A.shape[1]), 0.0, 1.0, norm
    err = float((core - lr.B @ lr.A).norm()) / norm  # = ‖BA − B'A'‖ / ‖BA‖ (Qb, Qa orthonormal)
    return Qb @ lr.B, lr.A @ Qa.T, err, lr.energy, norm  # [d_out, k], [k, d_in]


def to_lora(
    inp: LoraInput,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    for_vllm: bool = False,
    served_name: str | None = None,
    dtype: torch.dtype | None = None,
    solver: str = "svd",
    progress: ProgressFactory | None = None,
) -> LoraExport:
    """Turn an adapter (see :func:`lora_input`) into LoRA factors, module by module.

    Args:
        inp: the adapter, module by module.
        rank: the rank of every module: factor-form modules of rank ``r <= rank`` are kept exactly
            (zero-padded to ``rank``), others are truncated (SVD); dense deltas are factorised at it.
        energy: instead of ``rank``: per module the smallest k keeping this fraction of the delta's
            spectral energy ``Σ σ²`` (factor-form modules that need all their r stay exact).
        max_error: refuse when a module's relative Frobenius error is above it (nothing written).
        for_vllm: pad every module to one rank of :data:`VLLM_RANKS` (zero columns, exact).
        served_name: ``base_model_name_or_path`` to record (the name the server serves the base under).
        dtype: the written dtype (default: the adapter's).
        solver: ``svd`` or ``gram`` (see :func:`~adapterlab.extraction.functional.low_rank_factors`).

    Returns:
        :class:`LoraExport`; ``.save(dir)`` writes it.

    Raises:
        ValueError: bad settings, a dense kind without ``rank`` / ``energy``, a module above
            ``max_error``, a rank above vLLM's largest, or an all-zero adapter.
    """
    _check_settings(rank, energy, max_error)
    if inp.kind in DENSE_KINDS and rank is None and energy is None:
        raise ValueError(
            f"a {inp.kind} adapter's delta is not low rank: give --rank R (a fixed rank) or --energy E "
            f"(the kept spectral energy per module; --energy 1.0 keeps it whole)"
        )
    if not inp.modules:
        raise ValueError(f"the {inp.kind} adapter has no modules to export")
    t_start = time.perf_counter()
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    scales: dict[str, float] = {}
    rows: list[ModuleExport] = []
    for m in track(inp.modules, f"export {inp.kind} -> lora", progress=progress):
        t0 = time.perf_counter()
        if m.factors is not None:
            B, A, s = m.factors()
            for part, t in (("B", B), ("A", A)):
                check_finite(t, f"{inp.kind} adapter: module {m.name!r}: factor {part}", "; nothing was written")
            r = int(A.shape[0])
            if energy is None and (rank is None or rank >= r):
                factors[m.name] = _pad(B, A, rank) if rank is not None else (B, A)
                scales[m.name] = float(s)
                norm = float(((B @ A) * s).norm())  # [d_out, r] @ [r, d_in]
                rows.append(ModuleExport(m.name, m.shape, "exact", r, r, 0.0, 1.0, norm))
            else:
                Bt, At, err, kept, norm = _truncate_factored(m.name, B * s, A, rank=rank, energy=energy)
                if energy is not None and int(At.shape[0]) >= r:  # all of it is needed: keep it exactly
                    factors[m.name], scales[m.name] = (B, A), float(s)
                    rows.append(ModuleExport(m.name, m.shape, "exact", r, r, 0.0, 1.0, norm))
                elif int(At.shape[0]) == 0:
                    rows.append(ModuleExport(m.name, m.shape, "zero", 0, r, 0.0, 1.0, 0.0))
                else:
                    factors[m.name], scales[m.name] = (Bt, At), 1.0
                    rows.append(ModuleExport(m.name, m.shape, "truncated", int(At.shape[0]), r, err, kept, norm))
        elif m.delta is not None:
            D = m.delta()  # [d_out, d_in] fp32, this module only
            check_finite(D, f"{inp.kind} adapter: module {m.name!r}: the delta", "; nothing was written")
            lr = _svd(m.name, functools.partial(low_rank_factors, D, rank=rank, energy=energy, solver=solver))
            norm = math.sqrt(lr.total_energy)
            if lr.rank == 0:
                rows.append(ModuleExport(m.name, m.shape, "zero", 0, None, 0.0, 1.0, 0.0))
            else:
                err = float((D - lr.B @ lr.A).norm()) / norm  # the residual itself, [d_out, d_in]
                factors[m.name], scales[m.name] = (lr.B, lr.A), 1.0
                rows.append(ModuleExport(m.name, m.shape, "svd", lr.rank, None, err, lr.energy, norm))
            del D
        else:  # pragma: no cover - builders always set one
            raise ValueError(f"module {m.name!r} has neither factors nor a delta")
        rows[-1].seconds = time.perf_counter() - t0
        if max_error is not None and rows[-1].error > float(max_error):
            row = rows[-1]
            raise ValueError(
                f"module {row.name!r}: relative error {row.error:.4g} at rank {row.rank} is above --max-error "
                f"{max_error:g}; raise --rank / --energy or the bound; nothing was written"
            )
    if not factors:
        raise ValueError(f"every module of the {inp.kind} adapter has an all-zero delta; there is nothing to export")
    if for_vllm:
        r_out = vllm_rank(max(int(a.shape[0]) for _, a in factors.values()))
        factors = {n: _pad(B, A, r_out) for n, (B, A) in factors.items()}
    return LoraExport(
        kind=inp.kind,
        factors=factors,
        scales=scales,
        modules=rows,
        dtype=dtype or inp.dtype,
        base_model_name_or_path=served_name if served_name is not None else inp.base_model_name_or_path,
        embeddings=frozenset(m.name for m in inp.modules if m.embedding and m.name in factors),
        fan_in_fan_out=inp.fan_in_fan_out,
        for_vllm=for_vllm,
        settings={"rank": rank, "energy": energy, "max_error": max_error, "for_vllm": for_vllm, "solver": solver},
        source=dict(inp.source),
        seconds=time.perf_counter() - t_start,
    )


# ------------------------------------------------------------------------------------------------
# adapters -> LoraInput


def _peft_type_of_folder(folder: Path, where: str) -> str:
    from adapterlab.adapter_config import read_adapter_config

    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{where}: {str(folder)!r} is not a PEFT adapter folder (no adapter_config.json)")
    raw, _ = read_adapter_config(cfg_path)
    return str(raw.get("peft_type", "")).upper()


def _folder_of(ref: str, where: str, registry: Any) -> tuple[Path, Any]:
    """A folder path or ``hub:NAME`` -> ``(folder, the registry's recorded base or None)``."""
    if ref.startswith("hub:"):
        from adapterlab.adapters import _resolve_hub_ref

        return _resolve_hub_ref(ref[4:], where, registry)
    path = Path(ref).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{where}: adapter folder {ref!r} does not exist")
    return path, None


def adapter_kind(adapter: Any, *, registry: Any = None, where: str = "adapter") -> str:
    """The upper-case peft type of an adapter folder, ``hub:NAME`` or peft model (``LORA``, ``ADAPTERLAB_SHIRA``...)."""
    if hasattr(adapter, "peft_config"):
        name = getattr(adapter, "active_adapter", None) or "default"
        name = name[0] if isinstance(name, (list, tuple)) else name
        pt = adapter.peft_config[name].peft_type
        return str(getattr(pt, "value", pt)).upper()
    folder, _ = _folder_of(os.fspath(adapter), where, registry)
    return _peft_type_of_folder(folder, where)


def _stored_dtype(weights: Path) -> torch.dtype:
    """The widest floating dtype an adapter file stores (a half B with an fp32 A stays exact in fp32)."""
    from adapterlab.io import open_tensors

    with open_tensors(weights) as fh:
        floats = [d for d in (fh.dtype(k) for k in fh.keys()) if d is not None and d.is_floating_point]
    out = floats[0] if floats else torch.float32
    for d in floats[1:]:
        out = torch.promote_types(out, d)
    return out


def _from_source(src: Any) -> LoraInput:
    """A LoRA / LoRI / SHiRA :class:`~adapterlab.adapters.LoraSource` as a :class:`LoraInput`."""
    mods: list[ModuleSource] = []
    if src.kind == "shira":
        for name, m in src.modules.items():
            mods.append(ModuleSource(name, m.shape, delta=functools.partial(src.delta, name)))
        kind = "shira"
    else:
        for name, m in src.modules.items():

            def fac(n: str = name, s: float = m.scale) -> tuple[Tensor, Tensor, float]:
                B, A = src.unscaled_factors(n)
                return B, A, s

            mods.append(ModuleSource(name, m.shape, factors=fac, embedding=m.embedding))
        if src.kind == "lori":
            kind = "lori-s" if src.sparse_b else "lori"
        else:
            kind = "rslora" if src.config.get("use_rslora") else "lora"
    fan = bool(src.config.get("fan_in_fan_out", False)) and src.kind == "lora"
    weights = src.path / "adapter_model.safetensors" if src.path is not None else None
    return LoraInput(
        kind=kind,
        modules=mods,
        dtype=_stored_dtype(weights) if weights is not None else src.value_dtype(),
        base_model_name_or_path=src.base_model,
        fan_in_fan_out=fan,
        source={**src.info(), "ref": src.ref, "peft_type": src.peft_type},
    )


def _checkpoint_dtype(path: Path) -> torch.dtype:
    """The dtype a model folder's ``config.json`` records (``dtype`` / ``torch_dtype``), else fp32."""
    from adapterlab.io import read_json

    cfg = path / "config.json"
    raw = read_json(cfg) if cfg.is_file() else {}
    name = raw.get("dtype") or raw.get("torch_dtype") if isinstance(raw, dict) else None
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def _load_base(base: Any, recorded_name: str | None, where: str) -> nn.Module:
    """The base model to load a tuner adapter onto: a module (copied: peft wraps it in place), a folder,
    ``"default"``, or (None) the adapter's ``base_model_name_or_path``."""
    if isinstance(base, nn.Module):
        return copy.deepcopy(base)
    from adapterlab.models import check_model_folder, load_model

    name = base if base is not None else recorded_name
    if not name:
        raise ValueError(f"{where}: the adapter records no base_model_name_or_path; pass the base it was trained on")
    try:
        path = check_model_folder(os.fspath(name))
    except (FileNotFoundError, ValueError) as exc:
        hint = "" if base is not None else " (the adapter's base_model_name_or_path; pass the base with --base)"
        raise type(exc)(f"{where}: base {os.fspath(name)!r}{hint}: {exc}") from None
    return load_model(path, dtype=_checkpoint_dtype(path))


def _tuner_layers(model: nn.Module, adapter: str) -> list[Any]:
    """The adapterlab tuner layers of ``model`` holding ``adapter``, sorted by module key."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "delta_weight") and getattr(module, "key", None):
            names = module.adapter_layer_names[0]
            if adapter in getattr(module, names):
                out.append(module)
    return sorted(out, key=lambda m: m.key)


def _layer_delta(layer: Any, adapter: str) -> Tensor:
    """A tuner layer's dense delta ``[d_out, d_in]`` (what its merge adds), fp32."""
    return layer.delta_weight(adapter).detach().float()


def _from_tuner_model(model: Any, peft_type: str, dylora_rank: int | None, source: dict[str, Any]) -> LoraInput:
    """A peft model carrying an adapterlab DyLoRA / SNELL / SPP / LoRS adapter as a :class:`LoraInput`:
    DyLoRA in factor form at ``dylora_rank`` (default: its inference rank), the others' ``delta_weight``."""
    kind = TUNER_KINDS[peft_type]
    name = getattr(model, "active_adapter", None) or "default"
    name = name[0] if isinstance(name, (list, tuple)) else name
    cfg = model.peft_config[name]
    layers = _tuner_layers(model, name)
    if not layers:
        raise ValueError(f"the {kind} adapter {name!r} has no tuner layers in the model")
    mods: list[ModuleSource] = []
    dtype = next(getattr(layers[0], layers[0].adapter_layer_names[0]).parameters()).dtype
    if kind == "dylora":
        b = cfg.active_eval_rank if dylora_rank is None else dylora_rank
        if isinstance(b, bool) or not isinstance(b, int) or not cfg.r_min <= b <= cfg.r:
            raise ValueError(f"--rank {b!r}: a DyLoRA adapter exports at a rank in [r_min, r] = [{cfg.r_min}, {cfg.r}]")
        for layer in layers:

            def fac(lay: Any = layer) -> tuple[Tensor, Tensor, float]:
                a, bm, s = lay.factors_at(name, b)  # (b, d_in), (d_out, b)
                return bm.detach().float(), a.detach().float(), float(s)

            mods.append(ModuleSource(layer.key, (layer.out_features, layer.in_features), factors=fac))
        source = {**source, "dylora_rank": b, "dylora_r_max": cfg.r}
    else:
        for layer in layers:
            mods.append(
                ModuleSource(
                    layer.key,
                    (layer.out_features, layer.in_features),
                    delta=functools.partial(_layer_delta, layer, name),
                )
            )
    return LoraInput(
        kind=kind,
        modules=mods,
        dtype=dtype,
        base_model_name_or_path=getattr(cfg, "base_model_name_or_path", None),
        source={**source, "peft_type": peft_type},
    )


def lora_input(
    adapter: Any,
    *,
    base: Any = None,
    dylora_rank: int | None = None,
    registry: Any = None,
    where: str = "adapter",
) -> LoraInput:
    """Describe one adapter module by module (nothing is densified here).

    Args:
        adapter: a PEFT adapter folder, ``"hub:NAME"``, a peft model (its active adapter) or a
            :class:`~adapterlab.adapters.LoraSource`. LoRA / rsLoRA, LoRI and SHiRA are read through
            :mod:`adapterlab.adapters`; DyLoRA, SNELL, SPP and LoRS through their tuner layers on ``base``.
        base: for DyLoRA / SNELL / SPP / LoRS folders: the base model (module, folder or ``"default"``;
            default: the adapter's ``base_model_name_or_path``). SPP's and LoRS's deltas depend on it.
        dylora_rank: DyLoRA's export rank (default: its inference rank ``eval_rank``).
        registry: the registry for ``hub:`` refs (default ``$ADAPTERLAB_HUB`` or ``./hub``).

    Raises:
        ValueError / FileNotFoundError: one line naming ``where`` and what is wrong.
    """
    from adapterlab.adapters import LoraSource, resolve_adapter

    if isinstance(adapter, LoraSource):
        return _from_source(adapter)
    if hasattr(adapter, "peft_config"):
        peft_type = adapter_kind(adapter)
        if peft_type in TUNER_KINDS:
            return _from_tuner_model(adapter, peft_type, dylora_rank, {"name": where})
        return _from_source(resolve_adapter(adapter, where=where))
    if not isinstance(adapter, (str, os.PathLike)):
        raise ValueError(
            f"{where}: cannot export a {type(adapter).__name__}; pass a PEFT adapter folder, 'hub:NAME' or a peft model"
        )
    text = os.fspath(adapter)
    folder, recorded = _folder_of(text, where, registry)
    peft_type = _peft_type_of_folder(folder, where)
    from adapterlab.adapter_config import read_adapter_config

    raw, _ = read_adapter_config(folder / "adapter_config.json")
    if raw.get("modules_to_save"):
        raise ValueError(
            f"{where}: {text!r} has modules_to_save={list(raw['modules_to_save'])}: full copies of layers are not "
            f"a LoRA delta (and vLLM serves no modules_to_save); save the adapter without them to export it"
        )
    if peft_type not in TUNER_KINDS:
        src = resolve_adapter(folder, where=where, name=text[4:] if text.startswith("hub:") else None)
        if text.startswith("hub:"):
            src.ref, src.recorded_base = text, recorded
        return _from_source(src)
    from peft import PeftModel

    from adapterlab.io import check_safetensors, sha256_file

    weights = folder / "adapter_model.safetensors"
    check_safetensors(weights)  # pickle / corrupt files: one line naming the file, before peft reads it
    model = _load_base(base, raw.get("base_model_name_or_path"), where)
    try:
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{where}: {str(folder)!r} does not load onto the base: {msg}") from None
    peft_model.eval()
    source = {"name": folder.name, "path": str(folder), "sha256": sha256_file(weights), "ref": text}
    inp = _from_tuner_model(peft_model, peft_type, dylora_rank, source)
    inp.dtype = _stored_dtype(weights)  # the layers may hold an upcast copy
    inp.base_model_name_or_path = raw.get("base_model_name_or_path") or None
    return inp
