"""Process groups: torch.distributed from torchrun's environment plus Megatron's parallel state.

Everything else takes the tensor-parallel group (and, for context-parallel prefill, the
context-parallel group) as an argument; this module is the one place that creates them.

Rank layout (megatron-core's default order "tp-cp-ep-dp-pp", the same in 0.16.1 and 0.19.2): TP is
the fastest-varying index, so world rank = cp_rank * tp + tp_rank. A TP group is a run of tp
consecutive ranks; a CP group holds the ranks with one TP rank, tp apart. Every CP rank of a TP rank
loads the same checkpoint shard, so a checkpoint written for TP=N runs at any CP degree.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import warnings

import torch
import torch.distributed as dist

# megatron-core announces on import that the optional accelerators are absent; we run without them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
from megatron.core import parallel_state  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402

# A collective that waits longer than this means a rank died or diverged: fail instead of hanging.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("MEGATRON_SSM_DIST_TIMEOUT", "300")))
# A rank whose peer stopped answering for this many seconds ends itself (watchdog.py); 0 disables.
# Read when init_distributed runs, so a launcher can set it after importing this module.
WATCHDOG_ENV, WATCHDOG_DEFAULT_S = "MEGATRON_SSM_WATCHDOG_TIMEOUT", 15.0


@dataclass(frozen=True)
class TPContext:
    """The tensor-parallel group of this process and where it sits in it."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    device: torch.device
    # The same ranks on a second communicator, for reductions left in flight while the next
    # micro-chunk computes (see MambaLM.forward); None: use `group`.
    overlap_group: dist.ProcessGroup | None = None

    @property
    def is_first(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class CPContext:
    """The context-parallel group of this process: the ranks that split one long prompt's prefill
    along the sequence (all holding the same TP rank). Size 1: no context parallelism."""

    group: dist.ProcessGroup | None
    rank: int
    size: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


NO_CP = CPContext(None, 0, 1)


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(
    tp_size: int | None = None,
    device: torch.device | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    watchdog_timeout: float | None = None,
    cp_size: int = 1,
) -> TPContext:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA) and Megatron's TP and CP groups.

    Works without torchrun too (a single process becomes a world of one). `tp_size` defaults to the
    world size over `cp_size` (world = tp x cp); `cp_context()` then gives the CP group. With more
    than one rank, a watchdog ends this process within `watchdog_timeout` seconds of a peer dying
    (0: no watchdog; None: from $MEGATRON_SSM_WATCHDOG_TIMEOUT, default 15).
    """
    device = device or default_device()
    if device.type == "cuda" and device.index is None:  # "cuda" alone: this process's local GPU
        device = default_device()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()) if "WORLD_SIZE" not in os.environ else "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timeout)
        if watchdog_timeout is None:
            watchdog_timeout = float(os.environ.get(WATCHDOG_ENV, WATCHDOG_DEFAULT_S))
        if watchdog_timeout > 0 and dist.get_world_size() > 1:
            from .watchdog import start_watchdog

            _WATCHDOG.append(start_watchdog(timeout=watchdog_timeout))
    world = dist.get_world_size()
    if cp_size < 1 or world % cp_size:
        raise ValueError(f"world size {world} is not a multiple of the context-parallel size {cp_size}")
    tp_size = tp_size or world // cp_size
    if world % (tp_size * cp_size):
        raise ValueError(f"world size {world} is not a multiple of tensor-parallel size {tp_size} x "
                         f"context-parallel size {cp_size}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp_size,
            context_parallel_size=cp_size,
            distributed_timeout_minutes=max(1, int(timeout.total_seconds() // 60)),
            # gloo side groups are for checkpointing in training; inference needs none.
            create_gloo_process_groups=False,
        )
    if tp_size > 1 and world not in _OVERLAP_GROUPS:
        # Collective over the whole world: every rank creates every TP group's twin, in order.
        # Megatron's TP groups (TP only, no pipeline) are runs of tp_size consecutive ranks.
        mine, _ = dist.new_subgroups_by_enumeration(
            [list(range(g, g + tp_size)) for g in range(0, world, tp_size)], timeout=timeout)
        assert dist.get_process_group_ranks(mine) == \
            dist.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
        _OVERLAP_GROUPS[world] = mine
    return tp_context(device)


# The overlap communicator made by init_distributed (keyed by world size; one per process).
_OVERLAP_GROUPS: dict[int, dist.ProcessGroup] = {}
# The watchdog init_distributed started, stopped (announced as a clean exit) by shutdown.
_WATCHDOG: list = []


def tp_context(device: torch.device | None = None) -> TPContext:
    return TPContext(
        group=parallel_state.get_tensor_model_parallel_group(),
        rank=parallel_state.get_tensor_model_parallel_rank(),
        size=parallel_state.get_tensor_model_parallel_world_size(),
        device=device or default_device(),
        overlap_group=_OVERLAP_GROUPS.get(dist.get_world_size()) if dist.is_initialized() else None,
    )


def cp_context() -> CPContext:
    """This process's context-parallel group, from Megatron's parallel state (NO_CP before it is set up)."""
    if not parallel_state.model_parallel_is_initialized():
        return NO_CP
    size = parallel_state.get_context_parallel_world_size()
    if size == 1:
        return NO_CP
    return CPContext(group=parallel_state.get_context_parallel_group(),
                     rank=parallel_state.get_context_parallel_rank(), size=size)


def megatron_config(tp_size: int, dtype: torch.dtype, on_cpu: bool = True) -> ModelParallelConfig:
    """The ModelParallelConfig our parallel layers are built with: inference only, weights loaded
    from checkpoints, so no initialisation, no gradient fusions, no sequence parallelism."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        params_dtype=dtype,
        # On GPU the weights are allocated there directly, never staged on the host.
        use_cpu_initialization=on_cpu,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


def shutdown() -> None:
    while _WATCHDOG:
        _WATCHDOG.pop().stop()
    _OVERLAP_GROUPS.clear()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT and test servers)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
