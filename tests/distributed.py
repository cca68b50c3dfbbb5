"""Persistent pools of gloo ranks for multi-rank tests.

Importing torch + megatron-core costs ~5 s of CPU a process, so each world size gets one pool for the
whole session, and every rank is forked from one forkserver that has imported them already (a pool of
8 ranks starts in 0.2 s instead of 21 s on 2 cores); a test sends a pool a module-level function and
gets every rank's return value.
A rank that raises returns its traceback, and every wait has a timeout, so a diverged rank fails the
test instead of hanging it.
"""
from __future__ import annotations

import importlib
import os
import queue
import traceback

import torch.multiprocessing as mp

from megatron_ssm.parallel import free_port

TIMEOUT_S = 300
# What the forkserver imports once for every rank. It never runs a torch op, so each fork starts
# without thread pools or gloo state to inherit.
PRELOAD = ["megatron_ssm.parallel", "megatron_ssm.model.load", "megatron_ssm.inference.engine", "hf_models"]


def preloaded_context():
    """multiprocessing's forkserver context with PRELOAD imported: processes start in milliseconds."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _worker(rank: int, world_size: int, tp: int, port: int, inbox, outbox) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), HF_HUB_OFFLINE="1",
                      # pools outlive single tests and are torn down rank by rank: no watchdog
                      # (tests/test_watchdog.py checks it on its own ranks)
                      MEGATRON_SSM_WATCHDOG_TIMEOUT="0")
    import torch

    torch.set_num_threads(1)
    from megatron_ssm.parallel import init_distributed

    import datetime
    # watchdog_timeout explicitly: this module imports megatron_ssm.parallel (free_port) before the
    # environment above is set, so its default has already been read
    init_distributed(tp, device=torch.device("cpu"), timeout=datetime.timedelta(seconds=TIMEOUT_S),
                     watchdog_timeout=0, cp_size=world_size // tp)
    while True:
        job = inbox.get()
        if job is None:
            break
        module, name, args, kwargs = job
        try:
            fn = getattr(importlib.import_module(module), name)
            outbox.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            outbox.put((rank, False, traceback.format_exc()))
    # Skip interpreter teardown (gloo and megatron groups take seconds to unwind); the pool is done.
    outbox.close()
    outbox.join_thread()
    os._exit(0)


class RankPool:
    def __init__(self, world_size: int, tp: int | None = None):
        """world_size gloo ranks with Megatron's parallel state at TP = tp (default: the world size)
        and CP = world_size / tp."""
        tp = tp or world_size
        if world_size % tp:
            raise ValueError(f"world size {world_size} is not a multiple of tp {tp}")
        self.world_size, self.tp, self.cp = world_size, tp, world_size // tp
        ctx = preloaded_context()
        port = free_port()
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, tp, port, self.inboxes[r], self.outbox),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, **kwargs) -> list:
        """Run fn(*args, **kwargs) on every rank; return the per-rank results in rank order."""
        job = (fn.__module__, fn.__name__, args, kwargs)
        for inbox in self.inboxes:
            inbox.put(job)
        results: dict[int, object] = {}
        errors = []
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.outbox.get(timeout=TIMEOUT_S)
            except queue.Empty:
                self.close(force=True)
                raise TimeoutError(f"{fn.__name__}: a rank did not answer within {TIMEOUT_S}s") from None
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
        if errors:
            raise AssertionError(f"{fn.__name__} failed\n" + "\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self, force: bool = False) -> None:
        for p, inbox in zip(self.procs, self.inboxes):
            if p.is_alive() and not force:
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=0 if force else 5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
