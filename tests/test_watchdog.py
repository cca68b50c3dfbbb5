"""A rank that dies ends the others within seconds (megatron_ssm/watchdog.py)."""
from __future__ import annotations

import multiprocessing as mp
import os

import pytest
import torch.distributed as dist

from distributed import preloaded_context
from megatron_ssm.parallel import free_port
from megatron_ssm.watchdog import EXIT_CODE, RankWatchdog


def _watchdog(rank: int, world: int, store: dist.Store, t0: float, timeout: float = 10.0) -> RankWatchdog:
    wd = RankWatchdog(store, rank, world, timeout=timeout)
    wd._seen = {r: (0, t0) for r in wd._seen}  # a fixed clock: the test says what time it is
    return wd


def test_silent_peer_is_dead_after_timeout_and_not_before():
    store = dist.HashStore()
    a, b = _watchdog(0, 2, store, 0.0), _watchdog(1, 2, store, 0.0)
    assert b.tick(1.0) is None and a.tick(1.0) is None  # b moved: a sees it
    assert a.tick(10.5) is None  # 9.5 s since b last moved
    why = a.tick(11.5)
    assert why is not None and "rank 1" in why
    assert b.tick(11.5) is None  # a kept ticking, so b sees it alive


def test_peer_that_left_cleanly_is_not_dead():
    store = dist.HashStore()
    a, b = _watchdog(0, 3, store, 0.0), _watchdog(1, 3, store, 0.0)
    c = _watchdog(2, 3, store, 0.0)
    for w in (a, b, c):
        assert w.tick(1.0) is None
    store.set("done/1", "1")  # what RankWatchdog.stop() writes
    assert c.tick(100.0) is not None  # a stopped ticking: c notices, even with b gone cleanly
    assert a.tick(5.0) is None
    assert "rank 2" in (a.tick(100.0) or "")  # c went silent; b is not named


def test_store_failure_is_death_of_rank_0():
    class Broken:
        def add(self, *a):
            raise ConnectionResetError("peer reset")

    wd = RankWatchdog(Broken(), 1, 2)
    assert "rank 0 is gone" in wd.tick(0.0)


def _rank_main(rank: int, world: int, port: int, dies: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      MEGATRON_SSM_WATCHDOG_TIMEOUT="3")
    import torch

    from megatron_ssm.parallel import init_distributed

    init_distributed(device=torch.device("cpu"))
    torch.distributed.barrier()  # every watchdog is up: what follows is a death mid-run, not at start-up
    if rank == dies:
        os._exit(1)
    mp.get_context("spawn").Queue().get()  # stands for a collective that never returns (NCCL's hang)


@pytest.mark.parametrize("dies", [1, 0], ids=["worker-dies", "rank0-dies"])
def test_survivors_exit_within_bound(dies):
    port = free_port()
    ctx = preloaded_context()
    procs = [ctx.Process(target=_rank_main, args=(r, 3, port, dies, None)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)  # a bound, not a synchronisation: start-up (imports) plus 3 s
        codes = [p.exitcode for p in procs]
        assert codes[dies] == 1
        assert [c for r, c in enumerate(codes) if r != dies] == [EXIT_CODE] * 2, codes
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


def _rank_finishes(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      MEGATRON_SSM_WATCHDOG_TIMEOUT="3")
    import torch

    from megatron_ssm.parallel import init_distributed, shutdown

    init_distributed(device=torch.device("cpu"))
    from megatron_ssm.parallel import _WATCHDOG

    if rank == 1:  # finishes only after rank 0, the store's host, has started to leave
        _WATCHDOG[0].store.wait(["done/0"])
        why = _WATCHDOG[0].tick(1e9)  # far in the future: rank 0 counts as done, not silent
        assert why is None, why
    shutdown()


def test_clean_exit_in_any_order_exits_zero():
    port = free_port()
    ctx = preloaded_context()
    procs = [ctx.Process(target=_rank_finishes, args=(r, 2, port)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
