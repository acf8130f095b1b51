"""Training-free compensation adapters (EoRA): a LoRA that puts back what pruning or quantization removed.

For every compressed linear layer of a decoder block (pruned by any method or pattern, bitsandbytes
4-bit / 8-bit — compared through its dequantized weight — or both) the compression error
``E = W_dense − W_compressed`` ``[d_out, d_in]`` is approximated by a rank-k product ``B A``:

* ``space="activation"`` (EoRA): minimise ``‖(E − B A) X‖_F`` over the calibration inputs ``X``
  ``[d_in, tokens]`` that the layer receives in the **compressed** model. With the dampened input
  covariance ``C = H + λ I = Q Λ Qᵀ`` (``H = 2/n Σ x xᵀ`` as in SparseGPT, ``λ = percdamp · mean(diag H)``),
  ``‖(E − BA) C^{1/2}‖ = ‖E Q Λ^{1/2} − B A Q Λ^{1/2}‖``, so the optimum is the truncated SVD of the
  projected error ``E' = E Q Λ^{1/2}`` mapped back: ``B A = [E']_k Λ^{-1/2} Qᵀ`` (Eckart–Young).
  Eigen-directions with ``Λ = 0`` carry no signal and get no correction.
* ``space="weight"``: the plain truncated SVD of ``E`` (minimises ``‖E − B A‖_F``); the baseline.

The rank is fixed (``rank``) or chosen by retained energy of the spectrum being truncated (``energy``),
per module or under one global budget (``energy_scope="global"``: the fewest parameters that keep
``energy`` of the summed energy, see :func:`~adapterlab.extraction.functional.global_energy_ranks`; one
extra calibration pass). Calibration statistics are collected block by block (the compressed block's
outputs feed the next block, as in :func:`adapterlab.pruning.prune_`): only one block's ``d_in × d_in``
fp32 covariances and the block-boundary hidden states are ever held. Everything is fp32 and the factors
are cast once, when written. Each rank component is split so that ``‖B_i‖ = ‖A_i‖`` (the product is
unchanged; half-precision storage keeps its range). Components are ordered by singular value, so the
rank-k adapter is the first k components of any larger one (:meth:`CompensationResult.truncated`).

The output is a plain PEFT LoRA folder for the compressed base (:meth:`CompensationResult.save`).

Reference:
    Liu et al. 2024, "EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank
    Approximation", https://arxiv.org/abs/2410.21271
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from adapterlab.extraction.functional import (
    LowRankFactors,
    global_energy_ranks,
    low_rank_factors,
    retained_energy,
)
from adapterlab.io import check_finite
from adapterlab.progress import ProgressFactory, track

logger = logging.getLogger(__name__)

__all__ = [
    "ENERGY_SCOPES",
    "SPACES",
    "CompensationResult",
    "ModuleCompensation",
    "compensate",
    "damping",
    "load_compressed",
    "whitened_low_rank",
]

#: Where the compression error is approximated.
SPACES = ("activation", "weight")
#: Where an energy threshold applies.
ENERGY_SCOPES = ("module", "global")
SPECTRUM_HEAD = 16
#: Fraction of a quantized layer's entries that may turn zero by rounding before the layer counts as pruned too.
QUANT_ZERO_SLACK = 0.2


# ------------------------------------------------------------------------------------------------
# tensor math


def damping(gram: Tensor, percdamp: float) -> float:
    """SparseGPT's dampening ``λ = percdamp · mean(diag gram)`` (0 for a zero or non-finite mean)."""
    mean = float(torch.diagonal(gram).double().mean()) if gram.numel() else 0.0
    lam = percdamp * mean
    return lam if math.isfinite(lam) and lam > 0 else 0.0


