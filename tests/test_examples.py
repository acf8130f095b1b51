"""Every example compiles, has a module docstring and a ``__main__`` guard, and is listed in examples/README.md.

The examples themselves run for minutes on the embedded model and are not run here (each has a
``--smoke`` mode on a tiny model for a manual check).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


def test_there_is_one_example_per_capability():
    names = {p.stem for p in SCRIPTS}
    assert {
        "train_lowrank",
        "train_sparse",
        "train_sparsity_preserving",
        "prune_perp",
        "merge_ties_rmm",
        "extract_phlora",
        "compress_serve",
    } <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_compiles_with_docstring_and_main_guard(path):
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    compile(tree, str(path), "exec")
    doc = ast.get_docstring(tree)
    assert doc and len(doc.splitlines()[0]) > 20, f"{path.name}: needs a module docstring saying what it shows"
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert guards, f'{path.name}: needs an `if __name__ == "__main__":` guard'
    assert "print(" in source, f"{path.name}: should print its result"


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_example_is_listed_in_the_readme(path):
    assert path.name in (EXAMPLES / "README.md").read_text(encoding="utf-8")
