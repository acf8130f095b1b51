"""Adding a method touches three places (DESIGN.md §1): a method file that is not registered fails here."""

from __future__ import annotations

from pathlib import Path

import adapterlab

PKG = Path(adapterlab.__file__).resolve().parent


def _modules(folder: str, skip: set[str]) -> set[str]:
    return {p.stem for p in (PKG / folder).glob("*.py") if not p.stem.startswith("_") and p.stem not in skip}


def test_every_tuner_package_is_registered_with_peft_and_exported() -> None:
    from adapterlab.peft_compat import registered_tuners

    packages = {p.name for p in (PKG / "tuners").iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    registered = registered_tuners()
    for pkg in packages:
        assert any(
            info.config_cls.__module__.startswith(f"adapterlab.tuners.{pkg}.") for info in registered.values()
        ), f"adapterlab/tuners/{pkg}/ is not registered with peft (import it in adapterlab/tuners/__init__.py)"
        exported = [
            n
            for n in adapterlab.__all__
            if n.endswith("Config") and getattr(adapterlab, n).__module__.startswith(f"adapterlab.tuners.{pkg}.")
        ]
        assert exported, f"the config of adapterlab/tuners/{pkg}/ is not exported from adapterlab"


def test_every_pruning_and_merging_method_file_is_registered() -> None:
    from adapterlab.merging.merger import MERGERS
    from adapterlab.merging.routes import ROUTES
    from adapterlab.pruning.pruner import PRUNERS

    assert _modules("pruning", {"pruner", "functional"}) <= set(PRUNERS.names())
    # every other file of merging/ is a method (registers a merger) or a route (registers a route)
    infra = {"functional", "merger", "result", "routes", "combine", "writers"}
    names = set(MERGERS.names())
    routes = {ROUTES.get(n).__module__.rsplit(".", 1)[-1] for n in ROUTES.names()}
    for f in _modules("merging", infra):
        assert f in routes or any(n == f or n.startswith(f"{f}_") or n.endswith(f"_{f}") for n in names), (
            f"adapterlab/merging/{f}.py registers no merge method or route (methods: {sorted(names)}, "
            f"routes in {sorted(routes)})"
        )
    assert {"sparse", "concat", "dense", "basis"} <= set(ROUTES.names())


def test_every_callback_file_is_exported() -> None:
    import adapterlab.callbacks as cb

    modules = {getattr(cb, n).__module__.rsplit(".", 1)[-1] for n in cb.__all__}
    assert _modules("callbacks", set()) <= modules


def test_every_cli_verb_module_is_a_command() -> None:
    from typer.main import get_command

    from adapterlab.cli.app import app

    commands = set(get_command(app).commands)  # type: ignore[attr-defined]
    verbs = _modules("cli", {"app"})
    verbs = {"eval" if v == "evaluate" else v for v in verbs}
    assert verbs <= commands, f"CLI modules without a command: {sorted(verbs - commands)}"
