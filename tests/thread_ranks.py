"""Tensor-parallel ranks as threads of the test process, for the collectives the sampling code issues.

`run_ranks(tp, fn)` runs fn(TPContext) once per rank, each in its own thread, with `dist.all_gather` and
`dist.all_reduce` (sum) of the given modules replaced by versions that meet the other threads at a
barrier. The arithmetic is torch's own, in rank order, so this is a stand-in for the gloo group that
costs microseconds and keeps everything in one process (where mutmut and coverage can see it); the
gloo-rank tests check the same code over real process groups.
"""
from __future__ import annotations

import threading
import types

import torch

from megatron_ssm.parallel import TPContext


class ThreadGroup:
    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.local = threading.local()

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[self.local.rank] = t.clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read it
        return everyone

    def all_gather(self, parts, t, group=None, async_op=False):
        for part, got in zip(parts, self._exchange(t)):
            part.copy_(got)

    def all_reduce(self, t, op=None, group=None, async_op=False):
        total = self._exchange(t)
        acc = total[0].clone()
        for x in total[1:]:
            acc += x
        t.copy_(acc)


def run_ranks(tp: int, fn, *modules, monkeypatch) -> list:
    """[fn(TPContext of rank r) for r in range(tp)], the ranks running concurrently as threads."""
    group = ThreadGroup(tp)
    fake = types.SimpleNamespace(all_gather=group.all_gather, all_reduce=group.all_reduce)
    for m in modules:
        monkeypatch.setattr(m, "dist", fake)
    results, errors = [None] * tp, []

    def body(rank):
        group.local.rank = rank
        try:
            results[rank] = fn(TPContext(group=group, rank=rank, size=tp, device=torch.device("cpu")))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
            group.barrier.abort()

    # Rank 0 runs in the calling thread: tools that attribute calls to the running test (mutmut's
    # stats, per-thread tracers) see the code under test there.
    threads = [threading.Thread(target=body, args=(r,)) for r in range(1, tp)]
    for t in threads:
        t.start()
    body(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
