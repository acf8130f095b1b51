"""Export any adapter to a servable PEFT LoRA folder: the job behind ``adapterlab export`` and :func:`export_lora`.

Inputs beyond what :func:`adapterlab.extraction.to_lora.lora_input` reads (adapter folders, ``hub:``
refs, peft models) live here because they sit above extraction in the layers:

* a shared-basis bundle member (a folder with ``compressed_config.json`` or a
  :class:`~adapterlab.compression.SharedBasisBundle`, plus ``member=``): exact, a rank-c LoRA
  ``B = U[g] core_i``, ``A = V[g]``;
* an RMM task reconstruction (a merge folder with ``rmm_config.json`` or an
  :class:`~adapterlab.merging.RMMBundle`, plus ``task=``): exact, the task's reconstructed factors;
* a merge result (:class:`~adapterlab.merging.MergeResult` in memory, or its folder: ``lora`` / ``rmm``
  / ``shira`` / ``lori`` outputs are PEFT folders; ``sparse`` outputs (``sparse_adapter.json``) are a
  dense delta per module, factorised like SHiRA).

:func:`check_export` validates the settings, the output folder and the registry name (reads no
tensors); :func:`run_export` converts and writes staged; :func:`put_export` puts the folder into the
registry. :func:`export_lora` is the Python entry point.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterlab.jobs._put import put_folder
from adapterlab.progress import ProgressFactory

__all__ = [
    "DTYPES",
    "TARGETS",
    "ExportJobResult",
    "ExportPlan",
    "check_export",
    "export_lora",
    "put_export",
    "run_export",
]

DTYPES = ("float32", "float16", "bfloat16")
TARGETS = ("lora",)
SERVERS = ("vllm",)


@dataclass(frozen=True)
class ExportPlan:
    """A validated export job (see :func:`check_export`)."""

    adapter: Any
    output: Path | None
    rank: int | None
    energy: float | None
    max_error: float | None
    for_vllm: bool
    served_name: str | None
    base: Any
    member: str | None
    task: str | None
    dtype: str | None
    overwrite: bool
    put: str | None
    hub: Path | None

    def settings(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "energy": self.energy,
            "max_error": self.max_error,
            "for": "vllm" if self.for_vllm else None,
            "served_name": self.served_name,
            "member": self.member,
            "task": self.task,
            "dtype": self.dtype,
        }


@dataclass
class ExportJobResult:
    """What :func:`run_export` produced: the output folder (None when not written) and the
    :class:`~adapterlab.extraction.to_lora.LoraExport`; ``digest`` is set by :func:`put_export`."""

    output: Path | None
    result: Any
    digest: str | None = field(default=None)


def check_export(
    adapter: Any,
    *,
    output: str | os.PathLike[str] | None = None,
    to: str = "lora",
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    for_: str | None = None,
    served_name: str | None = None,
    base: Any = None,
    member: str | None = None,
    task: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    put: str | None = None,
    hub: str | os.PathLike[str] | None = None,
) -> ExportPlan:
    """Validate an export job without reading tensors.

    Raises:
        ValueError / FileExistsError: one line naming the option and value.
    """
    from adapterlab.extraction.to_lora import _check_settings
    from adapterlab.staging import check_output_dir

    if to not in TARGETS:
        raise ValueError(f"--to {to!r}: choose one of: {', '.join(TARGETS)}")
    if for_ is not None and for_ not in SERVERS:
        raise ValueError(f"--for {for_!r}: choose one of: {', '.join(SERVERS)}")
    _check_settings(rank, energy, max_error)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if served_name is not None and not served_name.strip():
        raise ValueError("--served-name is empty; give the model name the server serves the base under")
    if member is not None and task is not None:
        raise ValueError("--member/--task: give at most one (a shared-basis member or an RMM task)")
    if put is not None and output is None:
        raise ValueError("--put needs an output folder (-o OUT) to put into the registry")
    if output is not None:
        check_output_dir(output, overwrite)
    if put is not None:
        from adapterlab.registry.manifest import check_name

        check_name(put, "--put")
    return ExportPlan(
        adapter=adapter,
        output=None if output is None else Path(output),
        rank=rank,
        energy=energy,
        max_error=max_error,
        for_vllm=for_ == "vllm",
        served_name=served_name,
        base=base,
        member=member,
        task=task,
        dtype=dtype,
        overwrite=overwrite,
        put=put,
        hub=None if hub is None else Path(hub),
    )


# ------------------------------------------------------------------------------------------------
# inputs that live above extraction


def _scale_one(fn: Any, *args: Any) -> tuple[Any, Any, float]:
    """``(B, A, 1.0)`` from a ``(B, A)`` factor function with the scale folded in."""
    B, A = fn(*args)
    return B.float(), A.float(), 1.0


def _stored(factors: Any, name: str) -> tuple[Any, Any, float]:
    B, A = factors[name]
    return B.float(), A.float(), 1.0


def _bundle_input(bundle: Any, member: str, source: dict[str, Any]) -> Any:
    from adapterlab.extraction.to_lora import LoraInput, ModuleSource

    if member not in bundle.names:
        shown = ", ".join(bundle.names[:8]) + (" ..." if len(bundle.names) > 8 else "")
        raise ValueError(f"--member {member!r} is not in the shared-basis bundle; it holds: {shown}")
    mods = [
        ModuleSource(
            mod,
            bundle.shapes[mod],
            factors=functools.partial(_scale_one, bundle.reconstruct, member, mod),
            embedding=mod in set(bundle.embeddings),
        )
        for mod in bundle.module_names
    ]
    import torch

    return LoraInput(
        kind="shared-basis",
        modules=mods,
        dtype=torch.float32,
        base_model_name_or_path=bundle.base_model,
        fan_in_fan_out=bool(bundle.fan_in_fan_out),
        source={**source, "member": member, "rank_c": bundle.rank, "mode": bundle.mode},
    )


def _rmm_input(bundle: Any, task: str, source: dict[str, Any]) -> Any:
    from adapterlab.extraction.to_lora import LoraInput, ModuleSource

    i = bundle.task_index(int(task) if task.isdigit() and task not in bundle.tasks else task)
    mods = [
        ModuleSource(
            n,
            tuple(bundle.shapes[n]),
            factors=functools.partial(_scale_one, bundle.factors, i, n),
            embedding=n in bundle.embeddings,
        )
        for n in bundle.shapes
    ]
    return LoraInput(
        kind="rmm",
        modules=mods,
        dtype=bundle.dtype,
        base_model_name_or_path=bundle.base_model_name_or_path,
        fan_in_fan_out=bool(bundle.fan_in_fan_out),
        source={**source, "task": bundle.tasks[i], "n_basis": bundle.n_basis},
    )


def _merge_input(result: Any, source: dict[str, Any]) -> Any:
    """A :class:`~adapterlab.merging.MergeResult` in memory (``lora`` / ``lori`` factors, ``sparse`` /
    ``shira`` entries, ``rmm``: the task-average adapter)."""
    import torch

    from adapterlab.extraction.to_lora import LoraInput, ModuleSource

    if result.output == "full":
        raise ValueError("a merge with output='full' is a merged model, not an adapter; merge to a LoRA output")
    mods: list[ModuleSource] = []
    kind = "merge"
    for n, shape in result.shapes.items():
        emb = n in result.embeddings
        if result.factors is not None:
            if n in result.factors:
                mods.append(
                    ModuleSource(n, shape, factors=functools.partial(_stored, result.factors, n), embedding=emb)
                )
        elif result.bundle is not None:
            mods.append(
                ModuleSource(
                    n, shape, factors=functools.partial(_scale_one, result.bundle.factors, None, n), embedding=emb
                )
            )
        else:
            kind = "sparse"
            mods.append(ModuleSource(n, shape, delta=functools.partial(result.delta, n), embedding=emb))
    return LoraInput(
        kind=kind,
        modules=mods,
        dtype=result.dtype if isinstance(result.dtype, torch.dtype) else torch.float32,
        base_model_name_or_path=result.base_model_name_or_path,
        fan_in_fan_out=bool(result.fan_in_fan_out),
        source={**source, "method": result.method, "output": result.output},
    )


def _sparse_folder_input(folder: Path, source: dict[str, Any]) -> Any:
    """A ``sparse`` merge folder (``sparse_adapter.json`` + ``sparse_delta.safetensors``): a dense delta per module."""
    import torch

    from adapterlab.extraction.to_lora import LoraInput, ModuleSource
    from adapterlab.io import open_tensors, read_json

    info = read_json(folder / "sparse_adapter.json")
    modules = info.get("modules") if isinstance(info, dict) else None
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f"{folder / 'sparse_adapter.json'}: key 'modules' must map module names to [d_out, d_in]")
    weights = folder / "sparse_delta.safetensors"
    with open_tensors(weights) as fh:
        keys = set(fh.keys())
        dtype = next((fh.dtype(k) for k in sorted(keys) if k.endswith(".values")), None) or torch.float32

    def delta(n: str, shape: tuple[int, int]) -> Any:
        with open_tensors(weights) as fh:
            idx = fh.get(f"{n}.indices").reshape(-1).long()  # [nnz]
            val = fh.get(f"{n}.values").reshape(-1).to(torch.float32)  # [nnz]
        numel = shape[0] * shape[1]
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise ValueError(f"{weights}: module {n!r} has indices outside its {list(shape)} weight")
        flat = torch.zeros(numel)
        flat.index_add_(0, idx, val)
        return flat.view(shape)  # [d_out, d_in]

    mods = []
    for n, s in modules.items():
        if not (isinstance(s, list) and len(s) == 2 and all(isinstance(d, int) and d > 0 for d in s)):
            raise ValueError(f"{folder / 'sparse_adapter.json'}: key modules.{n} is {s!r}; expected [d_out, d_in]")
        for part in ("indices", "values"):
            if f"{n}.{part}" not in keys:
                raise ValueError(f"{weights}: missing tensor {n + '.' + part!r}")
        shape = (int(s[0]), int(s[1]))
        mods.append(ModuleSource(n, shape, delta=functools.partial(delta, n, shape)))
    return LoraInput(
        kind="sparse",
        modules=mods,
        dtype=dtype,
        base_model_name_or_path=info.get("base_model_name_or_path"),
        source={**source, "method": info.get("method"), "output": "sparse"},
    )


def build_input(
    adapter: Any,
    *,
    base: Any = None,
    member: str | None = None,
    task: str | None = None,
    dylora_rank: int | None = None,
    registry: Any = None,
) -> Any:
    """Any supported adapter (see the module docstring) as a :class:`~adapterlab.extraction.to_lora.LoraInput`."""
    from adapterlab.compression import SharedBasisBundle
    from adapterlab.extraction.to_lora import lora_input
    from adapterlab.merging import MergeResult, RMMBundle

    if isinstance(adapter, SharedBasisBundle):
        if member is None:
            raise ValueError(
                f"a shared-basis bundle holds {len(adapter.names)} adapters: choose one with --member NAME"
            )
        return _bundle_input(adapter, member, {"name": member})
    if isinstance(adapter, RMMBundle):
        if task is None:
            raise ValueError(f"an RMM bundle holds tasks {adapter.tasks}: choose one with --task NAME")
        return _rmm_input(adapter, task, {"name": task})
    if isinstance(adapter, MergeResult):
        if task is not None:
            return _rmm_input(adapter.bundle, task, {"name": task}) if adapter.bundle is not None else _no_task(adapter)
        return _merge_input(adapter, {"name": adapter.method})
    if isinstance(adapter, (str, os.PathLike)):
        text = os.fspath(adapter)
        if member is not None:  # a bundle folder or a bundle in the registry
            bundle = SharedBasisBundle.load(text, registry=registry)
            return _bundle_input(bundle, member, {"name": member, "path": text})
        folder = None if text.startswith("hub:") else Path(text).expanduser()
        if folder is not None and (folder / "compressed_config.json").is_file():
            names = SharedBasisBundle.load(folder).names
            raise ValueError(
                f"{text!r} is a shared-basis bundle of {len(names)} adapters: choose one with --member NAME "
                f"(e.g. {names[0]!r})"
            )
        if task is not None:
            if folder is None:
                from adapterlab.extraction.to_lora import _folder_of

                folder, _ = _folder_of(text, "adapter", registry)
            if not (folder / "rmm_config.json").is_file():
                raise ValueError(f"--task {task!r}: {text!r} is not an RMM merge (no rmm_config.json)")
            return _rmm_input(RMMBundle.load(folder), task, {"name": task, "path": str(folder)})
        if folder is not None and (folder / "sparse_adapter.json").is_file():
            return _sparse_folder_input(folder, {"name": folder.name, "path": str(folder)})
    if member is not None or task is not None:
        raise ValueError("--member/--task: only for a shared-basis bundle (--member) or an RMM merge (--task)")
    return lora_input(adapter, base=base, dylora_rank=dylora_rank, registry=registry)


def _no_task(result: Any) -> Any:
    raise ValueError(f"--task: a {result.method!r} merge keeps no tasks (only an rmm merge does)")


# ------------------------------------------------------------------------------------------------
# the job


def run_export(plan: ExportPlan, *, registry: Any = None, progress: ProgressFactory | None = None) -> ExportJobResult:
    """Convert the adapter and, when the plan has an output folder, write it staged (nothing partial on error)."""
    import torch

    from adapterlab.extraction.to_lora import adapter_kind, to_lora

    if registry is None and plan.hub is not None:
        from adapterlab.registry import AdapterRegistry

        registry = AdapterRegistry(plan.hub)
    rank, dylora_rank = plan.rank, None
    plain = isinstance(plan.adapter, (str, os.PathLike)) or hasattr(plan.adapter, "peft_config")
    if plain and plan.member is None and plan.task is None and rank is not None:
        text = os.fspath(plan.adapter) if isinstance(plan.adapter, (str, os.PathLike)) else ""
        folder = None if text.startswith("hub:") or not text else Path(text).expanduser()
        special = folder is not None and any(
            (folder / f).is_file() for f in ("compressed_config.json", "sparse_adapter.json")
        )
        if not special and adapter_kind(plan.adapter, registry=registry) == "ADAPTERLAB_DYLORA":
            rank, dylora_rank = None, rank  # DyLoRA's --rank picks its nested rank (exact)
    inp = build_input(
        plan.adapter, base=plan.base, member=plan.member, task=plan.task, dylora_rank=dylora_rank, registry=registry
    )
    result = to_lora(
        inp,
        rank=rank,
        energy=plan.energy,
        max_error=plan.max_error,
        for_vllm=plan.for_vllm,
        served_name=plan.served_name,
        dtype=getattr(torch, plan.dtype) if plan.dtype else None,
        progress=progress,
    )
    if plan.output is not None:
        result.save(plan.output, overwrite=plan.overwrite)
    return ExportJobResult(output=plan.output, result=result)


def put_export(plan: ExportPlan, job: ExportJobResult) -> str | None:
    """Put the written folder into the registry under ``plan.put`` (None: no put); returns the digest."""
    if plan.put is None or job.output is None:
        return None
    src = job.result.source
    provenance = {
        "kind": "imported",
        "parents": [p for p in (src.get("sha256"), src.get("ref") or src.get("path")) if p],
        "recipe": {"command": "adapterlab export", "from": job.result.kind, "settings": plan.settings()},
    }
    job.digest = put_folder(plan.hub, job.output, plan.put, provenance)
    return job.digest


def export_lora(
    adapter: Any,
    output: str | os.PathLike[str] | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_error: float | None = None,
    for_vllm: bool = False,
    served_name: str | None = None,
    base: Any = None,
    member: str | None = None,
    task: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    put: str | None = None,
    hub: str | os.PathLike[str] | None = None,
    registry: Any = None,
    progress: ProgressFactory | None = None,
) -> Any:
    """Export any adapter as a plain PEFT LoRA (what vLLM, LoRAX and SGLang serve).

    Exact where the math allows (LoRA / rsLoRA / LoRI / DyLoRA at a rank / a shared-basis member /
    an RMM task / a LoRA merge: error 0, the stored factors zero-padded); a truncated SVD with a
    per-module and total relative Frobenius error otherwise (SHiRA, SNELL, SPP, LoRS, sparse merges,
    or any ``rank`` below the adapter's). See :mod:`adapterlab.extraction.to_lora`.

    Args:
        adapter: a PEFT adapter folder, ``"hub:NAME"``, a peft model, a shared-basis bundle (folder,
            ``hub:NAME`` or object, with ``member``), an RMM merge (folder or ``RMMBundle``, with
            ``task``) or a ``MergeResult``.
        output: the folder to write (None: return the result only).
        rank: fixed rank (DyLoRA: its nested rank, exact); energy: per-module kept spectral energy.
        max_error: refuse (nothing written) when a module's relative error is above it.
        for_vllm: pad every module to one rank of vLLM's set (exact) and write ``peft_type: LORA``.
        served_name: ``base_model_name_or_path`` to write (what the server serves the base as).
        base: the base for DyLoRA / SNELL / SPP / LoRS folders (default: their recorded base).
        dtype: ``float32`` / ``float16`` / ``bfloat16`` (default: the adapter's).
        put: also put the folder into the registry (``hub``) under this name.

    Returns:
        :class:`~adapterlab.extraction.to_lora.LoraExport` (``.report()``, ``.delta(module)``, ``.save(dir)``).
    """
    plan = check_export(
        adapter,
        output=output,
        rank=rank,
        energy=energy,
        max_error=max_error,
        for_="vllm" if for_vllm else None,
        served_name=served_name,
        base=base,
        member=member,
        task=task,
        dtype=dtype,
        overwrite=overwrite,
        put=put,
        hub=hub,
    )
    job = run_export(plan, registry=registry, progress=progress)
    put_export(plan, job)
    return job.result
