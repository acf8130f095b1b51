"""Shared-basis compression of many LoRA adapters (Compress then Serve).

n LoRAs of one base are compressed jointly, per module: one pair of bases ``U [d_out, c]``,
``V [c, d_in]`` per module and cluster, plus a tiny per-adapter core (``c × c``, or ``c`` for the
diagonal mode), so that adapter i's weight-layout delta (LoRA scale folded in) is
``U[g_i] @ core_i @ V[g_i]``. Everything runs in factor form (see :mod:`.functional`): no adapter's
dense delta is ever built, except by :meth:`SharedBasisBundle.delta` for one adapter on request.

Reference:
    Brüel-Gabrielsson et al. 2024, "Compress then Serve: Serving Thousands of LoRA Adapters with
    Little Overhead", https://arxiv.org/abs/2407.00066
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from adapterlab.adapter_config import read_bundle_config
from adapterlab.adapters import AdapterLike, LoraSource, check_compatible, resolve_adapter, resolve_adapters
from adapterlab.compression import functional as F
from adapterlab.io import check_finite, load_tensors, nonfinite_count, save_tensors
from adapterlab.lora_dir import write_lora_dir
from adapterlab.merging.functional import derive_seed
from adapterlab.progress import ProgressFactory, track
from adapterlab.staging import staged_dir

__all__ = ["MODES", "CompressionErrors", "SharedBasisBundle", "compress_adapters"]

logger = logging.getLogger(__name__)

MODES = ("full", "diagonal")
CONFIG_FILE = "compressed_config.json"
BASES_FILE = "bases.safetensors"
SIGMAS_FILE = "sigmas.safetensors"
FORMAT = 1


# ---------------------------------------------------------------------------------------------
# errors


@dataclass
class CompressionErrors:
    """Relative squared reconstruction errors ``‖ΔW − U S V‖_F² / ‖ΔW‖_F²`` (method file §2.7).

    Attributes:
        names: adapter names (rows).
        modules: module names (columns).
        values: ``[n_adapters, n_modules]`` float64.
    """

    names: list[str]
    modules: list[str]
    values: Tensor

    @property
    def mean(self) -> float:
        """Mean over adapters and modules."""
        return float(self.values.mean()) if self.values.numel() else 0.0

    def per_adapter(self) -> dict[str, float]:
        """Adapter name -> mean error over its modules."""
        return {n: float(v) for n, v in zip(self.names, self.values.mean(1))}

    def max_per_adapter(self) -> dict[str, float]:
        """Adapter name -> worst module error."""
        return {n: float(v) for n, v in zip(self.names, self.values.max(1).values)}

    def per_layer(self) -> dict[str, float]:
        """Module name -> mean error over adapters."""
        return {m: float(v) for m, v in zip(self.modules, self.values.mean(0))}

    def adapter(self, name: str) -> dict[str, float]:
        """Module name -> error of one adapter."""
        i = self.names.index(name)
        return {m: float(v) for m, v in zip(self.modules, self.values[i])}

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "per_adapter": self.per_adapter(), "per_layer": self.per_layer()}


# ---------------------------------------------------------------------------------------------
# the bundle


@dataclass
class SharedBasisBundle:
    """n adapters as shared bases + per-adapter cores.

    Attributes:
        names: adapter names, in core order.
        mode: ``"full"`` (cores ``[n, c, c]``) or ``"diagonal"`` (cores ``[n, c]``).
        rank: the shared rank c.
        module_names: base-model module paths (keys of ``LoraSource.modules``).
        shapes: module -> weight shape ``(d_out, d_in)``.
        bases: module -> ``(U [G, d_out, c], V [G, c, d_in])`` fp32.
        cores: module -> ``[n, c, c]`` or ``[n, c]`` fp32 (scales and normalisation folded in).
        group: ``[n]`` cluster of each adapter.
        norms: module -> ``[n]`` normalisation factor used while fitting (1 with ``none``).
        errors: :class:`CompressionErrors`.
    """

    names: list[str]
    mode: str
    rank: int
    module_names: list[str]
    shapes: dict[str, tuple[int, int]]
    bases: dict[str, tuple[Tensor, Tensor]] = field(repr=False)
    cores: dict[str, Tensor] = field(repr=False)
    group: Tensor = field(repr=False)
    norms: dict[str, Tensor] = field(repr=False)
    errors: CompressionErrors = field(repr=False)
    embeddings: list[str] = field(default_factory=list)
    fan_in_fan_out: bool = False
    base_model: str | None = None
    module_ranks: dict[str, int] = field(default_factory=dict)
    raw_params: list[int] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, list[list[float]]] = field(default_factory=dict, repr=False)

    # -- lookups ------------------------------------------------------------------------------

    @property
    def n_clusters(self) -> int:
        return int(next(iter(self.bases.values()))[0].shape[0]) if self.bases else 1

    @property
    def clusters(self) -> dict[int, list[str]]:
        """Cluster id -> adapter names."""
        out: dict[int, list[str]] = {g: [] for g in range(self.n_clusters)}
        for name, g in zip(self.names, self.group.tolist()):
            out[int(g)].append(name)
        return out

    def index(self, name: str) -> int:
        """Position of an adapter in the cores."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"adapter {name!r} is not in the bundle; it holds {self.names}") from None

    def _module(self, module: str) -> str:
        if module not in self.bases:
            raise KeyError(
                f"module {module!r} is not in the bundle; modules: {self.module_names[:4]}... ({len(self.module_names)})"
            )
        return module

    def factors(self, module: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(U [G, d_out, c], V [G, c, d_in], cores, group [n])``: ``ΔW_i = U[g_i] @ core_i @ V[g_i]``
        (diagonal: ``U[g_i] @ diag(core_i) @ V[g_i]``)."""
        U, V = self.bases[self._module(module)]
        return U, V, self.cores[module], self.group

    def reconstruct(self, name: str, module: str) -> tuple[Tensor, Tensor]:
        """Adapter ``name``'s factors for one module: ``(B [d_out, c], A [c, d_in])``, ``B @ A`` = its delta."""
        i = self.index(name)
        U, V, cores, group = self.factors(module)
        g = int(group[i])
        B = U[g] @ cores[i] if self.mode == "full" else U[g] * cores[i][None, :]  # [d_out, c]
        return B.contiguous(), V[g].clone()

    def delta(self, name: str, module: str) -> Tensor:
        """Dense fp32 delta of one adapter and module (shape of the base weight)."""
        B, A = self.reconstruct(name, module)
        return B @ A  # [d_out, c] @ [c, d_in] -> [d_out, d_in]

    # -- sizes --------------------------------------------------------------------------------

    def storage(self) -> dict[str, Any]:
        """Parameter counts and fp32 bytes: shared bases, per-adapter cores, the raw LoRAs they replace."""
        c, G, n = self.rank, self.n_clusters, len(self.names)
        bases = sum(G * c * (d_out + d_in) for d_out, d_in in self.shapes.values())
        per_core = c * c if self.mode == "full" else c
        cores = n * len(self.module_names) * per_core
        raw = int(sum(self.raw_params))
        total = bases + cores
        return {
            "adapters": n,
            "clusters": G,
            "rank": c,
            "mode": self.mode,
            "bases_params": bases,
            "cores_params": cores,
            "compressed_params": total,
            "raw_params": raw,
            "compressed_bytes": 4 * total,
            "raw_bytes": 4 * raw,
            "core_params_per_adapter": len(self.module_names) * per_core,
            "raw_params_per_adapter": raw / n if n else 0.0,
            "ratio": raw / total if total else math.inf,
        }

    # -- adding an adapter --------------------------------------------------------------------

    def project(
        self,
        adapter: AdapterLike,
        name: str | None = None,
        *,
        check_base: bool = True,
        allow_mixed_ranks: bool = False,
        registry: Any = None,
    ) -> None:
        """Add one adapter on the existing bases without refitting them (method file §2.4).

        Full: ``core = Uᵀ ΔW Vᵀ``; diagonal: ``(UᵀU ⊙ VVᵀ) σ = diag(Uᵀ ΔW Vᵀ)``. With clusters the
        adapter joins the cluster whose bases give the smallest error summed over modules.

        Raises:
            ValueError: duplicate name, other base / shapes / modules, other ranks (without
                ``allow_mixed_ranks``), NaN/Inf weights.
        """
        src = resolve_adapter(adapter, name=name, where="adapter", registry=registry)
        label = name or src.name
        if label in self.names:
            raise ValueError(f"adapter name {label!r} is already in the bundle; pass another name")
        if check_base and self.base_model and src.base_model and src.base_model != self.base_model:
            raise ValueError(
                f"adapter {label!r}.base_model_name_or_path is {src.base_model!r} but the bundle was fit on "
                f"{self.base_model!r}; pass check_base=False if both are the same base"
            )
        extra = sorted(set(src.modules) - set(self.module_names))
        if extra:
            raise ValueError(f"adapter {label!r} targets modules the bundle does not hold: {extra[:3]}")
        for mod, m in src.modules.items():
            if m.shape != self.shapes[mod]:
                raise ValueError(
                    f"adapter {label!r}: module {mod!r} has shape {list(m.shape)} but the bundle has "
                    f"{list(self.shapes[mod])}; the adapter was made for a different base"
                )
        if not allow_mixed_ranks:
            _check_same_ranks([src], self.module_names, self.module_ranks, first=None)
        G = self.n_clusters
        ridge = float(self.settings.get("ridge", 1e-6))
        how = str(self.settings.get("normalization", "none"))
        cand: dict[str, Tensor] = {}
        errs = torch.zeros(G, len(self.module_names), dtype=torch.float64)
        norms: dict[str, Tensor] = {}
        for j, mod in enumerate(self.module_names):
            B, A = _stack([src], mod, self.shapes[mod])
            U, V = self.bases[mod]
            per_group = []
            for g in range(G):
                core = (
                    F.project_full(U[g], V[g], B, A)
                    if self.mode == "full"
                    else F.project_diagonal(U[g], V[g], B, A, ridge)
                )
                errs[g, j] = F.relative_errors(U[g], V[g], core, B, A)[0]
                per_group.append(core)
            cand[mod] = torch.stack(per_group)  # [G, 1, c(, c)]
            norms[mod] = F.normalize_factors(B, A, how)[2]
            for what, t in (("cores", cand[mod]), ("errors", errs[:, j]), ("norms", norms[mod])):
                if nonfinite_count(t):
                    raise ValueError(_overflow(mod, B, A, [label], f"the projected {what} hold NaN or Inf"))
        g = int(errs.sum(1).argmin())
        for mod in self.module_names:
            self.cores[mod] = torch.cat([self.cores[mod], cand[mod][g]])
            self.norms[mod] = torch.cat([self.norms[mod], norms[mod]])
        self.names.append(label)
        self.group = torch.cat([self.group, torch.tensor([g], dtype=torch.long)])
        self.errors = CompressionErrors(self.names, self.module_names, torch.cat([self.errors.values, errs[g][None]]))
        self.raw_params.append(_raw_params(src, self.shapes))
        self.sources.append({**src.info(), "projected": True})

    # -- using one adapter --------------------------------------------------------------------

    @torch.no_grad()
    def apply_(self, model: nn.Module, name: str, weight: float = 1.0) -> None:
        """Add adapter ``name``'s reconstructed delta (× weight) to ``model``'s weights in place."""
        for mod in self.module_names:
            target = model.get_submodule(mod).weight
            if tuple(target.shape) != self.shapes[mod]:
                raise ValueError(
                    f"model module {mod!r} has weight shape {list(target.shape)}, the bundle {list(self.shapes[mod])}"
                )
            target.copy_((target.float() + weight * self.delta(name, mod)).to(target.dtype))

    def export(
        self, name: str, out_dir: str | os.PathLike[str], *, overwrite: bool = False, dtype: torch.dtype = torch.float32
    ) -> Path:
        """Write adapter ``name`` as a standard PEFT LoRA folder of rank c and scale 1.

        ``lora_B = U[g] core_i`` (scale and normalisation folded), ``lora_A = V[g]``; peft (and vLLM)
        load it as is, and its delta equals :meth:`delta`.
        """
        i = self.index(name)
        factors = {mod: self.reconstruct(name, mod) for mod in self.module_names}
        meta = {
            "provenance": "compressed",
            "method": "shared_basis",
            "mode": self.mode,
            "rank_c": self.rank,
            "cluster": int(self.group[i]),
            "adapter": name,
            "source": self.sources[i] if i < len(self.sources) else None,
            "error_mean": float(self.errors.values[i].mean()),
        }
        with staged_dir(out_dir, overwrite) as stage:
            write_lora_dir(
                stage,
                factors,
                embeddings=set(self.embeddings),
                fan_in_fan_out=self.fan_in_fan_out,
                base_model_name_or_path=self.base_model,
                dtype=dtype,
                metadata=meta,
            )
        return Path(out_dir)

    # -- persistence --------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "type": "shared_basis",
            "format": FORMAT,
            "mode": self.mode,
            "rank_c": self.rank,
            "n_loras": len(self.names),
            "names": list(self.names),
            "clusters": {str(g): [self.names.index(n) for n in names] for g, names in self.clusters.items()},
            "normalization": self.settings.get("normalization"),
            "per_lora_norms": f"{SIGMAS_FILE}: <module>.norm [n]",
            "module_names": list(self.module_names),
            "shapes": {m: list(s) for m, s in self.shapes.items()},
            "module_ranks": dict(self.module_ranks),
            "embeddings": list(self.embeddings),
            "fan_in_fan_out": self.fan_in_fan_out,
            "base_model_name_or_path": self.base_model,
            "raw_params": list(self.raw_params),
            "settings": dict(self.settings),
            "sources": list(self.sources),
            "errors": {"mean": self.errors.mean, "per_adapter": self.errors.per_adapter()},
            "storage": self.storage(),
            # objective (residual) at the start and end of each module's fit, per cluster
            "history": {m: [[h[0], h[-1]] if h else [] for h in hs] for m, hs in self.history.items()},
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``compressed_config.json``, ``bases.safetensors`` and ``sigmas.safetensors`` (staged, atomic)."""
        bases: dict[str, Tensor] = {}
        sig: dict[str, Tensor] = {"group": self.group.to(torch.int64), "errors": self.errors.values.to(torch.float64)}
        for mod in self.module_names:
            U, V = self.bases[mod]
            for g in range(U.shape[0]):
                bases[f"{mod}.{g}.U"] = U[g]  # [d_out, c]
                bases[f"{mod}.{g}.V"] = V[g].T  # [c, d_in] -> [d_in, c] (file layout of the method)
            sig[f"{mod}.sigma"] = self.cores[mod]
            sig[f"{mod}.norm"] = self.norms[mod]
        with staged_dir(path, overwrite) as stage:
            save_tensors(stage / BASES_FILE, bases, metadata={"format": "pt"})
            save_tensors(stage / SIGMAS_FILE, sig, metadata={"format": "pt"})
            tmp = stage / (CONFIG_FILE + ".tmp")
            tmp.write_text(json.dumps(self.config(), indent=1, default=str) + "\n", encoding="utf-8")
            os.replace(tmp, stage / CONFIG_FILE)  # config last: a folder with it is complete
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, registry: Any = None) -> SharedBasisBundle:
        """Read a bundle written by :meth:`save` (safetensors only; pickle is refused).

        ``path`` may be ``"hub:NAME"``: the bundle stored with ``AdapterRegistry.put_bundle`` (hashes
        verified) in ``registry`` or ``AdapterRegistry($ADAPTERLAB_HUB or ./hub)``.
        """
        text = os.fspath(path)
        if text.startswith("hub:"):
            if registry is None:
                from adapterlab.registry import AdapterRegistry

                registry = AdapterRegistry(os.environ.get("ADAPTERLAB_HUB") or "hub")
            path = registry.get_bundle(text[4:])
        root = Path(path).expanduser()
        cfg_path = root / CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{str(root)!r} is not a shared-basis bundle (no {CONFIG_FILE})")
        cfg = read_bundle_config(cfg_path)  # the one bundle schema: garbage values name the key path
        bases_t = load_tensors(root / BASES_FILE)  # the one validated reader: corrupt files name the file
        sig_t = load_tensors(root / SIGMAS_FILE)
        modules = list(cfg.module_names)
        names = list(cfg.names)
        c, n = int(cfg.rank_c), len(names)
        G = len(cfg.clusters)

        def need(store: dict[str, Tensor], key: str, file: str) -> Tensor:
            if key not in store:
                raise ValueError(f"{root / file}: missing tensor {key!r}")
            t = store[key]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{root / file}: tensor {key!r} holds NaN or Inf")
            return t

        bases, cores, norms = {}, {}, {}
        shapes = {m: (int(s[0]), int(s[1])) for m, s in cfg.shapes.items()}
        for mod in modules:
            U = torch.stack([need(bases_t, f"{mod}.{g}.U", BASES_FILE) for g in range(G)]).float()
            V = torch.stack([need(bases_t, f"{mod}.{g}.V", BASES_FILE).T for g in range(G)]).float()
            core = need(sig_t, f"{mod}.sigma", SIGMAS_FILE).float()
            want = (n, c, c) if cfg.mode == "full" else (n, c)
            if (
                tuple(U.shape) != (G, *shapes[mod][:1], c)
                or tuple(V.shape) != (G, c, shapes[mod][1])
                or tuple(core.shape) != want
            ):
                raise ValueError(
                    f"{root}: tensors of module {mod!r} have inconsistent shapes (truncated or edited bundle?)"
                )
            bases[mod], cores[mod] = (U.contiguous(), V.contiguous()), core
            norms[mod] = need(sig_t, f"{mod}.norm", SIGMAS_FILE).float()
        group = need(sig_t, "group", SIGMAS_FILE).long()
        if tuple(group.shape) != (n,) or (n and (int(group.min()) < 0 or int(group.max()) >= G)):
            raise ValueError(
                f"{root / SIGMAS_FILE}: tensor 'group' must hold one cluster id in [0, {G}) per adapter ({n}); "
                f"got shape {list(group.shape)} (truncated or edited bundle?)"
            )
        errors_t = need(sig_t, "errors", SIGMAS_FILE).double()
        if tuple(errors_t.shape) != (n, len(modules)):
            raise ValueError(
                f"{root / SIGMAS_FILE}: tensor 'errors' has shape {list(errors_t.shape)}, expected [{n}, {len(modules)}] "
                f"(truncated or edited bundle?)"
            )
        for mod in modules:
            if tuple(norms[mod].shape) != (n,):
                raise ValueError(
                    f"{root / SIGMAS_FILE}: tensor {mod + '.norm'!r} has shape {list(norms[mod].shape)}, expected [{n}]"
                )
        errors = CompressionErrors(names, modules, errors_t)
        return cls(
            names=names,
            mode=cfg.mode,
            rank=c,
            module_names=modules,
            shapes=shapes,
            bases=bases,
            cores=cores,
            group=group,
            norms=norms,
            errors=errors,
            embeddings=list(cfg.embeddings or []),
            fan_in_fan_out=bool(cfg.fan_in_fan_out),
            base_model=cfg.base_model_name_or_path,
            module_ranks={k: int(v) for k, v in cfg.module_ranks.items()},
            raw_params=[int(x) for x in cfg.raw_params or []],
            settings=dict(cfg.settings),
            sources=list(cfg.sources or []),
            history=dict(cfg.history),
        )


# ---------------------------------------------------------------------------------------------
# fitting


def _raw_params(src: LoraSource, shapes: Mapping[str, tuple[int, int]]) -> int:
    return int(sum(m.rank * (shapes[mod][0] + shapes[mod][1]) for mod, m in src.modules.items()))


def _stack(sources: Sequence[LoraSource], module: str, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Stacked fp32 factors of one module: ``B [n, d_out, r]``, ``A [n, r, d_in]`` (ranks zero-padded;
    an adapter without the module contributes zeros). Refuses NaN/Inf."""
    d_out, d_in = shape
    pairs = []
    for src in sources:
        if module in src.modules:
            b, a = src.factors(module)
            for what, t in (("B (LoRA scale folded in)", b), ("A", a)):  # stored tensors are checked as read
                check_finite(
                    t,
                    f"adapter {src.name!r}: module {module!r}: factor {what}",
                    " (an fp32 overflow: the adapter's values are too large); nothing was written",
                )
            pairs.append((b, a))
        else:
            pairs.append((torch.zeros(d_out, 0), torch.zeros(0, d_in)))
    r = max(1, max(b.shape[1] for b, _ in pairs))
    B = torch.zeros(len(pairs), d_out, r)
    A = torch.zeros(len(pairs), r, d_in)
    for i, (b, a) in enumerate(pairs):  # loop over adapters (copies their factors in)
        B[i, :, : b.shape[1]] = b
        A[i, : a.shape[0], :] = a
    return B, A


def _check_same_ranks(
    sources: Sequence[LoraSource], modules: Sequence[str], ranks: Mapping[str, int], first: str | None
) -> None:
    """Every adapter targets every module with the recorded rank, else one clear error."""
    for _i, src in enumerate(sources):
        missing = [m for m in modules if m not in src.modules]
        if missing:
            raise ValueError(
                f"adapter {src.name!r} does not target module {missing[0]!r} ({len(missing)} missing); "
                f"adapters with different target modules need allow_mixed_ranks=True (missing modules count as zero)"
            )
        for mod, m in src.modules.items():
            if mod in ranks and m.rank != ranks[mod]:
                ref = f"adapter {first!r}" if first else "the bundle"
                raise ValueError(
                    f"adapter {src.name!r}: module {mod!r} has rank {m.rank} but {ref} has rank {ranks[mod]}; "
                    f"pass allow_mixed_ranks=True (--allow-mixed-ranks) to compress adapters of different ranks"
                )


@dataclass
class _ModuleFit:
    U: Tensor  # [G, d_out, c]
    V: Tensor  # [G, c, d_in]
    cores: Tensor  # [n, c, c] | [n, c]
    norms: Tensor  # [n]
    errors: Tensor  # [n]
    history: list[list[float]]


def _fit_module(
    B: Tensor,
    A: Tensor,
    group: Tensor,
    G: int,
    *,
    module: str,
    names: Sequence[str] | None = None,
    **kw: Any,
) -> tuple[_ModuleFit, Tensor | None]:
    """Fit one module's bases and cores; a fit that leaves fp32's range (extreme factor values) is one line
    naming the module and the adapter with the largest values."""
    try:
        fit, cost = _fit_module_raw(B, A, group, G, module=module, **kw)  # the options of _fit_module_raw
    except torch.linalg.LinAlgError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(_overflow(module, B, A, names, f"the fit failed ({reason})")) from None
    for what, t in (("U", fit.U), ("V", fit.V), ("cores", fit.cores), ("norms", fit.norms), ("errors", fit.errors)):
        if nonfinite_count(t):
            raise ValueError(_overflow(module, B, A, names, f"the fitted {what} hold NaN or Inf"))
    if cost is not None and nonfinite_count(cost):
        raise ValueError(_overflow(module, B, A, names, "the cluster costs hold NaN or Inf"))
    return fit, cost


def _overflow(module: str, B: Tensor, A: Tensor, names: Sequence[str] | None, what: str) -> str:
    """One line for a fit that left fp32's range, naming the module and the adapter with the largest factors."""
    if not B.numel() or not A.numel():
        return f"module {module!r}: {what}; nothing was written"
    peak = B.abs().flatten(1).amax(1) * A.abs().flatten(1).amax(1)  # [n] bound of each adapter's |delta| / r
    i = int(peak.argmax())
    who = f"adapter {names[i]!r}" if names is not None and i < len(names) else f"adapter #{i}"
    return (
        f"module {module!r}: {what}: the adapters' factors are too large for an fp32 fit ({who} has |B| up to "
        f"{float(B[i].abs().max()):.3g} and |A| up to {float(A[i].abs().max()):.3g}); rescale or leave it out; "
        f"nothing was written"
    )


def _fit_module_raw(
    B: Tensor,
    A: Tensor,
    group: Tensor,
    G: int,
    *,
    mode: str,
    c: int,
    niter: int,
    init: str,
    solver: str,
    normalization: str,
    ridge: float,
    seed: int,
    module: str,
    device: torch.device,
    want_cost: bool,
) -> tuple[_ModuleFit, Tensor | None]:
    n, d_out, _ = B.shape
    Bd, Ad = B.to(device), A.to(device)
    Us, Vs, hist = [], [], []
    per_core = (c, c) if mode == "full" else (c,)
    cores = torch.zeros(n, *per_core, device=device)
    norms = torch.ones(n, device=device)
    errors = torch.zeros(n, dtype=torch.float64)
    cost = torch.zeros(n, G, dtype=torch.float64) if want_cost else None
    for g in range(G):  # loop over clusters
        idx = (group == g).nonzero().flatten().to(device)
        Bg, Ag = Bd[idx], Ad[idx]
        Bn, An, scale = F.normalize_factors(Bg, Ag, normalization)
        gen = torch.Generator().manual_seed(derive_seed(seed, module, g))
        if mode == "full":
            U, V, h = F.fit_full(Bn, An, c, niter=niter, init=init, solver=solver, generator=gen)
            core = F.project_full(U, V, Bg, Ag)  # raw factors: scales and norms folded in
        else:
            U, V, sigma, h = F.fit_diagonal(Bn, An, c, niter=niter, init=init, ridge=ridge, generator=gen)
            core = sigma * scale[:, None]  # undo the normalisation: [n_g, c]
        cores[idx], norms[idx] = core, scale
        errors[idx.cpu()] = F.relative_errors(U, V, core, Bg, Ag).cpu()
        Us.append(U)
        Vs.append(V)
        hist.append([float(x) for x in h])
        if cost is not None:
            allc = F.project_full(U, V, Bd, Ad) if mode == "full" else F.project_diagonal(U, V, Bd, Ad, ridge)
            cost[:, g] = F.relative_errors(U, V, allc, Bd, Ad).cpu()
    fit = _ModuleFit(torch.stack(Us).cpu(), torch.stack(Vs).cpu(), cores.cpu(), norms.cpu(), errors, hist)
    return fit, cost


def _enforce_min_size(labels: Tensor, cost: Tensor, G: int, min_size: int) -> Tensor:
    """Move adapters into clusters smaller than ``min_size`` (those that fit them best, from clusters
    that can spare one)."""
    labels = labels.clone()
    for _ in range(labels.numel() * G):  # bounded; each pass moves one adapter
        sizes = torch.bincount(labels, minlength=G)
        small = (sizes < min_size).nonzero().flatten()
        if small.numel() == 0:
            break
        g = int(small[0])
        donors = sizes[labels] > min_size  # [n] adapters whose cluster can give one away
        if not bool(donors.any()):
            break
        extra = cost[:, g] - cost.gather(1, labels[:, None]).squeeze(1)  # error increase of moving
        extra[~donors] = math.inf
        labels[int(extra.argmin())] = g
    return labels


def _sketch_labels(
    sources: Sequence[LoraSource],
    modules: Sequence[str],
    shapes: Mapping[str, tuple[int, int]],
    k: int,
    seed: int,
    progress: ProgressFactory | None,
) -> Tensor:
    """Initial clusters: spherical k-means on random sketches of ``ΔWΔWᵀ`` and ``ΔWᵀΔW`` (column / row
    space overlap), all modules concatenated; factor form."""
    feats = []
    for mod in track(modules, "compress: cluster init", progress=progress):
        B, A = _stack(sources, mod, shapes[mod])
        gen = torch.Generator().manual_seed(derive_seed(seed, "sketch", mod))
        d_out, d_in = shapes[mod]
        s = 8
        so = torch.randn(d_out, s, generator=gen)
        si = torch.randn(d_in, s, generator=gen)
        aat = A @ A.transpose(1, 2)  # [n, r, r]
        btb = B.transpose(1, 2) @ B  # [n, r, r]
        pb = so.T @ B  # [n, s, r]
        pa = A @ si  # [n, r, s]
        left = (pb @ aat @ pb.transpose(1, 2)).flatten(1)  # sketch of ΔWΔWᵀ: [n, s*s]
        right = (pa.transpose(1, 2) @ btb @ pa).flatten(1)  # sketch of ΔWᵀΔW: [n, s*s]
        for f in (left, right):
            feats.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-30))
    x = torch.cat(feats, 1)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return F.kmeans_cosine(x.double(), k, generator=torch.Generator().manual_seed(derive_seed(seed, "kmeans")))


