"""PHLoRA: data-free extraction of a LoRA adapter from a base and a fully fine-tuned checkpoint.

For every target linear layer ``ΔW = fp32(W_tuned) − fp32(W_base)`` is factorised by a truncated
SVD (exact, or randomized for a fixed rank), the rank fixed or chosen per module as the smallest
k with retained energy ``E(k) ≥ energy`` (clipped to ``[min_rank, max_rank]``; written as
``rank_pattern`` / ``alpha_pattern`` with ``alpha = k`` so the scale is 1), and the factors split
``B = U_k S_k^{1/2}``, ``A = S_k^{1/2} V_kᵀ``. ``energy_scope="global"`` instead spends ranks where
they buy the most energy per parameter until ``energy`` of the whole model's delta energy is kept
(not PHLoRA's rule; an adapterlab option). Every other parameter (embeddings, LM head, norms,
biases) is compared with ``δ = ‖P_ft − P_base‖_F / ‖P_base‖_F``: changed modules (δ > threshold) are
stored densely as ``modules_to_save`` (or skipped with ``extras="skip"``), unchanged ones dropped,
and all of it is reported. Weights are streamed tensor by tensor from safetensors folders; two full
models are never materialised.

Reference:
    Vasani et al. 2025, "PHLoRA: data-free Post-hoc Low-Rank Adapter extraction from full-rank
    checkpoints", https://arxiv.org/abs/2509.10971
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterlab.extraction.functional import global_energy_ranks, low_rank_factors, singular_values
from adapterlab.io import check_finite
from adapterlab.progress import ProgressFactory, track

logger = logging.getLogger(__name__)

__all__ = ["EXTRAS", "ExtractResult", "ModuleExtraction", "extract_lora"]

#: What to do with changed non-linear parameters (embeddings, LM head, norms).
EXTRAS = ("save", "skip")
SPECTRUM_HEAD = 16


@dataclass
class ModuleExtraction:
    """One row of the extraction report.

    ``stored_as`` is ``lora``, ``modules_to_save``, ``skipped`` or ``unchanged``.
    """

    name: str
    shape: tuple[int, ...]
    stored_as: str
    rank: int | None = None
    energy: float | None = None
    delta_norm: float = 0.0
    delta_rel: float = 0.0
    spectrum_head: list[float] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# weight access: an in-memory model or a safetensors folder, read tensor by tensor


class _Weights:
    """Name -> tensor access without loading a whole folder, plus the module structure (skeleton)."""

    def __init__(self, model: nn.Module | str | os.PathLike[str], where: str) -> None:
        self.where = where
        self.path: Path | None = None
        self.files: list[Path] = []
        if isinstance(model, nn.Module):
            inner = model.get_base_model() if hasattr(model, "get_base_model") else model
            self.skeleton = inner
            self._state = {k: v.detach() for k, v in inner.state_dict().items()}
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}
            self.dtype = next((v.dtype for v in self._state.values() if v.is_floating_point()), torch.float32)
            self.name_or_path = getattr(getattr(inner, "config", None), "_name_or_path", None) or None
            return
        from transformers import AutoConfig, AutoModelForCausalLM

        from adapterlab.io import open_tensors, read_json
        from adapterlab.models import resolve_model_path

        path = resolve_model_path(model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{where}: {str(model)!r} is not a model folder (no config.json)")
        self.path, self.name_or_path = path, str(model)
        index = path / "model.safetensors.index.json"
        try:
            if index.is_file():
                raw = read_json(index)
                weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise ValueError(f"{index}: key 'weight_map' must be an object of tensor name -> shard file")
                self.files = sorted({path / f for f in weight_map.values()})
            else:
                self.files = sorted(path.glob("*.safetensors"))
            if not self.files:
                pickles = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
                hint = f" (it holds {pickles[0]!r}: pickle is not read)" if pickles else ""
                raise FileNotFoundError(f"no .safetensors weights in {str(path)!r}{hint}")
            # the project's one validated reader: a corrupt shard is one line naming the file
            self._handles = [open_tensors(f) for f in self.files]
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{where}: {exc}") from None
        self._owner: dict[str, Any] = {}
        self.shapes = {}
        for h in self._handles:
            for k in h.keys():
                self._owner[k] = h
                self.shapes[k] = h.shape(k)
        if not self._owner:
            raise ValueError(f"{where}: the model folder {str(path)!r} holds no tensors")
        first = next(iter(self._owner))
        self.dtype = self._owner[first].dtype(first) or torch.float32
        try:
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            with torch.device("meta"):
                self.skeleton = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(
                f"{where}: {str(path / 'config.json')!r} is not a config transformers can build a causal LM from "
                f"({reason})"
            ) from None
        self._state = None

    def get(self, key: str) -> Tensor:
        """One tensor, refused when it holds NaN or Inf (one line naming the model and the tensor)."""
        if self._state is not None:
            t = self._state[key]
        else:
            try:
                t = self._owner[key].get(key)
            except ValueError as exc:
                raise ValueError(f"{self.where}: {exc}") from None
        return check_finite(t, f"{_who(self)}: tensor {key!r}", "; nothing was extracted or written")

    def hashes(self) -> dict[str, str] | None:
        if not self.files:
            return None
        from adapterlab.io import sha256_file

        return {f.name: sha256_file(f) for f in self.files}


def _tied_lm_head(w: _Weights) -> str | None:
    """The LM head key when it is tied to the input embedding (stored once)."""
    cfg = getattr(w.skeleton, "config", None)
    out = w.skeleton.get_output_embeddings() if hasattr(w.skeleton, "get_output_embeddings") else None
    if out is None or not getattr(cfg, "tie_word_embeddings", False):
        return None
    name = next((n for n, m in w.skeleton.named_modules() if m is out), None)
    return f"{name}.weight" if name else None


def _linear_targets(skeleton: nn.Module, targets: Sequence[str] | str | None) -> list[str]:
    out_emb = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    names = []
    for name, m in skeleton.named_modules():
        if not isinstance(m, nn.Linear) or m is out_emb:
            continue
        if targets is None:
            names.append(name)
        elif isinstance(targets, str):
            if re.fullmatch(targets, name):
                names.append(name)
        elif any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------
# result


@dataclass
class ExtractResult:
    """An extracted LoRA adapter and its report.

    Attributes:
        factors: module -> ``(B [d_out, k], A [k, d_in])`` fp32, scale 1.
        extras: module -> {param name: tensor} stored as ``modules_to_save``.
        modules: the per-module report (:class:`ModuleExtraction`), LoRA targets first.
        global_energy: ``Σ_l Σ_{i≤k_l} σ² / Σ_l ‖ΔW_l‖²`` over the LoRA targets.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    extras: dict[str, dict[str, Tensor]]
    modules: list[ModuleExtraction]
    settings: dict[str, Any]
    global_energy: float
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32
    tied: bool = False
    sources: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(a.shape[0]) for n, (_, a) in self.factors.items()}

    def n_params(self) -> int:
        lora = sum(b.numel() + a.numel() for b, a in self.factors.values())
        return lora + sum(t.numel() for p in self.extras.values() for t in p.values())

    def delta(self, name: str) -> Tensor:
        B, A = self.factors[name]
        return B @ A  # [d_out, k] @ [k, d_in]

    def apply_(self, model: nn.Module) -> None:
        """Add the LoRA deltas into ``model`` and copy the stored extras (in place)."""
        with torch.no_grad():
            for name in self.factors:
                w = model.get_submodule(name).weight
                w.copy_((w.float() + self.delta(name)).to(w.dtype))
            for mod, params in self.extras.items():
                m = model.get_submodule(mod)
                for pname, t in params.items():
                    getattr(m, pname).copy_(t)

    def report(self) -> dict[str, Any]:
        return {
            "method": "phlora",
            "settings": self.settings,
            "global_energy": self.global_energy,
            "n_params": self.n_params(),
            "ranks": self.ranks,
            "modules_to_save": sorted(self.extras),
            "skipped": [m.name for m in self.modules if m.stored_as == "skipped"],
            "sources": self.sources,
            "seconds": self.seconds,
            "modules": [m.to_dict() for m in self.modules],
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write a PEFT LoRA folder (``rank_pattern``/``alpha_pattern`` per module, dense
        ``modules_to_save``) plus ``phlora_report.json``; staged, nothing partial on error."""
        from adapterlab.lora_dir import write_lora_dir
        from adapterlab.staging import staged_dir

        with staged_dir(path, overwrite) as stage:
            write_lora_dir(
                stage,
                self.factors,
                base_model_name_or_path=self.base_model_name_or_path,
                dtype=self.dtype,
                modules_to_save=self.extras,
                ensure_weight_tying=self.tied and any(n.endswith("embed_tokens") for n in self.extras),
                metadata={"method": "phlora", "settings": self.settings, "sources": self.sources},
            )
            text = json.dumps(self.report(), indent=2, default=str) + "\n"
            (stage / "phlora_report.json").write_text(text, encoding="utf-8")
        return Path(path)


# ------------------------------------------------------------------------------------------------
# extract_lora


def _check_settings(rank: Any, energy: Any, min_rank: int, max_rank: int | None, randomized: bool, extras: str) -> None:
    if (rank is None) == (energy is None):
        raise ValueError("rank/energy: give exactly one of rank (fixed k) and energy (retained-energy threshold)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and (
        isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0
    ):
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    if randomized and rank is None:
        raise ValueError("randomized: the randomized SVD needs a fixed rank (the energy rule needs the whole spectrum)")
    if min_rank < 1 or (max_rank is not None and max_rank < min_rank):
        raise ValueError(f"min_rank/max_rank: need 1 <= min_rank <= max_rank, got {min_rank}, {max_rank}")
    if extras not in EXTRAS:
        raise ValueError(f"extras is {extras!r}; choose one of: {', '.join(EXTRAS)}")


def _delta(wb: _Weights, wt: _Weights, key: str) -> Tensor:
    """``fp32(W_tuned) − fp32(W_base)`` ``[d_out, d_in]``; refused when the difference overflows fp32."""
    delta = wt.get(key).to(torch.float32) - wb.get(key).to(torch.float32)
    return check_finite(
        delta,
        f"{_who(wt)}: tensor {key!r}: tuned − base",
        " (an fp32 overflow: the weights are too large to subtract); nothing was extracted or written",
    )


def _who(w: _Weights) -> str:
    """``tuned 'path'`` (or ``tuned`` for an in-memory model) for messages."""
    return f"{w.where} {w.name_or_path!r}" if w.name_or_path else w.where


def _svd_guard(who: str, key: str, fn: Callable[[], Any]) -> Any:
    """Run one factorisation; a LAPACK failure (ill-conditioned, extreme values) is one line naming the tensor."""
    try:
        return fn()
    except torch.linalg.LinAlgError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"{who}: tensor {key!r}: the SVD of tuned − base failed ({reason}); its values are too extreme to "
            f"factorise in fp32; nothing was extracted or written"
        ) from None


def _groups(keys: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    by_mod: dict[str, list[str]] = {}
    for k in keys:
        mod, _, _ = k.rpartition(".")
        by_mod.setdefault(mod, []).append(k)
    yield from sorted(by_mod.items())


def extract_lora(
    base: nn.Module | str | os.PathLike[str],
    tuned: nn.Module | str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    energy_scope: str = "module",
    randomized: bool = False,
    solver: str = "svd",
    min_rank: int = 1,
    max_rank: int | None = None,
    target_modules: Sequence[str] | str | None = None,
    extras: str = "save",
    threshold: float = 1e-4,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    progress: ProgressFactory | None = None,
) -> ExtractResult:
    """PHLoRA: extract a LoRA adapter from a base and a fully fine-tuned model of the same architecture.

    Args:
        base / tuned: models, or model folders (safetensors; ``"default"`` = the embedded model).
        rank: fixed k for every module (clipped to ``min(d_out, d_in)``), or
        energy: per-module rank = smallest k with ``E(k) ≥ energy``, clipped to ``[min_rank, max_rank]``.
        energy_scope: ``"module"`` (the rule above, PHLoRA's) or ``"global"``: ranks that keep ``energy``
            of the energy summed over all modules at the fewest parameters (singular values taken
            greedily by ``σ² / (d_out + d_in)``, see
            :func:`~adapterlab.extraction.functional.global_energy_ranks`; one extra spectrum pass).
        randomized: ``torch.svd_lowrank`` (q = k + 16, 4 power iterations); needs ``rank``.
        solver: ``"svd"`` (LAPACK, exact) or ``"gram"`` (``eigh`` of the smaller Gram matrix: the same
            truncation, about 3x faster on CPU; singular values below ~1e-3 of the largest lose relative
            precision, see :func:`adapterlab.extraction.functional.low_rank_factors`).
        target_modules: linear layers to factorise — names / suffixes, or one regex; default every
            ``nn.Linear`` except the LM head.
        extras: ``"save"`` changed non-target modules densely as ``modules_to_save``, or ``"skip"`` them
            (reported either way).
        threshold: relative change δ above which a non-target parameter counts as changed.
        dtype: dtype of the saved tensors (default: the tuned model's).
        seed: seed of the randomized SVD.

    Returns:
        :class:`ExtractResult`; ``.save(dir)`` writes a PEFT LoRA folder.

    Raises:
        ValueError: bad settings, or tuned and base differ in parameter names or shapes (the message
            names the tensor).
    """
    _check_settings(rank, energy, min_rank, max_rank, randomized, extras)
    if solver not in ("svd", "gram"):
        raise ValueError(f"solver must be 'svd' or 'gram', got {solver!r}")
    if energy_scope not in ("module", "global"):
        raise ValueError(f"energy_scope must be 'module' or 'global', got {energy_scope!r}")
    if energy_scope == "global" and energy is None:
        raise ValueError("energy_scope='global' chooses ranks by energy: give energy=, not rank=")
    t_start = time.perf_counter()
    wb, wt = _Weights(base, "base"), _Weights(tuned, "tuned")
    tied_key = _tied_lm_head(wt)
    keys = [k for k in wb.shapes if k != tied_key]
    extra_t = sorted(set(wt.shapes) - set(wb.shapes) - {tied_key})
    missing = sorted(set(keys) - set(wt.shapes))
    if missing or extra_t:
        what = f"lacks {missing[:3]}" if missing else f"has tensors the base lacks: {extra_t[:3]}"
        raise ValueError(f"tuned: the tuned model {what}; it must have the base's architecture")
    for k in keys:
        if wb.shapes[k] != wt.shapes[k]:
            raise ValueError(
                f"tuned: tensor {k!r} has shape {list(wt.shapes[k])} but the base has {list(wb.shapes[k])} "
                f"(resized vocabularies and other shape changes are not supported)"
            )
    targets = _linear_targets(wb.skeleton, target_modules)
    target_keys = {f"{t}.weight" for t in targets if f"{t}.weight" in wb.shapes}
    if not target_keys:
        raise ValueError(f"target_modules: no linear layer of the base matches {target_modules!r}")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    rows: list[ModuleExtraction] = []
    kept = total = 0.0
    global_ranks: dict[str, int] | None = None
    if energy_scope == "global":
        spectra: dict[str, Tensor] = {}
        totals: dict[str, float] = {}
        for key in track(sorted(target_keys), "phlora: spectra (global energy)", progress=progress):
            delta = _delta(wb, wt, key)  # [d_out, d_in]
            totals[key] = float(delta.double().square().sum())
            if totals[key] > 0.0:
                spectra[key] = _svd_guard(_who(wt), key, lambda d=delta: singular_values(d, solver))
        global_ranks = global_energy_ranks(
            spectra,
            {k: sum(wb.shapes[k]) for k in spectra},
            float(energy),
            totals=totals,
            min_rank=min_rank,
            max_rank=max_rank,
        )
    for key in track(sorted(target_keys), "phlora: SVD per layer", progress=progress):
        t0 = time.perf_counter()
        name = key[: -len(".weight")]
        wbase = wb.get(key).to(torch.float32)
        delta = _delta(wb, wt, key)  # [d_out, d_in], fp32 before subtracting
        dn = float(delta.norm())
        rel = dn / max(float(wbase.norm()), 1e-30)
        if dn == 0.0:
            rows.append(ModuleExtraction(name, tuple(delta.shape), "unchanged", seconds=time.perf_counter() - t0))
            continue
        if global_ranks is not None:
            lr = _svd_guard(
                _who(wt), key, lambda d=delta, k=global_ranks[key]: low_rank_factors(d, rank=k, solver=solver)
            )
        else:
            lr = _svd_guard(
                _who(wt),
                key,
                lambda d=delta: low_rank_factors(
                    d,
                    rank=rank,
                    energy=energy,
                    min_rank=min_rank,
                    max_rank=max_rank,
                    randomized=randomized,
                    seed=seed,
                    solver=solver,
                ),
            )
        for part, t in (("B", lr.B), ("A", lr.A)):  # σ can overflow fp32 even when every entry is finite
            check_finite(
                t,
                f"{_who(wt)}: tensor {key!r}: the extracted factor {part}",
                " (its singular values overflow fp32: the delta is too large); nothing was extracted or written",
            )
        factors[name] = (lr.B, lr.A)
        kept += lr.energy * lr.total_energy
        total += lr.total_energy
        rows.append(
            ModuleExtraction(
                name,
                tuple(delta.shape),
                "lora",
                rank=lr.rank,
                energy=lr.energy,
                delta_norm=dn,
                delta_rel=rel,
                spectrum_head=[float(s) for s in lr.spectrum[: max(2 * lr.rank, SPECTRUM_HEAD)]],
                seconds=time.perf_counter() - t0,
            )
        )
    extras_out: dict[str, dict[str, Tensor]] = {}
    target_mods = {k[: -len(".weight")] for k in target_keys}
    for mod, params in _groups([k for k in keys if k not in target_keys]):
        t0 = time.perf_counter()
        changed, worst, worst_norm = [], 0.0, 0.0
        for k in params:
            pb, pt = wb.get(k).to(torch.float32), wt.get(k).to(torch.float32)
            dn = float((pt - pb).norm())
            rel = dn / float(pb.norm()) if float(pb.norm()) > 0 else dn
            if rel > threshold:
                changed.append(k)
            if rel >= worst:
                worst, worst_norm = rel, dn
        shape = wb.shapes[params[0]]
        if not changed:
            rows.append(
                ModuleExtraction(
                    mod, shape, "unchanged", delta_norm=worst_norm, delta_rel=worst, seconds=time.perf_counter() - t0
                )
            )
            continue
        note = ""
        stored = "modules_to_save" if extras == "save" else "skipped"
        if mod in target_mods:
            stored, note = "skipped", "bias of a LoRA target changed; LoRA cannot carry it"
            warnings.warn(f"phlora: {mod}: {note} (dropped)", UserWarning, stacklevel=2)
        if stored == "modules_to_save":
            extras_out[mod] = {k.rpartition(".")[2]: wt.get(k).clone() for k in params}
        rows.append(
            ModuleExtraction(
                mod, shape, stored, delta_norm=worst_norm, delta_rel=worst, note=note, seconds=time.perf_counter() - t0
            )
        )
    if tied_key is not None:  # tied LM head: stored under both names so that peft keeps them equal on load
        emb = wt.skeleton.get_input_embeddings()
        emb_name = next((n for n, m in wt.skeleton.named_modules() if m is emb), None)
        if emb_name in extras_out:
            extras_out[tied_key.rpartition(".")[0]] = {"weight": extras_out[emb_name]["weight"]}
    if not factors and not extras_out:
        raise ValueError("tuned: the tuned model equals the base; there is nothing to extract")
    skipped = [r.name for r in rows if r.stored_as == "skipped"]
    if skipped:
        logger.info("phlora: changed but not stored: %s", ", ".join(skipped))
    settings = {
        "rank": rank,
        "energy": energy,
        "energy_scope": energy_scope,
        "randomized": randomized,
        "min_rank": min_rank,
        "max_rank": max_rank,
        "extras": extras,
        "threshold": threshold,
        "seed": seed,
        "split": "sqrt(S) both sides",
    }
    sources = {
        "base": {"path": wb.name_or_path, "sha256": wb.hashes()},
        "tuned": {"path": wt.name_or_path, "sha256": wt.hashes()},
    }
    return ExtractResult(
        factors=factors,
        extras=extras_out,
        modules=rows,
        settings=settings,
        global_energy=kept / total if total > 0 else 1.0,
        base_model_name_or_path=wb.name_or_path,
        dtype=dtype or wt.dtype,
        tied=tied_key is not None,
        sources=sources,
        seconds=time.perf_counter() - t_start,
    )