def whitened_low_rank(
    error: Tensor,
    gram: Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    percdamp: float = 0.01,
    min_rank: int = 1,
    max_rank: int | None = None,
    solver: str = "svd",
) -> tuple[LowRankFactors, float]:
    """Rank-k ``B A`` minimising ``‖(error − B A) C^{1/2}‖_F`` with ``C = gram + λ I`` (EoRA).

    With ``gram = X Xᵀ`` (any positive multiple of it) and ``percdamp = 0`` this is
    ``argmin ‖(error − B A) X‖_F`` over rank-k products.

    Semantics:
        C = gram + damping(gram, percdamp) * I;  Λ, Q = eigh(C)
        U, S, Vh = svd(error @ Q @ diag(sqrt Λ));  k = rank or energy_rank(S)
        B A = U[:, :k] S[:k] Vh[:k] @ diag(1 / sqrt Λ) @ Qᵀ     (1/sqrt Λ := 0 where Λ is numerically 0)

    Args:
        error: ``[d_out, d_in]`` (computed in fp32).
        gram: ``[d_in, d_in]`` symmetric positive semi-definite input statistic.
        rank / energy: exactly one: a fixed k, or the smallest k keeping that fraction of
            ``‖error C^{1/2}‖_F²`` (clipped to ``[min_rank, max_rank]``).
        percdamp: dampening as a fraction of ``mean(diag gram)`` (>= 0).
        solver: the SVD of the projected error (see :func:`~adapterlab.extraction.functional.low_rank_factors`).

    Returns:
        ``(factors, λ)``: ``factors.B`` ``[d_out, k]``, ``factors.A`` ``[k, d_in]`` fp32 with balanced
        component norms; ``spectrum`` / ``energy`` / ``total_energy`` are those of the projected
        error ``error Q Λ^{1/2}`` (the activation-weighted error), ``λ`` the dampening used.
    """
    e = error.detach().to(torch.float32)
    g = gram.detach().to(torch.float32)
    d_out, d_in = e.shape
    if g.shape != (d_in, d_in):
        raise ValueError(f"gram must be [{d_in}, {d_in}] for an error of shape {list(e.shape)}, got {list(g.shape)}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    lam = damping(g, percdamp)
    c = 0.5 * (g + g.T)  # symmetrise away accumulation noise   [d_in, d_in]
    c.diagonal().add_(lam)
    evals, q = torch.linalg.eigh(c)  # ascending [d_in], [d_in, d_in]
    evals = evals.clamp_min(0)
    tiny = float(evals.max()) * d_in * torch.finfo(torch.float32).eps
    live = evals > tiny  # directions the inputs actually reach
    root = torch.where(live, evals.sqrt(), torch.zeros_like(evals))  # [d_in]
    inv_root = torch.where(live, 1.0 / root.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(evals))
    projected = (e @ q) * root  # E Q Λ^{1/2}   [d_out, d_in]
    lr = low_rank_factors(
        projected, rank=rank, energy=energy, min_rank=min_rank, max_rank=max_rank, solver=solver
    )  # B' [d_out, k], A' [k, d_in]
    a = (lr.A * inv_root) @ q.T  # A' Λ^{-1/2} Qᵀ   [k, d_in]
    b, a = _balance(lr.B, a)
    return replace(lr, B=b, A=a), lam


def _balance(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale each rank component so that ``‖B[:, i]‖ = ‖A[i]‖`` (``B A`` unchanged).

    Args:
        b: ``[d_out, k]``; a: ``[k, d_in]``.
    """
    nb, na = b.norm(dim=0), a.norm(dim=1)  # [k], [k]
    ok = (nb > 0) & (na > 0)
    c = torch.where(ok, (na / nb.clamp_min(torch.finfo(b.dtype).tiny)).sqrt(), torch.ones_like(nb))  # [k]
    return (b * c).contiguous(), (a / c[:, None]).contiguous()


# ------------------------------------------------------------------------------------------------
# result


@dataclass
class ModuleCompensation:
    """One row of the compensation report.

    ``compression`` names what changed the layer: ``pruned``, ``bnb-4bit-nf4`` / ``bnb-4bit-fp4`` /
    ``bnb-8bit``, ``<bnb>+pruned`` (more than :data:`QUANT_ZERO_SLACK` of the entries turned zero), ``changed`` (any other difference) or ``unchanged``. ``energy`` is
    the retained fraction of the spectrum that was truncated (activation-weighted error for the
    activation space, ``‖E‖_F²`` for the weight space); ``error_norm`` is ``‖E‖_F``.
    """

    name: str
    shape: tuple[int, int]
    compression: str
    sparsity: float
    rank: int = 0
    energy: float | None = None
    error_norm: float = 0.0
    error_rel: float = 0.0
    damping: float | None = None
    spectrum_head: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompensationResult:
    """A compensation adapter for a compressed base and its report.

    Attributes:
        factors: module -> ``(B [d_out, k], A [k, d_in])`` fp32, scale 1, components by singular value.
        modules: the per-layer report (:class:`ModuleCompensation`), every decoder linear considered.
        spectra: module -> the singular values that were truncated (for :meth:`truncated`).
        settings: space, rank / energy, dampening, solver.
        calibration: what the statistics came from (``n_samples``, ``seqlen``, ``sha256`` of the ids, ...).
        sources: the dense and compressed models (paths, compression summary).
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    modules: list[ModuleCompensation]
    spectra: dict[str, Tensor]
    settings: dict[str, Any]
    calibration: dict[str, Any] | None
    sources: dict[str, Any]
    base_model_name_or_path: str | None = None
    dtype: torch.dtype = torch.float32
    seconds: float = 0.0

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(a.shape[0]) for n, (_, a) in self.factors.items()}

    def n_params(self) -> int:
        return sum(b.numel() + a.numel() for b, a in self.factors.values())

    def delta(self, name: str) -> Tensor:
        """``B A`` ``[d_out, d_in]`` fp32 for one module."""
        b, a = self.factors[name]
        return b @ a  # [d_out, k] @ [k, d_in]

    def truncated(self, rank: int) -> CompensationResult:
        """The same adapter with every module cut to its first ``min(rank, k)`` components.

        Exact: the components are ordered by singular value, so this is the rank-``rank`` result of
        the same fit (what ``compensate(..., rank=rank)`` returns, without recomputing anything).
        """
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        factors = {n: (b[:, :rank].clone(), a[:rank].clone()) for n, (b, a) in self.factors.items()}
        rows = []
        for row in self.modules:
            if row.name in factors:
                k = int(factors[row.name][1].shape[0])
                spec = self.spectra[row.name]
                total = float(spec.double().square().sum())
                row = replace(row, rank=k, energy=retained_energy(spec, k, total))
            rows.append(row)
        settings = {**self.settings, "rank": rank, "energy": None, "truncated_from": self.settings}
        return replace(self, factors=factors, modules=rows, settings=settings)

    def apply_(self, model: nn.Module) -> None:
        """Add every ``B A`` into the matching plain linear weight of ``model`` (fp32 add, one cast; in place).

        Raises:
            ValueError: a target is a bitsandbytes layer (its weight cannot hold the correction; load
                the folder with ``PeftModel.from_pretrained`` or fold it with :func:`adapterlab.merge`).
        """
        from adapterlab.quant import module_quantization

        with torch.no_grad():
            for name in self.factors:
                module = model.get_submodule(name)
                if module_quantization(module) is not None:
                    raise ValueError(
                        f"{name}: a bitsandbytes layer; load the adapter with PeftModel.from_pretrained "
                        f"or fold it with adapterlab.merge"
                    )
                w = module.weight
                if not isinstance(w, Tensor):
                    raise ValueError(f"{name}: has no weight tensor")
                w.copy_((w.float() + self.delta(name).to(w.device)).to(w.dtype))

    def report(self) -> dict[str, Any]:
        by_kind: dict[str, int] = {}
        for row in self.modules:
            by_kind[row.compression] = by_kind.get(row.compression, 0) + 1
        return {
            "method": "compensation",
            "settings": self.settings,
            "calibration": self.calibration,
            "sources": self.sources,
            "n_params": self.n_params(),
            "ranks": self.ranks,
            "compression": by_kind,
            "seconds": self.seconds,
            "modules": [m.to_dict() for m in self.modules],
        }

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
        """Write a PEFT LoRA folder for the compressed base plus ``compensation_report.json``
        (staged: nothing partial on error). ``dtype`` overrides the result's adapter dtype."""
        from adapterlab.lora_dir import write_lora_dir
        from adapterlab.staging import staged_dir

        with staged_dir(path, overwrite) as stage:
            write_lora_dir(
                stage,
                self.factors,
                base_model_name_or_path=self.base_model_name_or_path,
                dtype=dtype or self.dtype,
                metadata={
                    "method": "compensation",
                    "settings": self.settings,
                    "calibration": self.calibration,
                    "sources": self.sources,
                },
            )
            text = json.dumps(self.report(), indent=2, default=str) + "\n"
            (stage / "compensation_report.json").write_text(text, encoding="utf-8")
        return Path(path)


# ------------------------------------------------------------------------------------------------
# models and calibration


def load_compressed(compressed: nn.Module | str | os.PathLike[str]) -> tuple[nn.Module, str | None]:
    """The compressed model in memory and its name or path: a folder (pruned and/or a saved bitsandbytes
    model) is loaded in its own dtype with the 4-bit CPU repack off; a model is returned as it is."""
    if isinstance(compressed, nn.Module):
        if hasattr(compressed, "get_base_model"):
            raise ValueError("compressed: a PeftModel; give the compressed base model itself")
        name = getattr(getattr(compressed, "config", None), "_name_or_path", None) or None
        return compressed, name
    from transformers import AutoModelForCausalLM

    from adapterlab.models import check_model_folder
    from adapterlab.quant import set_cpu_repack_

    path = check_model_folder(compressed, "compressed")
    model: nn.Module = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", local_files_only=True)
    set_cpu_repack_(model, False)  # exact, stable layout (see adapterlab.quant, fact 1)
    model.eval()
    return model, str(compressed)


def _check_calibration(model: nn.Module, calibration: Any) -> Tensor:
    if calibration is None:
        raise ValueError(
            "calibration: space='activation' needs calibration data: a LongTensor of input ids of shape "
            "(n_samples, seqlen), e.g. adapterlab.data.calibration_ids(tokenizer, 64, 512)"
        )
    if not isinstance(calibration, Tensor) or calibration.dim() != 2 or calibration.numel() == 0:
        shape = list(calibration.shape) if isinstance(calibration, Tensor) else type(calibration).__name__
        raise ValueError(f"calibration must be a LongTensor of shape (n_samples, seqlen), got {shape}")
    if calibration.dtype.is_floating_point or calibration.dtype == torch.bool or calibration.is_complex():
        raise ValueError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    vocab = int(cast(Any, model).get_input_embeddings().num_embeddings)
    lo, hi = int(calibration.min()), int(calibration.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab}), got [{lo}, {hi}]")
    return calibration.long()


