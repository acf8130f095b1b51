"""Compression tests work on matrices of a few dozen rows: one intra-op thread is fastest for them
(LAPACK's threaded QR / eigh of tiny matrices spin badly on a busy machine)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