def _check_int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {value!r}")
    return int(value)


def compress_adapters(
    adapters: Sequence[AdapterLike] | Mapping[str, AdapterLike],
    *,
    rank: int,
    mode: str = "full",
    clusters: int | None = None,
    niter: int | None = None,
    init: str = "spectral",
    solver: str = "auto",
    normalization: str = "normalize_BA",
    seed: int = 0,
    ridge: float = 1e-6,
    max_rounds: int = 10,
    min_cluster_size: int = 1,
    allow_mixed_ranks: bool = False,
    check_base: bool = True,
    registry: Any = None,
    device: str | torch.device | None = None,
    progress: ProgressFactory | None = None,
) -> SharedBasisBundle:
    """Jointly compress n LoRA adapters of one base into per-module shared bases and per-adapter cores.

    Args:
        adapters: PEFT LoRA folders, ``"hub:NAME"`` refs, peft models or :class:`LoraSource` (a list,
            or a name -> adapter dict); anything :func:`adapterlab.merging.resolve_adapter` accepts.
        rank: shared rank c (``1 <= c <= min(d_out, d_in)`` of every module); ``c = n·r`` is exact.
        mode: ``"full"`` (orthonormal bases, ``c × c`` cores) or ``"diagonal"`` (``c`` numbers per
            adapter and module; alternating least squares).
        clusters: None / 1 = one basis per module; K > 1 = K bases per module, adapters assigned by
            alternating fit / reassignment to the basis with the least error (method file §2.5).
        niter: iterations (default 10 for full, 100 for diagonal).
        init: ``spectral`` (default), ``random`` (the reference's), or ``block`` (diagonal only).
        solver: full-mode subspace steps: ``eigh`` (exact, ``O(d² n r)``), ``ritz`` (block
            Rayleigh–Ritz, ``O(d n r c)``, for many adapters) or ``auto`` (eigh when ``d <= 8c``).
        normalization: ``normalize_BA`` (default: every delta weighs the same in the fit), ``normalize``
            or ``none``; cores are always de-normalised (they reproduce the raw deltas).
        seed: seeds random inits and clustering (stored in the bundle).
        ridge: relative ridge added to the c×c systems of the diagonal mode.
        max_rounds / min_cluster_size: clustering rounds and the smallest allowed cluster.
        allow_mixed_ranks: accept adapters of different ranks or target modules (missing = zero).
        check_base: refuse adapters whose ``base_model_name_or_path`` differ (shapes are always checked).
        device: where the fit runs (default CPU); results are stored on CPU.

    Returns:
        A :class:`SharedBasisBundle` with per-adapter / per-module relative errors.

    Raises:
        ValueError: bad settings (naming the argument and allowed values), different bases / shapes,
            different ranks without ``allow_mixed_ranks``, NaN/Inf weights.

    Reference:
        https://arxiv.org/abs/2407.00066
    """
    t0 = time.perf_counter()
    c = _check_int("rank", rank, 1)
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: choose one of {', '.join(MODES)}")
    if init not in F.INITS:
        raise ValueError(f"init={init!r}: choose one of {', '.join(F.INITS)}")
    if init == "block" and mode != "diagonal":
        raise ValueError("init='block' is for mode='diagonal' only; use 'spectral' or 'random' with mode='full'")
    if solver not in F.SOLVERS:
        raise ValueError(f"solver={solver!r}: choose one of {', '.join(F.SOLVERS)}")
    if normalization not in F.NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r}: choose one of {', '.join(F.NORMALIZATIONS)}")
    niter = _check_int("niter", 10 if mode == "full" else 100, 0) if niter is None else _check_int("niter", niter, 0)
    if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    _check_int("max_rounds", max_rounds, 1)
    _check_int("min_cluster_size", min_cluster_size, 1)
    sources = resolve_adapters(adapters, registry=registry)
    n = len(sources)
    G = 1 if clusters is None else _check_int("clusters", clusters, 1)
    if G > n or G * min_cluster_size > n:
        raise ValueError(
            f"clusters={G} with min_cluster_size={min_cluster_size} needs at least {G * min_cluster_size} adapters, got {n}"
        )
    shapes = check_compatible(sources, check_base=check_base)
    modules = list(shapes)
    ranks = {mod: m.rank for mod, m in sources[0].modules.items()}
    if not allow_mixed_ranks:
        _check_same_ranks(sources[1:], list(sources[0].modules), ranks, first=sources[0].name)
        extra = [m for m in modules if m not in sources[0].modules]
        if extra:
            raise ValueError(
                f"adapter {sources[0].name!r} does not target module {extra[0]!r} that others target; "
                f"pass allow_mixed_ranks=True (missing modules count as zero)"
            )
    else:
        ranks = {mod: max((s.modules[mod].rank for s in sources if mod in s.modules), default=0) for mod in modules}
    for mod, (d_out, d_in) in shapes.items():
        if c > min(d_out, d_in):
            raise ValueError(
                f"rank={c} exceeds min(d_out, d_in) = {min(d_out, d_in)} of module {mod!r}; choose rank <= {min(d_out, d_in)}"
            )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    embeddings = sorted({mod for s in sources for mod, m in s.modules.items() if m.embedding})
    fan = any(bool(s.config.get("fan_in_fan_out", False)) for s in sources)
    kw = dict(
        mode=mode,
        c=c,
        niter=niter,
        init=init,
        solver=solver,
        normalization=normalization,
        ridge=float(ridge),
        seed=seed,
        device=dev,
    )

    names = [s.name for s in sources]

    def run_pass(labels: Tensor, want_cost: bool, what: str) -> tuple[dict[str, _ModuleFit], Tensor | None]:
        fits: dict[str, _ModuleFit] = {}
        total = torch.zeros(n, G, dtype=torch.float64) if want_cost else None
        for mod in track(modules, what, progress=progress):
            B, A = _stack(sources, mod, shapes[mod])
            fit, cost = _fit_module(B, A, labels, G, module=mod, want_cost=want_cost, names=names, **kw)
            fits[mod] = fit
            if total is not None and cost is not None:
                total += cost
        return fits, total

    rounds = 0
    if G == 1:
        labels = torch.zeros(n, dtype=torch.long)
        fits, _ = run_pass(labels, False, "compress: fit")
    else:
        labels = _enforce_min_size(
            _sketch_labels(sources, modules, shapes, G, seed, progress),
            torch.zeros(n, G, dtype=torch.float64),
            G,
            min_cluster_size,
        )
        converged = False
        for rounds in range(1, max_rounds + 1):
            fits, cost = run_pass(labels, True, f"compress: clustering round {rounds}")
            assert cost is not None
            new = _enforce_min_size(cost.argmin(1), cost, G, min_cluster_size)
            if torch.equal(new, labels):
                converged = True
                break
            labels = new
        if not converged:
            fits, _ = run_pass(labels, False, "compress: final fit")
        logger.info(
            "clustering: %d rounds, converged=%s, sizes %s",
            rounds,
            converged,
            torch.bincount(labels, minlength=G).tolist(),
        )
    names = [s.name for s in sources]
    errors = CompressionErrors(names, modules, torch.stack([fits[m].errors for m in modules], 1))
    settings = {
        "niter": niter,
        "init": init,
        "solver": solver,
        "normalization": normalization,
        "seed": seed,
        "ridge": float(ridge),
        "clusters": G,
        "clustering_rounds": rounds,
        "min_cluster_size": min_cluster_size,
        "allow_mixed_ranks": allow_mixed_ranks,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    bundle = SharedBasisBundle(
        names=names,
        mode=mode,
        rank=c,
        module_names=modules,
        shapes=dict(shapes),
        bases={m: (fits[m].U, fits[m].V) for m in modules},
        cores={m: fits[m].cores for m in modules},
        group=labels.clone(),
        norms={m: fits[m].norms for m in modules},
        errors=errors,
        embeddings=embeddings,
        fan_in_fan_out=fan,
        base_model=sources[0].base_model,
        module_ranks=ranks,
        raw_params=[_raw_params(s, shapes) for s in sources],
        settings=settings,
        sources=[s.info() for s in sources],
        history={m: fits[m].history for m in modules},
    )
    logger.info(
        "compressed %d adapters x %d modules to rank %d (%s): mean error %.4g, %.1fx smaller, %.1f s",
        n,
        len(modules),
        c,
        mode,
        errors.mean,
        bundle.storage()["ratio"],
        settings["seconds"],
    )
    return bundle