def _block_grams(
    model: nn.Module,
    blocks: nn.ModuleList | Sequence[nn.Module],
    wanted: Sequence[Mapping[str, nn.Linear]],
    calibration: Tensor,
    batch_size: int,
) -> Iterator[dict[str, Tensor]]:
    """Per decoder block, ``{module name: H [d_in, d_in] fp32}`` for the modules in ``wanted[i]``.

    ``H = 2/n Σ x xᵀ`` over the inputs the module receives in ``model`` (SparseGPT's statistic). The
    blocks run in sequence on the captured hidden states: only one block's statistics and the
    boundary activations are alive at a time. Blocks after the last wanted one are not run.
    """
    # the pruning pipeline's capture and replay (the same block-0 inputs and kwargs as a full forward)
    from adapterlab.pruning.functional import accumulate_hessian
    from adapterlab.pruning.pruner import _capture_block0_inputs, _run_block

    last = max((i for i, w in enumerate(wanted) if w), default=-1)
    if last < 0:
        return
    with torch.no_grad():
        calls = _capture_block0_inputs(model, blocks[0], calibration, batch_size)
        for i in range(last + 1):
            stats: dict[str, tuple[Tensor, int]] = {}
            handles = []
            for name, module in wanted[i].items():
                d_in = int(module.in_features)
                device = module.weight.device
                stats[name] = (torch.zeros(d_in, d_in, dtype=torch.float32, device=device), 0)

                def hook(
                    mod: nn.Module, args: tuple[Any, ...], out: Any, name: str = name, stats: dict[str, Any] = stats
                ) -> None:
                    h, n = stats[name]
                    stats[name] = accumulate_hessian(h, n, args[0].detach())

                handles.append(module.register_forward_hook(hook))
            try:
                if wanted[i]:
                    _run_block(blocks[i], calls, keep=False)
            finally:
                for handle in handles:
                    handle.remove()
            yield {name: h for name, (h, _) in stats.items()}
            if i < last:  # the compressed block's outputs feed the next block
                outs = _run_block(blocks[i], calls)
                calls = [(o, rest, kw) for o, (_, rest, kw) in zip(outs, calls)]


