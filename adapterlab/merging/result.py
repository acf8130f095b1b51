"""What a merge returns: :class:`MergeResult` (per-module :class:`ModuleReport`, the output's tensors,
``.save(dir)`` for every output form) and the :class:`TaskBasis` protocol a basis route's bundle follows."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor, nn

from adapterlab.folding import add_to_weight
from adapterlab.io import check_finite, save_tensors
from adapterlab.lora_dir import write_lora_dir
from adapterlab.merging.writers import write_lori_dir, write_shira_dir
from adapterlab.staging import staged_dir

__all__ = ["MergeResult", "ModuleReport", "TaskBasis"]


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


class TaskBasis(Protocol):
    """A merge that keeps every task (RMM's :class:`~adapterlab.merging.rmm.RMMBundle`)."""

    def merged_delta(self, name: str) -> Tensor: ...

    def reconstruct(self, task: str | int) -> MergeResult: ...

    def write(self, stage: Path, metadata: dict[str, Any] | None = None) -> None: ...


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
    bundle: TaskBasis | None = None
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
            w = cast(Tensor, model.get_submodule(name).weight)  # a linear / embedding weight
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
                for key, t in self.model.state_dict().items():  # written by transformers, not save_tensors
                    check_finite(
                        t,
                        f"refusing to write the merged model: tensor {key!r}",
                        " (NaN/Inf in the base, or an fp32 overflow of base + delta); nothing was written",
                    )
                cast(Any, self.model).save_pretrained(str(stage))  # a transformers PreTrainedModel
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(stage))
            elif self.output == "rmm":
                assert self.bundle is not None
                self.bundle.write(stage, metadata=meta)
            elif self.output == "shira":
                assert self.sparse is not None
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
