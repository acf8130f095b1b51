"""Run by ``torch.multiprocessing`` in a real 2-process gloo group (tests/distributed/test_collectives.py).

Imports only torch and ``adapterlab.distributed`` so the spawned processes start in a second or two.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from adapterlab import distributed as D


def _expect_error(fn, *needles: str) -> None:
    try:
        fn()
    except ValueError as err:
        for n in needles:
            assert n in str(err), (n, str(err))
        return
    raise AssertionError("expected a ValueError")


def run(rank: int, world: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        assert D.is_distributed() and D.rank() == rank and D.world_size() == world
        assert D.is_rank0() == (rank == 0)

        # broadcast from rank 0, every dtype the methods send (bool masks go as uint8 and come back bool)
        f = torch.full((3, 2), float(rank + 1))
        D.broadcast_tensor_(f)
        assert torch.equal(f, torch.ones(3, 2))
        m = torch.tensor([rank == 0, rank == 1, True])
        D.broadcast_tensor_(m)
        assert m.dtype == torch.bool and m.tolist() == [True, False, True]
        i = torch.arange(4, dtype=torch.int32) * (rank + 1)
        D.broadcast_tensor_(i)
        assert i.tolist() == [0, 1, 2, 3] and i.dtype == torch.int32
        h = torch.full((2,), 0.5 + rank, dtype=torch.bfloat16)
        D.broadcast_tensor_(h)
        assert h.tolist() == [0.5, 0.5]
        v = (torch.arange(6.0).view(2, 3) * (rank + 1)).t()  # non-contiguous: sent as a copy, written back
        D.broadcast_tensor_(v)
        assert torch.equal(v, torch.arange(6.0).view(2, 3).t())
        many = [torch.full((2, 2), rank, dtype=torch.bool), torch.full((3,), rank + 5), torch.full((1,), rank + 0.5)]
        D.broadcast_tensors_(many)  # one message per dtype
        assert [t.tolist() for t in many] == [[[False, False], [False, False]], [5, 5, 5], [0.5]]

        # reductions: ranks hold 1 and 2
        s = torch.tensor([1.0, 10.0]) * (rank + 1)
        D.all_reduce_sum_(s)
        assert s.tolist() == [3.0, 30.0]
        mean = torch.tensor([1.0, 10.0]) * (rank + 1)
        D.all_reduce_mean_(mean)
        assert mean.tolist() == [1.5, 15.0]
        n = torch.tensor([rank + 1])
        D.all_reduce_sum_(n)
        assert n.item() == 3
        _expect_error(lambda: D.all_reduce_mean_(torch.tensor([1])), "floating-point")

        # objects
        assert D.broadcast_object({"rank": rank, "k": [1, 2]}) == {"rank": 0, "k": [1, 2]}
        assert D.all_gather_object(rank * 10) == [0, 10]

        # checks: equal passes; a differing value fails on every rank, naming it and each rank's value
        D.check_equal_on_all_ranks({"seed": 3, "mask": torch.ones(4, dtype=torch.bool)}, "the seed")
        _expect_error(
            lambda: D.check_equal_on_all_ranks(7 + rank, "DyLoRA seed"), "DyLoRA seed", "rank 0: 7", "rank 1: 8"
        )
        t = torch.zeros(5)
        t[rank] = 1.0
        _expect_error(lambda: D.check_equal_on_all_ranks({"layer.0": t}, "SHiRA mask"), "SHiRA mask", "rank 1")
        _expect_error(  # a mapping names the entries that differ, not the whole mapping
            lambda: D.check_equal_on_all_ranks({"same": 1, "seed": rank}, "the config"), "at 'seed'", "{'seed': 1}"
        )

        # a parameter created after wrapping: rank 0's values everywhere, gradients averaged in backward
        p = torch.nn.Parameter(torch.full((3,), float(rank + 1)))
        handles = D.share_new_parameters_([p])
        assert p.detach().tolist() == [1.0, 1.0, 1.0] and len(handles) == 1
        x = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # local data: grad = x
        (p * x).sum().backward()
        assert p.grad.tolist() == [1.5, 3.0, 4.5], p.grad
        for hd in handles:
            hd.remove()
        p.grad = None
        (p * x).sum().backward()
        assert p.grad.tolist() == x.tolist()  # removed: local gradient again
        dist.barrier()
    finally:
        import gc

        gc.collect()  # release work objects holding tensors while the interpreter is whole (see _ddp_worker)
        dist.destroy_process_group()
