"""PNG plots of adapterlab results (matplotlib, imported lazily; install the ``[plots]`` extra).

Each function takes a result object or its JSON form, writes one PNG and returns its path:

* :func:`plot_extraction_energy` — PHLoRA: energy kept per layer and the spectrum's cumulative energy;
* :func:`plot_dylora_accuracy` — accuracy vs rank for DyLoRA against separately trained LoRAs
  (``bench/results/lowrank.json``);
* :func:`plot_layer_sparsity` — sparsity per decoder layer (``SparsityReport`` / ``PruneReport``);
* :func:`plot_serving_throughput` — tokens/s vs number of adapters (``bench/results/serving*.json``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_dylora_accuracy", "plot_extraction_energy", "plot_layer_sparsity", "plot_serving_throughput"]

_LAYER = re.compile(r"layers\.(\d+)\.")
_SERVING_LABELS = {
    "merged": "merged into base (1 adapter, reference)",
    "peft": "peft (one adapter per forward)",
    "grouped": "adapterlab grouped LoRA",
    "shared_full": "adapterlab shared basis (full cores)",
    "shared_diag": "adapterlab shared basis (diagonal cores)",
}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("adapterlab.plots needs matplotlib: pip install 'adapterlab[plots]'") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _load_json(src: str | os.PathLike[str] | Mapping[str, Any], what: str) -> dict[str, Any]:
    if isinstance(src, Mapping):
        return dict(src)
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_path(path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {str(out)!r}")
    return out


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    out = _check_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def _split_name(name: str) -> tuple[int | None, str]:
    m = _LAYER.search(name)
    return (int(m.group(1)) if m else None), name.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------
# extraction


def plot_extraction_energy(result: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Singular-value energy of a PHLoRA extraction, per layer.

    Left: the fraction of ``‖ΔW‖²`` kept at the extracted rank, per decoder layer and projection.
    Right: cumulative energy ``Σ_{i≤k} σ_i² / ‖ΔW‖²`` of the leading singular values of each module
    (colour = layer), with the chosen ranks marked.

    Args:
        result: an :class:`~adapterlab.extraction.ExtractResult`, its ``report()`` dict (also the
            ``phlora_report.json`` an extraction writes), or a list of module rows.
        path: the PNG to write.
    """
    _check_path(path)
    if hasattr(result, "modules") and not isinstance(result, Mapping):
        rows = [m.to_dict() if hasattr(m, "to_dict") else dict(m) for m in result.modules]
        glob = getattr(result, "global_energy", None)
    elif isinstance(result, Mapping):
        rows, glob = list(result.get("modules", [])), result.get("global_energy")
    else:
        rows, glob = [dict(m) for m in result], None
    rows = [r for r in rows if r.get("stored_as") == "lora" and r.get("energy") is not None]
    if not rows:
        raise ValueError(
            "plot_extraction_energy: the result has no LoRA modules with an energy (nothing was extracted)"
        )
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_proj: dict[str, dict[int, float]] = defaultdict(dict)
    for i, r in enumerate(rows):
        layer, proj = _split_name(r["name"])
        by_proj[proj][layer if layer is not None else i] = 100.0 * float(r["energy"])
    projs = sorted(by_proj)
    layers = sorted({layer for d in by_proj.values() for layer in d})
    width = 0.8 / len(projs)
    for j, proj in enumerate(projs):
        xs = [layers.index(layer) + (j - (len(projs) - 1) / 2) * width for layer in by_proj[proj]]
        ax1.bar(xs, list(by_proj[proj].values()), width=width, label=proj)
    ax1.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax1.set_xlabel("decoder layer")
    ax1.set_ylabel("energy kept at the extracted rank (%)")
    ax1.set_ylim(0, 105)
    ax1.legend(title="projection", fontsize=8)
    ax1.set_title("energy kept per layer" + (f" (global {100 * glob:.1f} %)" if glob is not None else ""))
    cmap = plt.get_cmap("viridis")
    lo, hi = (min(layers), max(layers)) if layers else (0, 1)
    for r in rows:
        spec = [float(s) for s in r.get("spectrum_head", [])]
        total = float(r.get("delta_norm", 0.0)) ** 2
        if not spec or total <= 0:
            continue
        cum, acc = [], 0.0
        for s in spec:  # a handful of values per module
            acc += s * s
            cum.append(min(100.0, 100.0 * acc / total))
        layer, _ = _split_name(r["name"])
        colour = cmap((layer - lo) / max(hi - lo, 1) if layer is not None else 0.5)
        ax2.plot(range(1, len(cum) + 1), cum, color=colour, alpha=0.7, lw=1)
        k = r.get("rank")
        if k and k <= len(cum):
            ax2.plot([k], [cum[k - 1]], "o", color=colour, ms=3)
    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_xlabel("number of singular values k")
    ax2.set_ylabel("cumulative energy Σσ² / ‖ΔW‖² (%)")
    ax2.set_ylim(0, 105)
    ax2.set_title("spectrum of each ΔW (dot = extracted rank)")
    if hi > lo:
        sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(lo, hi))
        fig.colorbar(sm, ax=ax2, label="decoder layer", ticks=MaxNLocator(integer=True))
    fig.suptitle(title or "PHLoRA extraction: singular-value energy")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# DyLoRA


