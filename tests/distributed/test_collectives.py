"""adapterlab.distributed: no-ops in one process; the real thing in a 2-process gloo group (never a mock)."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from adapterlab import distributed as D


def test_single_process_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not torch.distributed.is_initialized()
    assert not D.is_distributed() and D.rank() == 0 and D.world_size() == 1 and D.is_rank0()
    t = torch.tensor([1.0, 2.0])
    D.broadcast_tensor_(t)
    D.all_reduce_sum_(t)
    D.all_reduce_mean_(t)
    assert t.tolist() == [1.0, 2.0]
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    assert D.all_gather_object(5) == [5]
    D.check_equal_on_all_ranks(object(), "anything")
    p = torch.nn.Parameter(torch.ones(2))
    assert D.share_new_parameters_([p]) == []
    with pytest.raises(ValueError, match="floating-point"):
        D.all_reduce_mean_(torch.tensor([1]))


def test_launcher_environment_names_the_rank_before_the_group_exists(monkeypatch):
    """torchrun sets RANK / WORLD_SIZE: rank 1 is not the writer even before init_process_group."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert D.rank() == 1 and D.world_size() == 2 and not D.is_rank0()
    assert not D.is_distributed()  # no group: collectives stay no-ops
    t = torch.tensor([3.0])
    D.all_reduce_sum_(t)
    assert t.item() == 3.0


def test_fingerprint_is_exact():
    a = torch.arange(6.0).view(2, 3)
    assert D.fingerprint(a) == D.fingerprint(a.clone())
    assert D.fingerprint(a) != D.fingerprint(a.to(torch.float64))
    assert D.fingerprint(a) != D.fingerprint(a.view(3, 2))
    b = a.clone()
    b[1, 2] = torch.nextafter(b[1, 2], torch.tensor(10.0))
    assert D.fingerprint(a) != D.fingerprint(b)
    assert D.fingerprint({"m": torch.tensor(True), "k": [1, torch.zeros(0)]})["k"][0] == 1
    assert D.fingerprint(torch.tensor([True, False])) != D.fingerprint(torch.tensor([True, True]))


def test_two_process_gloo_group(tmp_path):
    """broadcast / reduce / check / share_new_parameters_ in a real 2-process group (assertions run in the workers)."""
    from tests.distributed._collectives_worker import run

    mp.start_processes(run, args=(2, str(tmp_path / "store")), nprocs=2, join=True, start_method="spawn")
