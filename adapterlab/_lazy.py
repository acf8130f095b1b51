"""Lazy package attributes and the registration of adapterlab's tuners with peft.

``import adapterlab`` used to import the whole library (torch, transformers, peft, bitsandbytes:
about 5 s of CPU) just to register the tuners with peft, and the CLI paid that on every
``adapterlab --help`` because ``adapterlab.cli.app`` lives inside the package. Two pieces make it
cheap while keeping the contract "after ``import adapterlab``, peft loads adapterlab adapters":

* :func:`lazy_getattr` backs the package's PEP 562 ``__getattr__``: a public name is imported from
  its module on first access (``from adapterlab import ShiraConfig`` works as before).
* :func:`register_tuners_with_peft` registers the tuners **when peft is imported**, not when
  adapterlab is. If peft is already imported it imports ``adapterlab.tuners`` at once (each tuner
  package registers itself). Otherwise it puts a :class:`PeftImportHook` first on ``sys.meta_path``
  that, for the one module name ``peft``, lets the normal finders find it and runs the
  registration right after ``peft/__init__.py`` has executed, before the ``import peft`` statement
  returns.

Why a post-import hook rather than the alternatives:

* Registering eagerly in ``adapterlab/__init__.py`` and letting "the CLI bootstrap skip it" is not
  possible: the console script imports ``adapterlab.cli.app``, and Python runs
  ``adapterlab/__init__.py`` before any code of ours could say "this is the CLI" (short of
  guessing from ``sys.argv``). It would also keep ``import adapterlab`` at ~5 s for users.
* Registering on first use would mean patching peft's dispatch dicts (``PEFT_TYPE_TO_*``) with
  lazy mappings: far more of peft's internals than the one shim in ``peft_compat``.
* Every use of an adapterlab adapter through peft (``PeftModel.from_pretrained``,
  ``get_peft_model``, ``PeftConfig.from_pretrained``, transformers' ``load_adapter``) needs ``peft``
  imported first, and the hook runs inside that import, so nothing can reach peft's mappings before
  the tuners are in them. The hook only ever matches the name ``peft``, delegates the finding to
  the other finders (so it changes nothing about where peft comes from), patches only the loader
  instance of that one spec, and removes itself after it has fired.

The registration is skipped when ``adapterlab.tuners`` is already in ``sys.modules``: either it
is registered, or its import is in progress (a tuner module's ``import peft`` is what fired the
hook) and registers every tuner when it finishes. For the same reason no module that
``adapterlab.tuners`` imports (``peft_compat``, ``quant``, ``models``, ``_paths``) may import peft at
module level; ``tests/test_lazy_import.py`` imports each of them before peft in a fresh process.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

#: The package whose import is in charge of registering every adapterlab tuner with peft.
TUNERS_PACKAGE = "adapterlab.tuners"

_lock = threading.RLock()


def lazy_getattr(package: str, exports: dict[str, str], name: str) -> Any:
    """Resolve ``package.name`` on first access (the body of a PEP 562 module ``__getattr__``).

    Args:
        package: the package's ``__name__``.
        exports: public name -> module that defines it.
        name: the attribute asked for.

    Returns:
        The attribute; it is also stored on the package so later accesses skip this function.

    Raises:
        AttributeError: ``name`` is neither an exported name nor a sub-module of ``package``.
    """
    pkg = sys.modules[package]
    module_name = exports.get(name)
    if module_name is not None:
        value = getattr(importlib.import_module(module_name), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
        value = importlib.import_module(f"{package}.{name}")  # e.g. ``adapterlab.quant`` after ``import adapterlab``
    else:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    setattr(pkg, name, value)
    return value


class PeftImportHook(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that registers adapterlab's tuners right after ``peft`` is imported."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        """Find ``peft`` with the other finders and wrap its loader's ``exec_module``.

        Args:
            fullname: the module being imported; every name but ``peft`` is left to the others.
            path: the parent package's ``__path__`` (None for a top-level module).
            target: the module object on a reload.

        Returns:
            ``peft``'s spec with the registration chained after its ``exec_module``, or None.
        """
        if fullname != "peft":
            return None
        spec = None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module: ModuleType) -> None:
            exec_module(module)
            remove_peft_hook()
            _register_now()

        loader.exec_module = exec_then_register  # this spec's own loader instance only
        return spec


def _register_now() -> None:
    # No lock of ours around the import: importlib's per-module locks already make it happen once,
    # and holding another lock across an import can deadlock against a thread importing peft.
    if TUNERS_PACKAGE not in sys.modules:
        importlib.import_module(TUNERS_PACKAGE)


def _peft_imported() -> bool:
    module = sys.modules.get("peft")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def remove_peft_hook() -> None:
    """Take every :class:`PeftImportHook` off ``sys.meta_path`` (no-op when there is none)."""
    with _lock:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, PeftImportHook)]


def register_tuners_with_peft() -> None:
    """Register adapterlab's tuners with peft now if peft is imported, else as soon as it is.

    Idempotent: at most one hook is installed, and the registration itself is a no-op once
    ``adapterlab.tuners`` has been imported.
    """
    if _peft_imported():
        _register_now()
        return
    with _lock:
        if not any(isinstance(f, PeftImportHook) for f in sys.meta_path):
            sys.meta_path.insert(0, PeftImportHook())
    if _peft_imported():  # another thread finished importing peft before the hook was in place
        remove_peft_hook()
        _register_now()
