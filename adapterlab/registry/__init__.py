"""The adapter registry: a content-addressed ``hub/`` of PEFT adapter folders and shared-basis bundles.

See :class:`AdapterRegistry` and ``hub/README.md`` for the layout.
"""

from __future__ import annotations

from adapterlab.registry.manifest import PROVENANCE_KINDS, object_digest
from adapterlab.registry.store import AdapterRegistry, BaseMismatchError, RefNotFoundError

__all__ = ["AdapterRegistry", "BaseMismatchError", "PROVENANCE_KINDS", "RefNotFoundError", "object_digest"]
