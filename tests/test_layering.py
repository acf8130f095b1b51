"""The architecture picture in CONTRIBUTING.md is enforced: every import of the package runs down the layers.

The layer table is read from CONTRIBUTING.md ("## Architecture"), so the document and the code cannot
drift apart. Every import counts — top-level, function-local and ``if TYPE_CHECKING:`` alike — because a
hidden import is still an arrow.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "adapterlab"


def _layers() -> list[tuple[str, list[str]]]:
    """``[(layer, [module prefixes])]`` from the table in CONTRIBUTING.md, top layer first."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    section = text.split("## Architecture", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0] or set(cells[0]) <= {"-", ":"} or cells[0] == "layer":
            continue
        if not line.lstrip().startswith("|"):
            continue
        mods = re.findall(r"`(adapterlab[\w.]*)`", cells[1])
        if mods:
            rows.append((cells[0], mods))
    return rows


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module a dotted import target lives in (``adapterlab.x.y.Name`` -> ``adapterlab.x.y``)."""
    while name and name not in MODULES:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def _imports(module: str, path: Path) -> set[tuple[str, int]]:
    """``{(imported adapterlab module, line)}`` of every import statement in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] or [mod]
        for t in targets:
            if t == "adapterlab" or t.startswith("adapterlab."):
                got = _resolve(t)
                if got is not None and got != module:
                    found.add((got, node.lineno))
    return found


EDGES = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """Index of the layer whose longest prefix matches (``adapterlab`` itself matches only exactly)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if (module == p or (p != "adapterlab" and module.startswith(p + "."))) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def _unit(module: str, layers: list[tuple[str, list[str]]]) -> str:
    """The table entry (package or module) a module belongs to."""
    best = module
    for _, prefixes in layers:
        for p in prefixes:
            if module == p or (p != "adapterlab" and module.startswith(p + ".")):
                best = p
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_table_is_read() -> None:
    layers = _layers()
    names = [n for n, _ in layers]
    assert names[0] == "cli" and names[-1] == "core", names
    assert len(layers) >= 6


def test_every_module_has_a_layer() -> None:
    layers = _layers()
    missing = sorted(m for m in MODULES if _layer_of(m, layers) is None)
    assert not missing, f"modules without a layer in CONTRIBUTING.md's Architecture table: {missing}"


def test_imports_run_down_the_layers() -> None:
    layers = _layers()
    bad = []
    for module, targets in EDGES.items():
        src = _layer_of(module, layers)
        for target, line in targets:
            dst = _layer_of(target, layers)
            if src is None or dst is None:
                continue
            if dst < src:  # a lower row may not import a higher one
                bad.append(f"{module}:{line} ({layers[src][0]}) imports {target} ({layers[dst][0]})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_library_module_imports_the_cli() -> None:
    """Only the cli row (``adapterlab.cli``, and ``adapterlab.__main__`` that starts it) imports the CLI."""
    cli = _layers()[0][1]
    bad = [
        f"{m}:{line}"
        for m, targets in EDGES.items()
        if not any(m == p or m.startswith(p + ".") for p in cli)
        for t, line in targets
        if t.startswith("adapterlab.cli")
    ]
    assert not bad, bad


def test_no_import_circle_between_modules() -> None:
    graph = {m: {t for t, _ in ts} for m, ts in EDGES.items()}
    assert not _cycles(graph), _cycles(graph)


def test_no_import_circle_between_packages() -> None:
    """Within one layer packages may import each other, but never both ways (through any module)."""
    layers = _layers()
    graph: dict[str, set[str]] = defaultdict(set)
    for m, ts in EDGES.items():
        for t, _ in ts:
            a, b = _unit(m, layers), _unit(t, layers)
            if a != b:
                graph[a].add(b)
    assert not _cycles(dict(graph)), _cycles(dict(graph))


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycle_finder(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_the_checker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    """The walker finds function-local and TYPE_CHECKING imports, relative ones included."""
    src = tmp_path / "probe.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from adapterlab.cli.app import app\n"
        "def f():\n    from ..merging import combine\n",
        encoding="utf-8",
    )
    got = {t for t, _ in _imports("adapterlab.jobs.probe", src)}
    assert got == {"adapterlab.cli.app", "adapterlab.merging.combine"}
