"""Put a job's output folder into the adapter registry (``--put NAME`` of merge / extract)."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["put_folder"]


def put_folder(
    hub: str | os.PathLike[str] | None,
    folder: str | os.PathLike[str],
    name: str,
    provenance: dict[str, Any],
    base: Any = None,
) -> str:
    """``AdapterRegistry(hub).put(folder, name, ...)``; returns the digest.

    Args:
        hub: the registry root (None: ``$ADAPTERLAB_HUB``, else ``./hub``).
        folder: a PEFT adapter folder a job wrote.
        name: the ref name to point at it.
        provenance: what made it (kind, parents, recipe / settings).
        base: the base's fingerprint (or model) to record, or None.
    """
    from adapterlab.registry import AdapterRegistry

    return AdapterRegistry(hub).put(folder, name, provenance=provenance, base=base)
