"""Parametrizes ``TunerMatrix`` subclasses over their ``cases`` (see matrix.py)."""

from __future__ import annotations


def pytest_generate_tests(metafunc):
    cases = getattr(metafunc.cls, "cases", None)
    if cases is not None and "case" in metafunc.fixturenames:
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
