"""`adapterlab compress`: many LoRA adapters -> one shared-basis bundle (Compress then Serve)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from adapterlab.cli._common import console, hub_option, progress, resolve_hub, setup_logging, user_errors

logger = logging.getLogger(__name__)

HELP = (
    "Jointly compress LoRA adapters of one base into shared per-module bases U, V and a small core per "
    "adapter (c x c with --mode full, c numbers with --mode diagonal), optionally in --clusters K groups. "
    "Adapters are PEFT LoRA folders or hub:NAME refs. Writes compressed_config.json, bases.safetensors "
    "and sigmas.safetensors to OUTPUT and prints per-adapter / per-layer relative reconstruction errors "
    "and sizes. Export one adapter back to a PEFT folder with SharedBasisBundle.export."
)


def _size(params: float) -> str:
    b = 4 * params
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} GiB"  # pragma: no cover


def adapter_table(bundle: Any, output: Path, limit: int = 40) -> Table:
    st = bundle.storage()
    table = Table(title=f"adapterlab compress -> {output}  ({bundle.mode}, rank {bundle.rank})")
    for col in ("adapter", "cluster", "mean error", "worst layer", "raw LoRA", "core"):
        table.add_column(col, justify="left" if col == "adapter" else "right", overflow="fold")
    mean, worst = bundle.errors.per_adapter(), bundle.errors.max_per_adapter()
    for i, name in enumerate(bundle.names[:limit]):
        table.add_row(
            name,
            str(int(bundle.group[i])),
            f"{mean[name]:.3e}",
            f"{worst[name]:.3e}",
            _size(bundle.raw_params[i]),
            _size(st["core_params_per_adapter"]),
        )
    if len(bundle.names) > limit:
        table.add_row(f"... {len(bundle.names) - limit} more", "", "", "", "", "")
    table.caption = (
        f"{st['adapters']} adapters, {st['clusters']} cluster(s): raw LoRAs {_size(st['raw_params'])} -> "
        f"bundle {_size(st['compressed_params'])} (bases {_size(st['bases_params'])} + cores "
        f"{_size(st['cores_params'])}), {st['ratio']:.1f}x smaller; mean relative squared error "
        f"{bundle.errors.mean:.3e}; {bundle.settings.get('seconds', 0):.2f} s"
    )
    return table


def layer_table(bundle: Any, limit: int = 40) -> Table:
    table = Table(title="per layer")
    for col in ("module", "shape", "mean error", "worst adapter", "bases"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    per = bundle.errors.per_layer()
    worst = bundle.errors.values.max(0).values
    G = bundle.n_clusters
    for j, mod in enumerate(bundle.module_names[:limit]):
        d_out, d_in = bundle.shapes[mod]
        table.add_row(
            mod, f"{d_out}x{d_in}", f"{per[mod]:.3e}", f"{float(worst[j]):.3e}", _size(G * bundle.rank * (d_out + d_in))
        )
    if len(bundle.module_names) > limit:
        table.add_row(f"... {len(bundle.module_names) - limit} more", "", "", "", "")
    return table


@user_errors
def command(
    adapters: list[str] = typer.Argument(..., help="PEFT LoRA folders or hub:NAME refs (two or more make sense)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder to write the bundle to."),
    rank: int = typer.Option(..., "--rank", "-r", help="Shared rank c (n*r is exact)."),
    mode: str = typer.Option("full", "--mode", "-m", help="full (c x c core per adapter) or diagonal (c numbers)."),
    clusters: int | None = typer.Option(None, "--clusters", "-k", help="Number of clusters, each with its own bases."),
    niter: int | None = typer.Option(None, "--niter", help="Iterations (default 10 full, 100 diagonal)."),
    init: str = typer.Option("spectral", "--init", help="spectral, random, or block (diagonal only)."),
    normalization: str = typer.Option("normalize_BA", "--normalization", help="normalize_BA, normalize or none."),
    seed: int = typer.Option(0, "--seed"),
    allow_mixed_ranks: bool = typer.Option(
        False, "--allow-mixed-ranks", help="Accept adapters of different ranks / target modules."
    ),
    no_check_base: bool = typer.Option(
        False, "--no-check-base", help="Do not compare base_model_name_or_path (shapes are still checked)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty output folder."),
    put: str | None = typer.Option(None, "--put", help="Also store the bundle in the registry under this name."),
    hub: Path | None = hub_option("Registry root for --put and hub: refs"),
    rows: int = typer.Option(40, "--rows", help="Rows shown per table."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    from adapterlab.compression import MODES, compress_adapters
    from adapterlab.compression.functional import INITS, NORMALIZATIONS
    from adapterlab.progress import rich_factory
    from adapterlab.staging import check_output_dir

    setup_logging(verbose)
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if init not in INITS:
        raise ValueError(f"--init {init!r}: choose one of {', '.join(INITS)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"--normalization {normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if rank < 1:
        raise ValueError(f"--rank must be an integer >= 1, got {rank}")
    check_output_dir(output, overwrite)
    from adapterlab.registry import AdapterRegistry

    if put is not None:
        from adapterlab.registry.manifest import check_name

        check_name(put)
    registry = AdapterRegistry(resolve_hub(hub))  # hub: refs and --put (reads of a missing root find nothing)
    with progress() as prog:
        bundle = compress_adapters(
            adapters,
            rank=rank,
            mode=mode,
            clusters=clusters,
            niter=niter,
            init=init,
            normalization=normalization,
            seed=seed,
            allow_mixed_ranks=allow_mixed_ranks,
            check_base=not no_check_base,
            progress=rich_factory(prog),
            registry=registry,
        )
    bundle.save(output, overwrite=overwrite)
    console.print(adapter_table(bundle, output, rows))
    console.print(layer_table(bundle, rows))
    console.print(f"wrote {output}")
    if put is not None:
        parents = [s.get("sha256") or s.get("path") or s.get("name") for s in bundle.sources]
        digest = registry.put_bundle(
            output,
            put,
            provenance={
                "kind": "compressed",
                "parents": [p for p in parents if p],
                "recipe": {"rank": rank, "mode": mode, "clusters": clusters},
            },
        )
        console.print(f"registry {registry.root}: {put} -> {digest[:12]}")
