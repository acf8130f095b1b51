"""`adapterlab compensate`: a training-free LoRA that compensates what pruning / quantization removed (EoRA)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from adapterlab.cli._common import console, progress, setup_logging, user_errors

logger = logging.getLogger(__name__)

HELP = (
    "Compensate a compressed base without training (EoRA): for every pruned or bitsandbytes-quantized linear "
    "of the decoder blocks, the error W_dense - W_compressed is approximated at rank --rank (or per layer by "
    "--energy) in the eigenspace of the layer's calibration input covariance on the COMPRESSED model "
    "(--space activation, minimises the output error), or by a plain SVD (--space weight). Calibration windows "
    "come from a packaged corpus' training split (--corpus). Writes a PEFT LoRA folder for the compressed base plus "
    "compensation_report.json to OUTPUT."
)

DTYPES = ("float32", "float16", "bfloat16")


def _summary(result: Any, output: Path, limit: int = 24) -> Table:
    table = Table(title=f"adapterlab compensate ({result.settings['space']} space) -> {output}")
    for col in ("module", "compression", "sparsity", "rank", "energy", "|E|/|W|", "time"):
        table.add_column(col, justify="left" if col in ("module", "compression") else "right")
    rows = [m for m in result.modules if m.compression != "unchanged"]
    for m in rows[:limit]:
        table.add_row(
            m.name.removeprefix("model.layers."),
            m.compression,
            f"{m.sparsity:.2%}",
            str(m.rank),
            "-" if m.energy is None else f"{m.energy:.4f}",
            f"{m.error_rel:.3f}",
            f"{m.seconds * 1000:.0f} ms",
        )
    if len(rows) > limit:
        table.add_row(f"... {len(rows) - limit} more", "", "", "", "", "", "")
    table.caption = (
        f"{len(result.factors)} LoRA modules, {len(result.modules) - len(rows)} unchanged; "
        f"{result.n_params():,} parameters; {result.seconds:.1f} s"
    )
    return table


def _tokenizer(compressed: str, dense: str) -> Any:
    from adapterlab.models import load_tokenizer

    for source in (compressed, dense):
        try:
            return load_tokenizer(source)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    raise ValueError(
        f"--compressed {compressed!r}: no tokenizer in this folder or in --dense {dense!r}; "
        f"the calibration windows need one (save the tokenizer next to the model)"
    )


@user_errors
def command(
    dense: str = typer.Option(
        ..., "--dense", "-d", help="Uncompressed model folder, or 'default' (embedded SmolLM2-135M-Instruct)."
    ),
    compressed: str = typer.Option(
        ..., "--compressed", "-c", help="Pruned and/or bitsandbytes-quantized model folder of the same architecture."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the PEFT LoRA adapter to."),
    rank: int | None = typer.Option(None, "--rank", "-r", help="Fixed rank for every layer."),
    energy: float | None = typer.Option(
        None, "--energy", "-e", help="Per-layer rank: smallest k keeping this fraction of the error energy, in (0, 1]."
    ),
    energy_scope: str = typer.Option(
        "module",
        "--energy-scope",
        help="module: each layer keeps --energy of its own error; global: the fewest parameters that keep --energy "
        "of the whole model's error.",
    ),
    space: str = typer.Option(
        "activation", "--space", help="activation (EoRA: minimise the output error) or weight (plain SVD)."
    ),
    nsamples: int = typer.Option(64, "--nsamples", help="Calibration windows (activation space)."),
    seqlen: int = typer.Option(512, "--seqlen", help="Tokens per calibration window."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration windows."),
    corpus: str = typer.Option("wiki", "--corpus", help="Packaged corpus of the calibration windows: wiki or lee."),
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward pass."),
    percdamp: float = typer.Option(
        0.01, "--percdamp", help="Dampening of the input covariance, a fraction of its mean diagonal."
    ),
    min_rank: int = typer.Option(1, "--min-rank", help="Lower clip of the energy rank."),
    max_rank: int | None = typer.Option(None, "--max-rank", help="Upper clip of the energy rank."),
    dtype: str = typer.Option("float32", "--dtype", help="Saved adapter dtype: float32, float16 or bfloat16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    put: str | None = typer.Option(None, "--put", help="Also put the adapter into the registry under this name."),
    hub: Path | None = typer.Option(
        None, "--hub", envvar="ADAPTERLAB_HUB", help="Registry root for --put (default ./hub)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    if rank is not None and energy is not None:
        raise ValueError("--rank/--energy: give exactly one of them")
    if rank is None and energy is None:
        raise ValueError("--rank/--energy: give one of them (e.g. --rank 32 or --energy 0.5)")
    for opt, value in (("--nsamples", nsamples), ("--seqlen", seqlen), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{opt} must be a positive integer, got {value}")
    if corpus not in ("wiki", "lee"):
        raise ValueError(f"--corpus {corpus!r}: choose one of wiki, lee")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    import torch

    from adapterlab.extraction.compensate import _check_settings, compensate, load_compressed
    from adapterlab.models import check_model_folder
    from adapterlab.progress import rich_factory
    from adapterlab.staging import check_output_dir

    _check_settings(rank, energy, energy_scope, space, percdamp, min_rank, max_rank, "svd", batch_size)
    check_output_dir(output, overwrite)
    check_model_folder(dense, "--dense")
    check_model_folder(compressed, "--compressed")
    if put is not None:
        from adapterlab.registry.manifest import check_name

        check_name(put, "--put")
    setup_logging(verbose)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own rich bar shows the progress
    with console.status(f"loading {compressed!r}"):
        model, _ = load_compressed(compressed)
    calibration, info = None, None
    if space == "activation":
        from adapterlab import data

        tok = _tokenizer(compressed, dense)
        calibration = data.calibration_ids(tok, n_samples=nsamples, seqlen=seqlen, seed=seed, corpus=corpus)
        info = {"corpus": corpus, "split": "train", "seed": seed}
    with progress() as prog:
        result = compensate(
            dense,
            model,
            rank=rank,
            energy=energy,
            energy_scope=energy_scope,
            calibration=calibration,
            space=space,
            percdamp=percdamp,
            min_rank=min_rank,
            max_rank=max_rank,
            batch_size=batch_size,
            dtype=getattr(torch, dtype),
            calibration_info=info,
            progress=rich_factory(prog),
        )
    result.base_model_name_or_path = compressed
    result.sources["compressed"]["path"] = compressed
    result.save(output, overwrite=overwrite)
    console.print(_summary(result, output))
    console.print(f"wrote {output}")
    if put is not None:
        from adapterlab.io import base_fingerprint
        from adapterlab.registry import AdapterRegistry

        provenance = {
            "kind": "extracted",  # from two checkpoints, like PHLoRA: dense - compressed
            "parents": [dense],
            "base": compressed,
            "recipe": {"command": "adapterlab compensate", "settings": result.settings, "dense": dense},
        }
        digest = AdapterRegistry(hub).put(output, put, provenance=provenance, base=base_fingerprint(model))
        console.print(f"put {output} -> hub:{put} ({digest[:12]})", highlight=False)