def plot_dylora_accuracy(lowrank: str | os.PathLike[str] | Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Accuracy vs rank: one DyLoRA adapter truncated to each rank vs a LoRA trained at that rank.

    Args:
        lowrank: ``bench/results/lowrank.json`` (or its dict): arms ``dylora_*`` with
            ``accuracy_at_rank``, ``lora_r{k}`` with ``accuracy``, optional ``zero_shot``.
        path: the PNG to write.
    """
    _check_path(path)
    data = _load_json(lowrank, "plot_dylora_accuracy")
    arms = data.get("arms", data)
    dylora = {
        k: v for k, v in arms.items() if k.startswith("dylora") and isinstance(v, Mapping) and "accuracy_at_rank" in v
    }
    lora = {}
    for k, v in arms.items():
        m = re.fullmatch(r"lora_r(\d+)", k)
        if m and isinstance(v, Mapping) and "accuracy" in v:
            lora[int(m.group(1))] = float(v["accuracy"])
    if not dylora and not lora:
        raise ValueError("plot_dylora_accuracy: no 'dylora_*' arm with accuracy_at_rank and no 'lora_r<k>' arm found")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ranks_seen: set[int] = set()
    if lora:
        ks = sorted(lora)
        ax.plot(ks, [100 * lora[k] for k in ks], "s-", color="black", label="LoRA trained at each rank")
        ranks_seen.update(ks)
    for name, arm in sorted(dylora.items()):
        acc = {int(k): float(v) for k, v in arm["accuracy_at_rank"].items()}
        ks = sorted(acc)
        ax.plot(ks, [100 * acc[k] for k in ks], "o-", label=f"{name.replace('_', ' ')} (one adapter, truncated)")
        ranks_seen.update(ks)
    zs = arms.get("zero_shot")
    if isinstance(zs, Mapping) and "accuracy" in zs:
        ax.axhline(100 * float(zs["accuracy"]), ls="--", color="grey", label="zero-shot base")
    ax.set_xscale("log", base=2)
    ticks = sorted(ranks_seen)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("rank")
    ax.set_ylabel("task accuracy (%)")
    settings = data.get("settings", {})
    task = settings.get("task", "task")
    steps = settings.get("steps")
    ax.set_title(f"DyLoRA vs LoRA: {task} accuracy vs rank" + (f" ({steps} steps)" if steps else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# sparsity


def _layer_rows(report: Any) -> list[tuple[str, float]]:
    if hasattr(report, "layers") and not isinstance(report, Mapping):
        return [(r.name, float(r.zeros) / float(r.numel) if r.numel else 0.0) for r in report.layers]
    rows = report.get("layers", []) if isinstance(report, Mapping) else report
    out = []
    for r in rows:
        if "sparsity" in r:
            out.append((r["name"], float(r["sparsity"])))
        else:
            out.append((r["name"], float(r["zeros"]) / float(r["numel"]) if r["numel"] else 0.0))
    return out


def plot_layer_sparsity(reports: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Sparsity per decoder layer.

    One report: one line per projection type. Several (a ``{label: report}`` mapping): one line per
    report, the layer's sparsity over all its projections (zeros / entries weighted equally per matrix).

    Args:
        reports: a :class:`~adapterlab.evaluate.SparsityReport`, a :class:`~adapterlab.pruning.PruneReport`,
            their ``to_dict()``, a list of ``{"name", "sparsity"}`` rows, or a mapping label -> any of these.
        path: the PNG to write.
    """
    _check_path(path)
    single = not (isinstance(reports, Mapping) and "layers" not in reports)
    series: dict[str, dict[int, list[float]]] = {}
    if single:
        for name, s in _layer_rows(reports):
            layer, proj = _split_name(name)
            if layer is not None:
                series.setdefault(proj, defaultdict(list))[layer].append(100 * s)
    else:
        for label, rep in reports.items():
            for name, s in _layer_rows(rep):
                layer, _ = _split_name(name)
                if layer is not None:
                    series.setdefault(str(label), defaultdict(list))[layer].append(100 * s)
    if not series:
        raise ValueError("plot_layer_sparsity: no decoder-layer rows (names like 'model.layers.3.mlp.up_proj') found")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for label, per_layer in series.items():
        layers = sorted(per_layer)
        ax.plot(layers, [sum(per_layer[i]) / len(per_layer[i]) for i in layers], "o-", ms=3, label=label)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (% zeros)")
    top = max(max(sum(v) / len(v) for v in d.values()) for d in series.values())
    ax.set_ylim(0, max(5.0, min(100.0, math.ceil(top / 10) * 10 + 5)))
    ax.grid(alpha=0.3)
    ax.legend(title="projection" if single else None, fontsize=8, ncol=2)
    ax.set_title(title or "sparsity per decoder layer")
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------
# serving


def plot_serving_throughput(
    results: str | os.PathLike[str] | Mapping[str, Any] | Sequence[str | os.PathLike[str] | Mapping[str, Any]],
    path: str | os.PathLike[str],
) -> Path:
    """Tokens/s vs number of adapters in the pool, one panel per serving benchmark result.

    Args:
        results: one or more ``bench/results/serving*.json`` (or dicts): ``rows`` with ``pool`` and
            ``tokens_per_s`` per arm.
        path: the PNG to write.
    """
    _check_path(path)
    items = [results] if isinstance(results, (str, os.PathLike, Mapping)) else list(results)
    datas = [_load_json(r, "plot_serving_throughput") for r in items]
    datas = [d for d in datas if d.get("rows")]
    if not datas:
        raise ValueError("plot_serving_throughput: no result with 'rows' (pool, tokens_per_s) given")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(datas), figsize=(6.2 * len(datas), 4.4), squeeze=False)
    for ax, d in zip(axes[0], datas):
        rows = sorted(d["rows"], key=lambda r: r["pool"])
        arms = list(rows[0]["tokens_per_s"])
        pools = [r["pool"] for r in rows]
        for arm in arms:
            ax.plot(
                pools,
                [r["tokens_per_s"].get(arm, float("nan")) for r in rows],
                marker="o",
                ms=4,
                label=_SERVING_LABELS.get(arm, arm),
                ls="--" if arm == "merged" else "-",
            )
        ax.set_xscale("log")
        ax.set_xticks(pools, [str(p) for p in pools])
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("tokens / s")
        s, m = d.get("settings", {}), d.get("machine", {})
        dev = s.get("device", "cpu")
        where = f"{dev}, {m.get('cpu_count', '?')} CPU cores" if dev == "cpu" else dev
        ax.set_title(
            f"{where}: {s.get('requests', '?')} requests, rank {s.get('rank', '?')}, {s.get('dtype', '')}", fontsize=10
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("multi-adapter serving throughput vs number of adapters")
    return _save(fig, path)
