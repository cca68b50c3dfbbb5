"""A rank that dies ends every rank within seconds, not after NCCL's timeout.

A peer that dies in the middle of an NCCL collective leaves the others spinning in the kernel until
the process group's timeout (minutes), and torchrun notices only its own children: under srun,
mpirun or several torchrun agents the survivors hang. Each rank therefore runs a small thread that
bumps its own counter in a TCPStore every `interval` seconds and reads everyone else's. A counter
that has not moved for `timeout` seconds, a store that stopped answering (its host, rank 0, died),
or a counter that vanished means a rank is gone: the thread logs which one and ends this process
with exit code 70, so the whole job fails fast and says why.

This checks liveness, not progress: a rank stuck in a long load or compile still answers. A rank
that leaves cleanly says so first (`stop`), so a rank that finishes later is not taken for dead;
rank 0, which hosts the store, waits for the others to say so before it goes.
The store is our own (public API), on a port rank 0 picks and broadcasts at start-up.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_CODE = 70  # EX_SOFTWARE: "a peer died" is told apart from this rank's own errors


class RankWatchdog:
    def __init__(self, store: dist.Store, rank: int, world: int, *, interval: float = 1.0,
                 timeout: float = 15.0, on_dead=None):
        self.store, self.rank, self.world = store, rank, world
        self.interval, self.timeout = interval, timeout
        self.on_dead = on_dead or _exit_now
        self._stop = threading.Event()
        # peer -> (its counter when last seen moving, when that was)
        self._seen = {r: (0, time.monotonic()) for r in range(world) if r != rank}
        self._thread = threading.Thread(target=self._run, name="megatron-ssm-watchdog", daemon=True)

    def start(self) -> "RankWatchdog":
        self.store.add(f"hb/{self.rank}", 1)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Leave cleanly: peers stop watching this rank."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
            if self.rank == 0:
                # Rank 0 hosts the store: leaving while a peer is still finishing would look to that
                # peer like rank 0 dying. Wait (bounded) until every peer has said it is done.
                others = [f"done/{r}" for r in range(1, self.world)]
                self.store.wait(others, timedelta(seconds=self.timeout))
        except Exception:  # noqa: BLE001 - a peer that never says done, or the store gone: leave anyway
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            why = self.tick(time.monotonic())
            if why is not None and not self._stop.is_set():
                return self._dead(why)

    def tick(self, now: float) -> str | None:
        """One look at the peers: bump our counter, read theirs. Returns why a rank is gone, or None."""
        try:
            self.store.add(f"hb/{self.rank}", 1)
            for r, (count, since) in list(self._seen.items()):
                if self.store.check([f"done/{r}"]):
                    del self._seen[r]
                    continue
                current = self.store.add(f"hb/{r}", 0)  # a read that never blocks
                if current != count:
                    self._seen[r] = (current, now)
                elif now - since > self.timeout:
                    return f"rank {r} has not answered for {now - since:.0f} s"
        except Exception as e:  # noqa: BLE001 - the store died with its host
            return f"the rendezvous store stopped answering ({type(e).__name__}: {e}); rank 0 is gone"
        return None

    def _dead(self, why: str) -> None:
        self.on_dead(f"rank {self.rank}: {why}; ending this rank instead of waiting for the "
                     f"collective timeout")


def _exit_now(message: str) -> None:
    log.error(message)
    print(message, file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)


def start_watchdog(group: dist.ProcessGroup | None = None, *, interval: float = 1.0,
                   timeout: float = 15.0) -> RankWatchdog | None:
    """Collective over `group` (default: the world): rank 0 hosts a store on a free port, every rank
    joins it and starts watching. None for a world of one."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return None
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    from .parallel import free_port

    port = torch.tensor([free_port() if rank == 0 else 0], dtype=torch.int64)
    # The port travels on a gloo-capable device: the world group may be NCCL (then CUDA).
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    port = port.to(device)
    dist.broadcast(port, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    store = dist.TCPStore(host, int(port.item()), world, is_master=rank == 0,
                          timeout=timedelta(seconds=max(30.0, timeout)), wait_for_workers=True)
    return RankWatchdog(store, rank, world, interval=interval, timeout=timeout).start()

