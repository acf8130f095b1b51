"""Render PNG plots next to the benchmark results from whatever result JSONs exist.

    python bench/plots.py                        # bench/results/*.json -> bench/results/*.png
    python bench/plots.py --demo out/demo/results.json   # also the demo's per-layer sparsity / PHLoRA energy

Writes (when the inputs exist): lowrank_dylora.png (from lowrank.json), serving_throughput.png (from
serving*.json, one panel per full run; *_quick.json only when nothing else exists),
demo_layer_sparsity.png and demo_extract_energy.png (from the demo's results.json), and any
phlora_report.json found under bench/results/ as <folder>_energy.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapterlab import plots  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.plots")


def render(results: Path, demo: Path | None) -> list[Path]:
    written: list[Path] = []
    lowrank = results / "lowrank.json"
    if lowrank.is_file():
        written.append(plots.plot_dylora_accuracy(lowrank, results / "lowrank_dylora.png"))
    serving = sorted(p for p in results.glob("serving*.json") if not p.stem.endswith("_quick"))
    serving = serving or sorted(results.glob("serving*_quick.json"))
    if serving:
        written.append(plots.plot_serving_throughput(serving, results / "serving_throughput.png"))
    for report in sorted(results.rglob("phlora_report.json")):
        written.append(
            plots.plot_extraction_energy(json.loads(report.read_text()), results / f"{report.parent.name}_energy.png")
        )
    if demo is not None:
        data = json.loads(demo.read_text())
        details = data.get("details", {})
        if details.get("sparsity_layers"):
            written.append(
                plots.plot_layer_sparsity(
                    details["sparsity_layers"],
                    results / "demo_layer_sparsity.png",
                    title="demo: sparsity per decoder layer by pruning method",
                )
            )
        if details.get("extract", {}).get("modules"):
            written.append(
                plots.plot_extraction_energy(
                    details["extract"],
                    results / "demo_extract_energy.png",
                    title="demo: PHLoRA of the merged LoRS adapter",
                )
            )
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSONs (PNGs are written there)")
    ap.add_argument(
        "--demo",
        type=Path,
        default=None,
        help="results.json of `adapterlab demo` (default out/demo/results.json if present)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    demo = args.demo
    if demo is None and Path("out/demo/results.json").is_file():
        demo = Path("out/demo/results.json")
    if demo is not None and not demo.is_file():
        ap.error(f"--demo: no such file {str(demo)!r}")
    for path in render(args.results, demo):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
