"""Several :class:`~adapterlab.serving.AdapterServer` objects on one model object.

Servers built on the same model (e.g. a notebook cell run twice) share its modules and weights:
one lock per model serialises them, and the server that runs first *claims* the model: the layer
wrappers of any other server are swapped back to the plain layers (their fused SHiRA entries
restored first) and its own wrappers go in. Each server therefore always runs on, and fingerprints,
the original base weights.
"""

from __future__ import annotations

import logging
import threading
import weakref

from torch import nn

from adapterlab.serving.layer import MultiAdapterLinear
from adapterlab.serving.router import BatchRouter

__all__ = ["claim", "model_lock", "set_child"]

logger = logging.getLogger(__name__)

_GUARD = threading.Lock()
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_OWNERS: weakref.WeakKeyDictionary[nn.Module, BatchRouter] = weakref.WeakKeyDictionary()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one re-entrant lock every server on ``model`` takes (created on first use)."""
    with _GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule ``model.<name>`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def claim(model: nn.Module, router: BatchRouter) -> None:
    """Make ``router``'s wrappers the ones installed in ``model`` (call under :func:`model_lock`).

    Other routers' fused SHiRA entries are restored and their wrappers replaced by the plain layers
    they wrap; a router that is already the owner costs one dictionary lookup.
    """
    if _OWNERS.get(model) is router:
        return
    foreign = [
        (name, m) for name, m in model.named_modules() if isinstance(m, MultiAdapterLinear) and m._router is not router
    ]
    for other in {id(m._router): m._router for _, m in foreign}.values():
        other.unfuse()
    for name, module in foreign:
        set_child(model, name, module.base_layer)
    for name, wrapper in router.wrappers.items():
        set_child(model, name, wrapper)
    _OWNERS[model] = router
    if foreign:
        logger.info("AdapterServer: took over %d wrapped layers of the model from another server", len(foreign))
