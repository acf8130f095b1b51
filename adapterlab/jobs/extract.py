"""Extract a LoRA folder from a base and a full fine-tune (PHLoRA): the job behind ``adapterlab extract``
and the pipeline's extract step.

:func:`check_extract` validates the settings, the output folder and the registry name (loads no
weights); :func:`run_extract` extracts and writes the PEFT LoRA folder staged; :func:`put_extract`
puts the written folder into the registry with its provenance. :func:`extract_folder` does all three.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterlab.jobs._put import put_folder
from adapterlab.progress import ProgressFactory

__all__ = ["DTYPES", "ExtractJobResult", "ExtractPlan", "check_extract", "extract_folder", "put_extract", "run_extract"]

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ExtractPlan:
    """A validated extract job (see :func:`check_extract`)."""

    base: str
    tuned: str
    output: Path
    rank: int | None
    energy: float | None
    energy_scope: str
    min_rank: int
    max_rank: int | None
    randomized: bool
    solver: str
    skip_extras: bool
    threshold: float
    dtype: str | None
    overwrite: bool
    put: str | None
    hub: Path | None

    def settings(self) -> dict[str, Any]:
        """The settings recorded in the registry provenance."""
        return {
            "rank": self.rank,
            "energy": self.energy,
            "energy_scope": self.energy_scope,
            "min_rank": self.min_rank,
            "max_rank": self.max_rank,
            "randomized": self.randomized,
            "skip_extras": self.skip_extras,
            "threshold": self.threshold,
            "dtype": self.dtype,
        }


@dataclass
class ExtractJobResult:
    """What :func:`run_extract` wrote: the folder and the library's ``ExtractResult``;
    ``digest`` is set by :func:`put_extract`."""

    output: Path
    result: Any
    digest: str | None = field(default=None)


def check_extract(
    *,
    base: str,
    tuned: str,
    output: str | os.PathLike[str],
    rank: int | None = None,
    energy: float | None = None,
    energy_scope: str = "module",
    min_rank: int = 1,
    max_rank: int | None = None,
    randomized: bool = False,
    solver: str = "svd",
    skip_extras: bool = False,
    threshold: float = 1e-4,
    dtype: str | None = None,
    overwrite: bool = False,
    put: str | None = None,
    hub: str | os.PathLike[str] | None = None,
) -> ExtractPlan:
    """Validate an extract job without loading weights.

    Raises:
        ValueError / FileExistsError: one line naming the option and value.
    """
    from adapterlab.extraction.phlora import _check_settings
    from adapterlab.staging import check_output_dir

    if rank is not None and energy is not None:
        raise ValueError("--rank/--energy: give exactly one of them")
    if rank is None and energy is None:
        raise ValueError("--rank/--energy: give one of them (e.g. --energy 0.9 or --rank 16)")
    _check_settings(rank, energy, min_rank, max_rank, randomized, "skip" if skip_extras else "save")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of float32, float16, bfloat16")
    check_output_dir(output, overwrite)
    if put is not None:
        from adapterlab.registry.manifest import check_name

        check_name(put, "--put")
    return ExtractPlan(
        base=base,
        tuned=tuned,
        output=Path(output),
        rank=rank,
        energy=energy,
        energy_scope=energy_scope,
        min_rank=min_rank,
        max_rank=max_rank,
        randomized=randomized,
        solver=solver,
        skip_extras=skip_extras,
        threshold=threshold,
        dtype=dtype,
        overwrite=overwrite,
        put=put,
        hub=None if hub is None else Path(hub),
    )


def run_extract(plan: ExtractPlan, *, progress: ProgressFactory | None = None) -> ExtractJobResult:
    """Extract the adapter and write the PEFT LoRA folder (+ ``phlora_report.json``) staged."""
    import torch

    from adapterlab.extraction import extract_lora

    result = extract_lora(
        plan.base,
        plan.tuned,
        rank=plan.rank,
        energy=plan.energy,
        energy_scope=plan.energy_scope,
        randomized=plan.randomized,
        solver=plan.solver,
        min_rank=plan.min_rank,
        max_rank=plan.max_rank,
        extras="skip" if plan.skip_extras else "save",
        threshold=plan.threshold,
        dtype=getattr(torch, plan.dtype) if plan.dtype else None,
        progress=progress,
    )
    result.save(plan.output, overwrite=plan.overwrite)
    return ExtractJobResult(output=plan.output, result=result)


def put_extract(plan: ExtractPlan, job: ExtractJobResult) -> str | None:
    """Put the written folder into the registry under ``plan.put`` (None: no put); returns the digest."""
    if plan.put is None:
        return None
    from adapterlab.io import base_fingerprint
    from adapterlab.models import load_model

    provenance = {
        "kind": "extracted",
        "parents": [plan.tuned],
        "base": plan.base,
        "recipe": {"command": "adapterlab extract", "settings": plan.settings()},
    }
    job.digest = put_folder(plan.hub, job.output, plan.put, provenance, base=base_fingerprint(load_model(plan.base)))
    return job.digest


def extract_folder(
    output: str | os.PathLike[str],
    *,
    base: str,
    tuned: str,
    rank: int | None = None,
    energy: float | None = None,
    energy_scope: str = "module",
    min_rank: int = 1,
    max_rank: int | None = None,
    randomized: bool = False,
    solver: str = "svd",
    skip_extras: bool = False,
    threshold: float = 1e-4,
    dtype: str | None = None,
    overwrite: bool = False,
    put: str | None = None,
    hub: str | os.PathLike[str] | None = None,
    progress: ProgressFactory | None = None,
) -> ExtractJobResult:
    """PHLoRA: write a PEFT LoRA folder approximating ``tuned - base`` to ``output``.

    Give exactly one of ``rank`` (fixed) and ``energy`` (per-layer rank keeping that energy
    fraction). Every setting is checked before any weights load; on an error nothing is written.
    With ``put``, the folder also goes into the registry at ``hub`` (default: ``$ADAPTERLAB_HUB``,
    else ``./hub``) under that name.
    """
    plan = check_extract(
        base=base,
        tuned=tuned,
        output=output,
        rank=rank,
        energy=energy,
        energy_scope=energy_scope,
        min_rank=min_rank,
        max_rank=max_rank,
        randomized=randomized,
        solver=solver,
        skip_extras=skip_extras,
        threshold=threshold,
        dtype=dtype,
        overwrite=overwrite,
        put=put,
        hub=hub,
    )
    job = run_extract(plan, progress=progress)
    put_extract(plan, job)
    return job
