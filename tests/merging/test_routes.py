"""Routes are registered objects chosen from the inputs; merge_adapters only validates and dispatches."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from adapterlab.merging import MERGERS, ROUTES, Route, merge_adapters, register_route
from adapterlab.merging.dense import DenseRoute
from adapterlab.merging.result import MergeResult
from adapterlab.merging.routes import MergePlan, choose_route
from tests.merging._helpers import make_lora_dirs


def _src(kind: str, i: int) -> SimpleNamespace:
    return SimpleNamespace(kind=kind, name=f"a{i}", peft_type=f"adapterlab_{kind}")


def _plan(kinds: list[str], method: str, output: str | None, **kw) -> MergePlan:
    merger = MERGERS.get(method).from_params({})
    return MergePlan([_src(k, i) for i, k in enumerate(kinds)], {}, merger, torch.ones(len(kinds)), output, **kw)


@pytest.mark.parametrize(
    "kinds, method, output, kw, route, resolved",
    [
        (["lora", "lora"], "linear", None, {}, "dense", "lora"),
        (["lora", "lora"], "ties", "full", {}, "dense", "full"),
        (["shira", "shira"], "ties", None, {}, "sparse", "shira"),
        (["shira", "shira"], "linear", "full", {}, "sparse", "full"),
        (["shira", "shira"], "linear", "lora", {}, "dense", "lora"),  # SVD of the dense merge
        (["lori", "lori"], "linear", None, {}, "concat", "lori"),
        (["lori", "lori"], "task_arithmetic", "lora", {}, "concat", "lora"),
        (["lori", "lori"], "linear", "lora", {"rank": 4}, "dense", "lora"),  # a rank asks for the SVD
        (["lori", "lori"], "ties", None, {}, "dense", "lora"),
        (["lori", "lora"], "linear", None, {}, "dense", "lora"),
        (["lora", "lora", "lora"], "rmm", None, {}, "basis", "lora"),
    ],
)
def test_route_is_chosen_from_the_inputs(kinds, method, output, kw, route, resolved) -> None:
    plan = _plan(kinds, method, output, **kw)
    got, why = choose_route(plan)
    assert got.name == route
    assert plan.output == resolved
    assert why is None


def test_shira_mixed_with_lora_falls_back_to_dense_and_says_why() -> None:
    plan = _plan(["shira", "lora"], "linear", None)
    got, why = choose_route(plan)
    assert got is DenseRoute and plan.output == "lora"
    assert why is not None and "adapters[0]" in why and "adapters[1]" in why and "dense deltas" in why


@pytest.mark.parametrize(
    "kinds, method, output, message",
    [
        (["shira", "shira"], "rmm", None, "needs low-rank factors"),
        (["lora", "lora"], "linear", "shira", "output='shira' needs every adapter to be a SHiRA adapter"),
        (["lori", "lori"], "ties", "lori", "output='lori' is the exact concatenation"),
    ],
)
def test_impossible_outputs_are_refused_by_name(kinds, method, output, message) -> None:
    with pytest.raises(ValueError, match=message):
        choose_route(_plan(kinds, method, output))


def test_basis_route_refuses_low_rank_options(tmp_path: Path) -> None:
    paths = make_lora_dirs(tmp_path, 3)
    with pytest.raises(ValueError, match="rmm keeps a basis of factors"):
        merge_adapters(paths, "rmm", rank=2)
    with pytest.raises(ValueError, match="rmm keeps a basis of factors"):
        merge_adapters(paths, "rmm", output="sparse")


@pytest.fixture
def scratch_route():
    """Register a route for one test and take it out again."""
    before = dict(ROUTES._items)
    yield
    ROUTES._items.clear()
    ROUTES._items.update(before)


def test_a_new_route_is_one_registered_class(tmp_path: Path, scratch_route) -> None:
    """A route registered from outside merging/ is picked by merge_adapters, checked before any base is
    read, and its result is what the caller gets: the orchestrator has no branch per route."""
    calls: list[str] = []

    @register_route("halved", order=5)
    class HalvedRoute(Route):
        """Takes sparse outputs of linear merges and writes half the dense merge (for this test)."""

        @classmethod
        def accepts(cls, plan: MergePlan) -> bool:
            return plan.merger.name == "linear" and plan.output == "sparse"

        @classmethod
        def check(cls, plan: MergePlan) -> None:
            calls.append("check")
            if plan.rank is not None:
                raise ValueError("halved: no rank")

        @classmethod
        def run(cls, plan: MergePlan) -> MergeResult:
            calls.append("run")
            plan.weights = plan.weights / 2
            return DenseRoute.run(plan)

    paths = make_lora_dirs(tmp_path, 2)
    w = [1.0, -0.5]
    got = merge_adapters(paths, "linear", weights=w, output="sparse")
    assert calls == ["check", "run"]
    ROUTES._items.pop("halved")
    ref = merge_adapters(paths, "linear", weights=[x / 2 for x in w], output="sparse")
    for name in ref.shapes:
        assert torch.equal(got.delta(name), ref.delta(name))
    # the route's own check runs before the base would be loaded
    register_route("halved", order=5)(HalvedRoute)
    with pytest.raises(ValueError, match="rank/energy apply to output='lora' only|halved: no rank"):
        merge_adapters(paths, "linear", output="sparse", rank=2, base=tmp_path / "missing")
    assert calls[-1] == "check"