def _ids_digest(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# compensate


def _check_settings(
    rank: Any,
    energy: Any,
    energy_scope: str,
    space: str,
    percdamp: Any,
    min_rank: int,
    max_rank: int | None,
    solver: str,
    batch_size: Any,
) -> None:
    from adapterlab.extraction.phlora import _check_settings as check_rank_energy

    check_rank_energy(rank, energy, min_rank, max_rank, False, "save")
    if space not in SPACES:
        raise ValueError(f"space is {space!r}; choose one of: {', '.join(SPACES)}")
    if energy_scope not in ENERGY_SCOPES:
        raise ValueError(f"energy_scope is {energy_scope!r}; choose one of: {', '.join(ENERGY_SCOPES)}")
    if energy_scope == "global" and energy is None:
        raise ValueError("energy_scope='global' chooses ranks by energy: give energy=, not rank=")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not 0 <= percdamp < math.inf:
        raise ValueError(f"percdamp must be a finite number >= 0, got {percdamp!r}")
    if solver not in ("svd", "gram"):
        raise ValueError(f"solver must be 'svd' or 'gram', got {solver!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _compression_kind(module: nn.Module, w_dense: Tensor, w_comp: Tensor) -> str:
    from adapterlab.quant import module_quantization

    quant = module_quantization(module)
    extra = int((w_comp == 0).sum()) - int((w_dense == 0).sum())  # zeros the compression added
    # 4-bit codes contain an exact 0 (small weights round to it): on a quantized layer only a jump of
    # more than QUANT_ZERO_SLACK of the entries counts as pruning
    pruned = extra > (QUANT_ZERO_SLACK * w_comp.numel() if quant is not None else 0)
    if quant is not None:
        return f"{quant}+pruned" if pruned else quant
    if pruned:
        return "pruned"
    return "changed" if not torch.equal(w_dense, w_comp) else "unchanged"


def compensate(
    dense: nn.Module | str | os.PathLike[str],
    compressed: nn.Module | str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    energy_scope: str = "module",
    calibration: Tensor | None = None,
    space: str = "activation",
    percdamp: float = 0.01,
    min_rank: int = 1,
    max_rank: int | None = None,
    target_modules: Sequence[str] | None = None,
    solver: str = "svd",
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    calibration_info: Mapping[str, Any] | None = None,
    progress: ProgressFactory | None = None,
) -> CompensationResult:
    """A LoRA adapter ``B A ≈ W_dense − W_compressed`` per compressed decoder linear (EoRA; training-free).

    Args:
        dense: the uncompressed model, or its folder (safetensors, read tensor by tensor; ``"default"``
            = the embedded model).
        compressed: the pruned and/or bitsandbytes-quantized model of the same architecture, or its
            folder (loaded in its own dtype). Calibration runs through it; it is not modified.
        rank: fixed k for every layer (clipped to ``min(d_out, d_in)``), or
        energy: per layer the smallest k that keeps this fraction of the spectrum's energy (in the
            chosen space), clipped to ``[min_rank, max_rank]``.
        energy_scope: ``"module"`` (each layer keeps ``energy`` of its own error) or ``"global"`` (the
            fewest parameters that keep ``energy`` of the summed error; one extra calibration pass).
        calibration: ``(n_samples, seqlen)`` LongTensor of input ids; required for ``space="activation"``.
        space: ``"activation"`` (minimise ``‖(E − BA) X‖``, EoRA) or ``"weight"`` (plain SVD of ``E``).
        percdamp: dampening of the input covariance as a fraction of its mean diagonal (SparseGPT's rule).
        target_modules: decoder linears to consider (names or ``.``-suffixes); default all of them.
        solver: the SVD (``"svd"`` LAPACK, or ``"gram"``; see
            :func:`~adapterlab.extraction.functional.low_rank_factors`).
        batch_size: calibration sequences per forward.
        dtype: the adapter's dtype when saved (default fp32, peft's convention on half bases).
        calibration_info: extra facts recorded with the calibration (corpus, seed, ...).

    Returns:
        :class:`CompensationResult`; ``.save(dir)`` writes a PEFT LoRA folder for the compressed base.

    Raises:
        ValueError: bad settings, missing calibration, or dense and compressed differing in a target's
            name or shape, or not differing at all (the message names the tensor / what to change).

    Reference:
        EoRA, https://arxiv.org/abs/2410.21271
    """
    _check_settings(rank, energy, energy_scope, space, percdamp, min_rank, max_rank, solver, batch_size)
    from adapterlab.extraction.phlora import _Weights
    from adapterlab.models import decoder_layers
    from adapterlab.quant import dequantize_weight

    t_start = time.perf_counter()
    model, comp_name = load_compressed(compressed)
    calib = _check_calibration(model, calibration) if space == "activation" else None
    if calibration is not None and calib is None:
        logger.debug("space='weight' uses no calibration data; ignoring it")
    wd = _Weights(dense, "dense")
    blocks = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    per_block: list[dict[str, nn.Linear]] = []
    for block in blocks:
        linears = {}
        for m in block.modules():
            if isinstance(m, nn.Linear):
                name = names[id(m)]
                if target_modules is None or any(name == t or name.endswith("." + t) for t in target_modules):
                    linears[name] = m
        per_block.append(linears)
    if not any(per_block):
        what = f" matching target_modules={list(target_modules)!r}" if target_modules is not None else ""
        raise ValueError(f"compressed: {type(model).__name__} has no linear layer inside its decoder blocks{what}")
    for linears in per_block:  # names and shapes, before any heavy work
        for name, m in linears.items():
            key, shape = f"{name}.weight", (int(m.out_features), int(m.in_features))
            if key not in wd.shapes:
                raise ValueError(
                    f"dense: the dense model has no tensor {key!r}; it must have the compressed one's architecture"
                )
            if tuple(wd.shapes[key]) != shape:
                raise ValueError(
                    f"dense: tensor {key!r} has shape {list(wd.shapes[key])} but the compressed model has {list(shape)}"
                )

    # the errors and what changed, per layer (fp32, one layer at a time)
    rows: dict[str, ModuleCompensation] = {}
    changed: list[dict[str, nn.Linear]] = []
    for linears in per_block:
        keep = {}
        for name, m in linears.items():
            w_dense = wd.get(f"{name}.weight").to(torch.float32)
            w_comp = check_finite(dequantize_weight(m), f"compressed: tensor {name + '.weight'!r}")
            kind = _compression_kind(m, w_dense, w_comp)
            sparsity = float((w_comp == 0).sum()) / max(w_comp.numel(), 1)
            err = w_dense - w_comp
            en = float(err.norm())
            rows[name] = ModuleCompensation(
                name,
                (int(err.shape[0]), int(err.shape[1])),
                kind if en > 0 else "unchanged",
                sparsity,
                error_norm=en,
                error_rel=en / max(float(w_dense.norm()), 1e-30),
            )
            if en > 0:
                keep[name] = m
        changed.append(keep)
    if not any(changed):
        raise ValueError("compressed: every decoder linear equals the dense model's; there is nothing to compensate")

    def error(name: str) -> Tensor:
        return wd.get(f"{name}.weight").to(torch.float32) - dequantize_weight(model.get_submodule(name))

    def grams() -> Iterator[Mapping[str, Tensor | None]]:
        if calib is None:  # the weight space needs no statistics
            for keep in changed:
                yield dict.fromkeys(keep)
        else:
            yield from _block_grams(model, blocks, changed, calib, batch_size)

    def fit(
        name: str, gram: Tensor | None, k_fixed: int | None, spectrum_only: bool = False
    ) -> tuple[LowRankFactors, float | None]:
        kw: dict[str, Any] = {"min_rank": min_rank, "max_rank": max_rank, "solver": solver}
        if k_fixed is not None:
            kw["rank"] = k_fixed
        elif spectrum_only:
            kw["rank"] = 1  # the exact SVD returns the whole spectrum whatever k is
        else:
            kw["rank"], kw["energy"] = rank, energy
        e = error(name)
        if gram is None:
            return low_rank_factors(e, **kw), None
        return whitened_low_rank(e, gram, percdamp=float(percdamp), **kw)

    was_training = model.training
    model.eval()
    global_ranks: dict[str, int] | None = None
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    spectra: dict[str, Tensor] = {}
    try:
        if energy_scope == "global":
            all_spectra: dict[str, Tensor] = {}
            totals: dict[str, float] = {}
            for block_grams in track(grams(), "compensate: spectra (global energy)", len(blocks), progress):
                for name, gram in block_grams.items():
                    lr, _ = fit(name, gram, None, spectrum_only=True)
                    all_spectra[name], totals[name] = lr.spectrum, lr.total_energy
            global_ranks = global_energy_ranks(
                all_spectra,
                {n: sum(rows[n].shape) for n in all_spectra},
                float(energy),  # type: ignore[arg-type]  # checked: global needs energy
                totals=totals,
                min_rank=min_rank,
                max_rank=max_rank,
            )
        for block_grams in track(grams(), f"compensate ({space} space): blocks", len(blocks), progress):
            for name, gram in block_grams.items():
                t0 = time.perf_counter()
                k_fixed = None if global_ranks is None else max(global_ranks[name], 0)
                if k_fixed == 0:
                    rows[name].seconds = time.perf_counter() - t0
                    continue
                try:
                    lr, lam = fit(name, gram, k_fixed)
                except torch.linalg.LinAlgError as exc:  # type: ignore[attr-defined]
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise ValueError(f"{name}: the factorisation failed ({reason}); nothing was written") from None
                for part, t in (("B", lr.B), ("A", lr.A)):
                    check_finite(t, f"{name}: the compensation factor {part}", " (fp32 overflow); nothing was written")
                if lr.rank > 0:
                    factors[name] = (lr.B, lr.A)
                    spectra[name] = lr.spectrum
                row = rows[name]
                row.rank, row.energy, row.damping = lr.rank, lr.energy, lam
                row.spectrum_head = [float(s) for s in lr.spectrum[: max(2 * lr.rank, SPECTRUM_HEAD)]]
                row.seconds = time.perf_counter() - t0
    finally:
        model.train(was_training)
    if not factors:
        raise ValueError(
            "compressed: every compression error is zero in the chosen space; there is nothing to compensate"
        )

    settings = {
        "space": space,
        "rank": rank,
        "energy": energy,
        "energy_scope": energy_scope,
        "percdamp": float(percdamp) if space == "activation" else None,
        "min_rank": min_rank,
        "max_rank": max_rank,
        "solver": solver,
        "target_modules": list(target_modules) if target_modules is not None else None,
        "split": "balanced: |B_i| = |A_i| per component",
    }
    calibration_record = None
    if calib is not None:
        calibration_record = {
            "n_samples": int(calib.shape[0]),
            "seqlen": int(calib.shape[1]),
            "tokens": int(calib.numel()),
            "sha256": _ids_digest(calib),
            "statistic": "H = 2/n sum x x^T on the compressed model's inputs, fp32, + percdamp * mean(diag H) * I",
            **dict(calibration_info or {}),
        }
    from adapterlab.quant import quant_info

    qi = quant_info(model)
    sources = {
        "dense": {"path": wd.name_or_path, "sha256": wd.hashes()},
        "compressed": {
            "path": comp_name,
            "quantization": {k: qi[k] for k in ("bits", "quant_type", "double_quant", "n_quantized")},
            "sparsity": _sparsity([r for r in rows.values()]),
        },
    }
    ordered = [rows[n] for linears in per_block for n in linears]
    return CompensationResult(
        factors=factors,
        modules=ordered,
        spectra=spectra,
        settings=settings,
        calibration=calibration_record,
        sources=sources,
        base_model_name_or_path=comp_name,
        dtype=dtype,
        seconds=time.perf_counter() - t_start,
    )


def _sparsity(rows: Sequence[ModuleCompensation]) -> float:
    total = sum(r.shape[0] * r.shape[1] for r in rows)
    return sum(r.sparsity * r.shape[0] * r.shape[1] for r in rows) / total if total else 0.0
