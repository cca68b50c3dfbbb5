"""Exact all-reduce of small CUDA messages in one kernel over symmetric memory.

A decode step's row-parallel outputs are a few KiB to a few hundred KiB: NCCL's latency (~15-20 us
inside a CUDA graph on 4 H100s) is the cost, not the bytes. torch's symmetric-memory one-shot
all-reduce copies each rank's input into a buffer every peer maps over NVLink and has every rank
read and add all copies in one kernel. It needs peer-to-peer access only, no NVLink multicast
(which this project keeps off). Messages it cannot take go to NCCL: CPU tensors, sizes over
the size limit or not a multiple of 16 bytes, other dtypes, and groups where symmetric memory could
not be set up on every rank.
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from .allreduce import AllReduce, ExactAllReduce

log = logging.getLogger(__name__)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Largest message sent one-shot, by group size; larger ones go to NCCL. Measured on H100 SXM
# (docs/benchmarks.md, CUDA graphs): on 2 GPUs one-shot ties NCCL up to 64 KiB (10.5 vs 10.8 us) and
# loses at 256 KiB (13.2 vs 12.2); on 4 it wins up to 256 KiB (16 vs 40 us). Every rank reads every
# peer's whole message, so the bytes read grow with the group: larger groups get less (not measured).
MAX_BYTES = {2: 64 * 1024, 4: 512 * 1024}
MAX_BYTES_LARGER_GROUPS = 256 * 1024


class OneShotAllReduce(AllReduce):
    name = "oneshot"

    def __init__(self, max_bytes: int | None = None):
        """max_bytes: the largest message sent one-shot (None: by group size, MAX_BYTES)."""
        self.max_bytes = max_bytes
        self.fallback = ExactAllReduce()
        # (group name, device, dtype) -> the rank's symmetric buffer, or None where unavailable.
        # Set up on first use, which must be outside CUDA-graph capture (the engine warms up first).
        self._buffers: dict[tuple, torch.Tensor | None] = {}

    def __repr__(self) -> str:
        return f"OneShotAllReduce(max_bytes={self.max_bytes})"

    def limit(self, world: int) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        return MAX_BYTES.get(world, MAX_BYTES_LARGER_GROUPS if world > 4 else MAX_BYTES[4])

    def takes(self, tensor: torch.Tensor, world: int) -> bool:
        nbytes = tensor.numel() * tensor.element_size()
        return (tensor.is_cuda and tensor.dtype in _DTYPES and 0 < nbytes <= self.limit(world)
                and nbytes % 16 == 0)

    def __call__(self, tensor: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        if world == 1:
            return tensor
        buffer = self._buffer(tensor, group, world) if self.takes(tensor, world) else None
        if buffer is None:
            return self.fallback(tensor, group)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(
            buffer[:tensor.numel()], tensor.contiguous().view(-1), "sum", group.group_name, out.view(-1))
        return out

    def _buffer(self, tensor: torch.Tensor, group, world: int) -> torch.Tensor | None:
        key = (group.group_name, tensor.device, tensor.dtype)
        if key not in self._buffers:
            self._buffers[key] = symmetric_buffer(self.limit(world) // tensor.element_size(), tensor.dtype,
                                                  tensor.device, group)
        return self._buffers[key]


def symmetric_buffer(numel: int, dtype: torch.dtype, device: torch.device, group) -> torch.Tensor | None:
    """A buffer of `numel` values that every rank of `group` maps, or None on every rank if any rank
    could not make one (or this torch has no one-shot all-reduce). Collective."""
    made = symmetric_rendezvous(numel, dtype, device, group, needs_op="one_shot_all_reduce_copy_out")
    return None if made is None else made[0]


def symmetric_rendezvous(numel: int, dtype: torch.dtype, device: torch.device, group,
                         needs_op: str | None = None) -> tuple[torch.Tensor, object] | None:
    """(this rank's buffer of `numel` values that every rank of `group` maps, its symmetric-memory
    handle), or None on every rank if any rank could not make one or lacks torch.ops.symm_mem.<needs_op>.
    Collective."""
    made, why = None, ""
    try:
        import torch.distributed._symmetric_memory as symm_mem

        if needs_op is not None and not hasattr(torch.ops.symm_mem, needs_op):
            raise RuntimeError(f"this torch has no symm_mem.{needs_op}")
        buffer = symm_mem.empty(numel, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(buffer, group.group_name)
        if handle is None:
            raise RuntimeError("rendezvous returned no handle")
        made = (buffer, handle)
    except Exception as e:  # noqa: BLE001 - any failure means: use NCCL
        made, why = None, f"{type(e).__name__}: {e}"
    ok = torch.tensor([made is not None], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if not ok.item():
        log.warning("symmetric memory unavailable, using NCCL for every message%s", f" ({why})" if why else "")
        return None
    return made
