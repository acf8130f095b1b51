from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _assets_present() -> bool:
    try:
        from adapterlab.assets import missing

        return not missing()
    except Exception:  # noqa: BLE001 - any failure to locate assets means "not present"
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``assets`` need `adapterlab assets`; CI sets ADAPTERLAB_REQUIRE_ASSETS=1 so they
    fail instead of skipping when the assets are missing."""
    if _assets_present() or os.environ.get("ADAPTERLAB_REQUIRE_ASSETS") == "1":
        return
    skip = pytest.mark.skip(reason="embedded assets missing: run `adapterlab assets`")
    for item in items:
        if "assets" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def tiny_model():
    from adapterlab.models import tiny_llama

    return tiny_llama()
