"""Combining T adapters of one base into one: :func:`merge_adapters` validates the call, picks the
route (:mod:`adapterlab.merging.routes`) and runs it.

Low-rank adapters are merged as their dense deltas ``ΔW_t = s_t B_t A_t`` (scale folded in, rsLoRA-aware),
one module at a time; sparse adapters take shorter routes when every input allows it (SHiRA in sparse form,
LoRI by concatenation); RMM keeps a basis of every task. Base weights are written by one rounding rule,
``(W.float() + ΔW).to(W.dtype)`` (:func:`adapterlab.folding.add_to_weight`), optionally masked by the
base's zeros (``keep_sparsity``), and the zeros of the base a merge fills are counted (``base_zeros_hit``).
Folding one adapter into its base model is :func:`adapterlab.folding.merge`.

Reference:
    TIES — https://arxiv.org/abs/2306.01708 ; DARE — https://arxiv.org/abs/2311.03099 ;
    task arithmetic — https://arxiv.org/abs/2212.04089 ; RMM — https://arxiv.org/abs/2510.14163 ;
    SHiRA — https://arxiv.org/abs/2406.13175 ; LoRI — https://arxiv.org/abs/2504.07448
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# the routes register themselves on import; merge_adapters picks among them
from adapterlab.adapters import AdapterLike, check_compatible, check_recorded_bases, resolve_adapters
from adapterlab.io import check_finite
from adapterlab.merging import concat, dense, rmm, sparse  # noqa: F401
from adapterlab.merging.merger import MERGERS, OUTPUTS, Merger, check_choice, check_number
from adapterlab.merging.result import MergeResult
from adapterlab.merging.routes import MergePlan, choose_route
from adapterlab.progress import ProgressFactory

__all__ = ["merge_adapters"]


def _weights(weights: Sequence[float] | None, n: int, merger: Merger) -> Tensor:
    if weights is None:
        value = 1.0 / n if merger.default_weights == "mean" else 1.0
        return torch.full((n,), value, dtype=torch.float32)
    if not merger.takes_weights:
        raise ValueError(f"weights: merge method {merger.name!r} takes no task weights (it keeps every task)")
    w = list(weights)
    if len(w) != n:
        raise ValueError(f"weights: expected {n} numbers (one per adapter), got {len(w)}")
    return torch.tensor([check_number(f"weights[{i}]", x) for i, x in enumerate(w)], dtype=torch.float32)


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

    The route is chosen from the inputs (:mod:`adapterlab.merging.routes`):

    * **sparse form** — every adapter is SHiRA and the method is linear, task_arithmetic, ties,
      dare_linear or dare_ties, output ``shira`` / ``sparse`` / ``full``: per module the T index sets
      are united and the method works on a ``[T, nnz_union]`` value matrix; no dense ``d_out × d_in``
      delta is built. TIES ``density`` is relative to each adapter's **stored** entries: it keeps the
      top ``⌊density·K⌋`` of the K values an adapter stores in a module (``trim_scope="tensor"``) or the
      top ``⌈density·ΣK⌉`` over all its modules (``"model"``); DARE drops among the stored entries.
    * **concatenation** — every adapter is LoRI and the method is linear / task_arithmetic, output
      ``lori`` / ``lora`` without ``rank`` / ``energy``: ``B = [c_1 s_1 B_1, …]``, ``A = [A_1; …]``, exact
      (``B A = Σ c_t ΔW_t``), rank ``Σ r_t``, each B keeps its zeros.
    * **basis** — RMM: a shared basis per module that keeps every task (``result.bundle``).
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
    t0 = time.perf_counter()
    merger = MERGERS.get(method).from_params(params)
    sources = resolve_adapters(adapters, registry=registry)
    shapes = check_compatible(sources, check_base=check_base)
    w = _weights(weights, len(sources), merger)
    if output is not None:
        check_choice("output", output, OUTPUTS)
    plan = MergePlan(
        list(sources),
        shapes,
        merger,
        w,
        output,
        rank=rank,
        energy=energy,
        factorwise=factorwise,
        drop_zeros=drop_zeros,
        keep_sparsity=keep_sparsity,
        progress=progress,
    )
    route, why = choose_route(plan)
    if why:
        warnings.warn(why, UserWarning, stacklevel=2)
        plan.notes.append(why)
    route.check(plan)
    if not isinstance(keep_sparsity, bool):
        raise ValueError(f"keep_sparsity must be True or False, got {keep_sparsity!r}")
    if keep_sparsity and plan.output != "full":
        raise ValueError(
            f"keep_sparsity applies to output='full' only (it masks the merge by the base's zeros), not {plan.output!r}"
        )
    if plan.output == "full" and base is None:
        raise ValueError("base: output='full' needs the base model (base=model or folder)")
    if base is not None:
        _check_base_shapes(_skeleton(base), shapes)
        if plan.output == "full":
            plan.model = _load_base(base)
            label = f"base {str(base)!r}" if isinstance(base, (str, Path)) else "base"
            for key, t in plan.model.state_dict().items():
                check_finite(t, f"{label}: tensor {key!r}", "; nothing was merged or written")
            check_recorded_bases(sources, plan.model)  # a hub: adapter put with --base wants that base
            if keep_sparsity and not any(bool((plan.model.get_submodule(n).weight == 0).any()) for n in shapes):
                raise ValueError(
                    "keep_sparsity=True but the base is dense: no module the adapters target has a zero weight "
                    "(prune the base first, e.g. adapterlab.prune_, or pass keep_sparsity=False)"
                )
    first = sources[0]
    plan.common = dict(
        method=merger.name,
        weights=[float(x) for x in w],
        sources=[s.info() for s in sources],
        shapes=shapes,
        embeddings=frozenset(n for s in sources for n, m in s.modules.items() if m.embedding),
        fan_in_fan_out=any(bool(s.config.get("fan_in_fan_out")) for s in sources),
        base_model_name_or_path=first.base_model,
        dtype=dtype or first.value_dtype(),
        warnings=plan.notes,
    )
    result = route.run(plan)
    result.seconds = time.perf_counter() - t0
    return result
