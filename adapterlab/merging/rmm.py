"""RMM — Reversible Model Merging for low-rank weights: a K-model basis plus per-task coefficients.

Per module and factor type F ∈ {B, A}, the n tasks' factors (scale folded into B, optionally put in
the canonical gauge ``B = U Σ^{1/2}, A = Σ^{1/2} Vᵀ`` first, ranks zero-padded to the largest) are
stacked into ``D ∈ R^{n×P}`` and replaced by the closed-form Eckart–Young solution
``D ≈ Cᵀ U`` with a basis ``U ∈ R^{K×P}`` and orthonormal coefficient rows ``C ∈ R^{K×n}``
(``coeff_scope="layer"``), or the same problem solved per position — per row of B and per column of A —
(``coeff_scope="position"``: larger coefficient table, lower error). Task i is recovered as
``B̂_i = Σ_k C_{k,i} U^B_k`` (same for A): exact when K = n, and the factor error ``‖D − CᵀU‖_F``
is non-increasing in K. The error of the product ``B̂_i Â_i`` is reported too (not monotone in K).

RMM stores and reconstructs **factors** by design (this is the method, not the factor-wise merge
that :func:`~adapterlab.merging.merge_adapters` warns about). The task-average coefficients give one
merged adapter, written next to the bundle so that the folder is also a PEFT adapter.

The algorithm is the reconstruction in ``methods/ties_rmm.md`` Part B (no reference code exists).

Reference:
    Alipour & Mohammadi Amiri 2025, "Towards Reversible Model Merging For Low-rank Weights",
    https://arxiv.org/abs/2510.14163
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from adapterlab.io import load_tensors, read_json, save_tensors
from adapterlab.lora_dir import write_lora_dir
from adapterlab.merging.functional import canonical_gauge, rmm_fit, rmm_fit_positions
from adapterlab.merging.merger import MergeContext, Merger, check_choice, register_merger
from adapterlab.merging.result import MergeResult, ModuleReport
from adapterlab.merging.routes import MergePlan, Route, register_route
from adapterlab.progress import track
from adapterlab.staging import staged_dir

__all__ = ["COEFF_SCOPES", "GAUGES", "BasisRoute", "RMMBundle", "RmmMerger"]

COEFF_SCOPES = ("layer", "position")
GAUGES = ("canonical", "as_is")
BUNDLE_FILE = "rmm_bundle.safetensors"
CONFIG_FILE = "rmm_config.json"


def _rel(err: Tensor, ref: Tensor) -> float:
    den = float(ref.norm())
    return float(err.norm()) / den if den > 0 else 0.0


@dataclass
class RMMBundle:
    """Basis tensors and coefficients of an RMM fit, per module.

    Attributes:
        tasks: task names, in coefficient-column order.
        basis: module -> {"B": ``[K, d_out, r]``, "A": ``[K, r, d_in]``}.
        coeffs: module -> {"B": ``[K, n]`` (layer) or ``[d_out, K, n]`` (position),
            "A": ``[K, n]`` or ``[d_in, K, n]``}.
        errors: module -> {"factor_B", "factor_A": relative ‖D − CᵀU‖_F / ‖D‖_F,
            "delta": [relative ‖B_iA_i − B̂_iÂ_i‖_F per task]}.
    """

    tasks: list[str]
    n_basis: int
    coeff_scope: str
    gauge: str
    basis: dict[str, dict[str, Tensor]]
    coeffs: dict[str, dict[str, Tensor]]
    shapes: dict[str, tuple[int, int]]
    embeddings: frozenset[str] = frozenset()
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)

    # -- reconstruction --------------------------------------------------------------------------
    def task_index(self, task: str | int) -> int:
        if isinstance(task, int) and not isinstance(task, bool):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} outside [0, {len(self.tasks)})")
            return task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; tasks: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def _combine(self, name: str, part: str, c: Tensor) -> Tensor:
        U = self.basis[name][part]
        if self.coeff_scope == "layer":
            return torch.einsum("k,k...->...", c, U)  # [K] x [K, *f] -> [*f]
        if part == "B":
            return torch.einsum("pk,kpr->pr", c, U)  # [d_out, K] x [K, d_out, r] -> [d_out, r]
        return torch.einsum("pk,krp->rp", c, U)  # [d_in, K] x [K, r, d_in] -> [r, d_in]

    def _coeff(self, name: str, part: str, i: int | None) -> Tensor:
        C = self.coeffs[name][part]  # [K, n] or [npos, K, n]
        return C.mean(-1) if i is None else C[..., i]

    def factors(self, task: str | int | None, name: str) -> tuple[Tensor, Tensor]:
        """``(B̂ [d_out, r], Â [r, d_in])`` of one task (None: task-average coefficients)."""
        i = None if task is None else self.task_index(task)
        return self._combine(name, "B", self._coeff(name, "B", i)), self._combine(name, "A", self._coeff(name, "A", i))

    def delta(self, task: str | int, name: str) -> Tensor:
        B, A = self.factors(task, name)
        return B @ A  # [d_out, r] @ [r, d_in]

    def merged_delta(self, name: str) -> Tensor:
        B, A = self.factors(None, name)
        return B @ A

    def _result(self, factors: dict[str, tuple[Tensor, Tensor]], label: str) -> MergeResult:
        return MergeResult(
            method="rmm",
            params={"n_basis": self.n_basis, "coeff_scope": self.coeff_scope, "gauge": self.gauge, "task": label},
            weights=[],
            sources=self.sources,
            output="lora",
            modules=[
                ModuleReport(n, self.shapes[n], rank=int(a.shape[0]), norm=float((b @ a).norm()))
                for n, (b, a) in factors.items()
            ],
            shapes=dict(self.shapes),
            factors=factors,
            embeddings=self.embeddings,
            fan_in_fan_out=self.fan_in_fan_out,
            base_model_name_or_path=self.base_model_name_or_path,
            dtype=self.dtype,
        )

    def reconstruct(self, task: str | int) -> MergeResult:
        """Task ``task``'s adapter (LoRA factors, scale 1) as a :class:`MergeResult` (``.save`` -> PEFT dir)."""
        i = self.task_index(task)
        return self._result({n: self.factors(i, n) for n in self.shapes}, self.tasks[i])

    def merged(self) -> MergeResult:
        """The single adapter with task-average coefficients (RMM's point is to switch per task instead)."""
        return self._result({n: self.factors(None, n) for n in self.shapes}, "mean")

    def module_reports(self) -> list[ModuleReport]:
        out = []
        for n in self.shapes:
            B, A = self.factors(None, n)
            err = self.errors.get(n, {})
            worst = max(err.get("delta", [0.0]) or [0.0])
            out.append(
                ModuleReport(
                    n,
                    self.shapes[n],
                    rank=int(A.shape[0]),
                    error=worst,
                    norm=float((B @ A).norm()),
                    seconds=self.seconds.get(n, 0.0),
                )
            )
        return out

    def storage(self) -> dict[str, int]:
        """Numbers stored: basis, coefficients, and what n separate adapters would take."""
        basis = sum(t.numel() for d in self.basis.values() for t in d.values())
        coeffs = sum(t.numel() for d in self.coeffs.values() for t in d.values())
        adapters = len(self.tasks) * basis // max(self.n_basis, 1)
        return {"basis": basis, "coeffs": coeffs, "separate_adapters": adapters}

    # -- persistence -----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {
            "type": "rmm",
            "K": self.n_basis,
            "coeff_scope": self.coeff_scope,
            "gauge": self.gauge,
            "tasks": list(self.tasks),
            "base_model_name_or_path": self.base_model_name_or_path,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules": {n: {"shape": list(s), "embedding": n in self.embeddings} for n, s in self.shapes.items()},
            "errors": self.errors,
            "storage": self.storage(),
            "sources": self.sources,
        }

    def write(self, stage: Path, metadata: dict[str, Any] | None = None) -> None:
        """Write the merged PEFT adapter + ``rmm_bundle.safetensors`` + ``rmm_config.json`` into ``stage``.

        The adapter and the basis are stored in :attr:`dtype` (the inputs' dtype by default), the ``[K, n]``
        coefficients in fp32."""
        write_lora_dir(
            stage,
            {n: self.factors(None, n) for n in self.shapes},
            embeddings=self.embeddings,
            fan_in_fan_out=self.fan_in_fan_out,
            base_model_name_or_path=self.base_model_name_or_path,
            dtype=self.dtype,
            metadata=metadata,
        )
        tensors: dict[str, Tensor] = {}
        for n in self.shapes:
            for part in ("B", "A"):
                tensors[f"basis.{n}.{part}"] = self.basis[n][part].to(self.dtype)  # the inputs' dtype
                tensors[f"coeffs.{n}.{part}"] = self.coeffs[n][part]
        save_tensors(stage / BUNDLE_FILE, tensors, metadata={"format": "pt", "type": "rmm"})
        (stage / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2) + "\n", encoding="utf-8")

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        with staged_dir(path, overwrite) as stage:
            self.write(stage)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RMMBundle:
        """Read a bundle written by :meth:`save` / ``MergeResult.save`` (safetensors + JSON only)."""
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{str(path)!r} holds no {CONFIG_FILE}; not an RMM bundle")
        cfg = read_json(path / CONFIG_FILE)  # the project's readers: one line naming the file
        tensors = load_tensors(path / BUNDLE_FILE)
        try:
            shapes = {n: tuple(int(d) for d in m["shape"]) for n, m in cfg["modules"].items()}
            basis = {n: {p: tensors[f"basis.{n}.{p}"].float() for p in ("B", "A")} for n in shapes}  # fp32 compute
            first = next(iter(shapes), None)
            dtype = tensors[f"basis.{first}.B"].dtype if first is not None else torch.float32
            coeffs = {n: {p: tensors[f"coeffs.{n}.{p}"] for p in ("B", "A")} for n in shapes}
            tasks, n_basis = [str(t) for t in cfg["tasks"]], int(cfg["K"])
            coeff_scope, gauge = cfg["coeff_scope"], cfg["gauge"]
            embeddings = frozenset(n for n, m in cfg["modules"].items() if m.get("embedding"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            what = f"no key or tensor {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(
                f"{path / CONFIG_FILE}: not an RMM bundle adapterlab can read ({what.splitlines()[0] if what else exc}); "
                f"re-save it with MergeResult.save"
            ) from None
        return cls(
            tasks=tasks,
            n_basis=n_basis,
            coeff_scope=coeff_scope,
            gauge=gauge,
            basis=basis,
            coeffs=coeffs,
            shapes=shapes,  # type: ignore[arg-type]
            embeddings=embeddings,
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
            dtype=dtype,
            errors=cfg.get("errors", {}),
            sources=cfg.get("sources", []),
        )


@register_merger("rmm")
@dataclass
class RmmMerger(Merger):
    """Fit an :class:`RMMBundle` (see the module docstring).

    Attributes:
        n_basis: K, the number of basis "models" (``K`` in configs), 1 <= K <= n.
        coeff_scope: ``"layer"`` (one coefficient table per module and factor) or ``"position"``.
        gauge: ``"canonical"`` (QR + r×r SVD per adapter before stacking, default) or ``"as_is"``.
    """

    takes_weights: ClassVar[bool] = False
    route: ClassVar[str | None] = "basis"

    n_basis: int = 2
    coeff_scope: str = "layer"
    gauge: str = "canonical"

    def __post_init__(self) -> None:
        if isinstance(self.n_basis, bool) or not isinstance(self.n_basis, int) or self.n_basis < 1:
            raise ValueError(f"params.K must be a positive integer, got {self.n_basis!r}")
        self.coeff_scope = check_choice("params.coeff_scope", self.coeff_scope, COEFF_SCOPES)
        self.gauge = check_choice("params.gauge", self.gauge, GAUGES)

    def describe(self) -> dict[str, Any]:
        return {"K": self.n_basis, "coeff_scope": self.coeff_scope, "gauge": self.gauge}

    def merge(self, key: tuple[str, str], x: Tensor, weights: Tensor) -> Tensor | None:  # pragma: no cover
        raise TypeError("rmm does not merge tensor by tensor: it fits a basis per task (use RmmMerger.fit)")

    def _stack(self, ctx: MergeContext, name: str) -> tuple[Tensor, Tensor]:
        r = max(s.modules[name].rank for s in ctx.sources if name in s.modules)
        d_out, d_in = ctx.shapes[name]
        Bs, As = [], []
        for s in ctx.sources:
            B, A = torch.zeros(d_out, r), torch.zeros(r, d_in)
            if name in s.modules:
                b, a = s.factors(name)  # scale folded into b
                if self.gauge == "canonical":
                    b, a = canonical_gauge(b, a)
                B[:, : b.shape[1]], A[: a.shape[0]] = b, a  # zero-pad to the largest rank
            Bs.append(B)
            As.append(A)
        return torch.stack(Bs), torch.stack(As)  # [n, d_out, r], [n, r, d_in]

    def fit(self, ctx: MergeContext, dtype: torch.dtype = torch.float32) -> RMMBundle:
        n, K = ctx.n_tasks, self.n_basis
        if K > n:
            raise ValueError(f"params.K = {K} exceeds the number of adapters ({n}); choose 1 <= K <= {n}")
        bundle = RMMBundle(
            tasks=[s.name for s in ctx.sources],
            n_basis=K,
            coeff_scope=self.coeff_scope,
            gauge=self.gauge,
            basis={},
            coeffs={},
            shapes=dict(ctx.shapes),
            embeddings=frozenset(nm for s in ctx.sources for nm, m in s.modules.items() if m.embedding),
            fan_in_fan_out=any(bool(s.config.get("fan_in_fan_out")) for s in ctx.sources),
            base_model_name_or_path=ctx.sources[0].base_model,
            dtype=dtype,
            sources=[s.info() for s in ctx.sources],
        )
        for name in track(list(ctx.shapes), "rmm: fitting basis", progress=ctx.progress):
            t0 = time.perf_counter()
            Bst, Ast = self._stack(ctx, name)  # [n, d_out, r], [n, r, d_in]
            _, d_out, r = Bst.shape
            d_in = Ast.shape[2]
            if self.coeff_scope == "layer":
                UB, CB = rmm_fit(Bst.reshape(n, -1), K)  # [K, d_out*r], [K, n]
                UA, CA = rmm_fit(Ast.reshape(n, -1), K)  # [K, r*d_in], [K, n]
                bundle.basis[name] = {"B": UB.reshape(K, d_out, r), "A": UA.reshape(K, r, d_in)}
            else:
                UB, CB = rmm_fit_positions(Bst.permute(1, 0, 2), K)  # [d_out, K, r], [d_out, K, n]
                UA, CA = rmm_fit_positions(Ast.permute(2, 0, 1), K)  # [d_in, K, r], [d_in, K, n]
                bundle.basis[name] = {"B": UB.permute(1, 0, 2).contiguous(), "A": UA.permute(1, 2, 0).contiguous()}
            bundle.coeffs[name] = {"B": CB.contiguous(), "A": CA.contiguous()}
            rec = [bundle.factors(i, name) for i in range(n)]
            errB = _rel(torch.stack([b for b, _ in rec]) - Bst, Bst)
            errA = _rel(torch.stack([a for _, a in rec]) - Ast, Ast)
            deltas = [_rel(rec[i][0] @ rec[i][1] - Bst[i] @ Ast[i], Bst[i] @ Ast[i]) for i in range(n)]
            bundle.errors[name] = {"factor_B": errB, "factor_A": errA, "delta": deltas}
            bundle.seconds[name] = time.perf_counter() - t0
        return bundle


@register_route("basis", order=30)
class BasisRoute(Route):
    """RMM: a shared basis per module that keeps every task (the merger names this route itself)."""

    @classmethod
    def check(cls, plan: MergePlan) -> None:
        if plan.output != "lora" or plan.rank is not None or plan.energy is not None or plan.factorwise:
            raise ValueError("output/rank/energy/factorwise: rmm keeps a basis of factors; these options do not apply")

    @classmethod
    def run(cls, plan: MergePlan) -> MergeResult:
        merger = plan.merger
        assert isinstance(merger, RmmMerger)
        ctx = MergeContext(plan.sources, plan.shapes, plan.weights, progress=plan.progress)
        bundle = merger.fit(ctx, dtype=plan.common["dtype"])
        return MergeResult(
            params=merger.describe(), output="rmm", modules=bundle.module_reports(), bundle=bundle, **plan.common
        )
