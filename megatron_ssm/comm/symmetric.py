"""The quantised two-shot all-reduce with no NCCL call: one kernel per step over symmetric memory.

QuantizedAllReduce moves its packed parts through NCCL (an all-to-all, then an all-gather): two
collectives and their latency per call, on top of three kernels. Here every rank keeps one buffer
that every peer maps (torch's symmetric memory: peer-to-peer loads over NVLink, no multicast) and
each step is one kernel that reads the peers' bytes where they lie:

1. `pack`: this rank's tensor, quantised, into region A of its own buffer (row j = chunk j);
2. barrier; `reduce`: rank r reads row r of every rank's region A, sums in fp32 in rank order and
   requantises into its region B;
3. barrier; `gather`: every rank reads every rank's region B and dequantises.

The kernels are triton_quantize's, so the bits are those of the NCCL transport (and of quantize.py's
torch steps). Region B starts at a fixed offset, half the buffer: a rank's next call, of any size,
writes region A only, which no peer reads any more once the second barrier has passed, and
region B only after the next call's first barrier, when every peer has finished reading it.

The barriers are torch's symmetric-memory barrier kernels (signal pads written with release and
waited on with acquire semantics, reset by the waits, so CUDA-graph replays need nothing), with a
timeout: a rank that dies mid-collective makes its peers trap within `timeout_ms` instead of hanging
until NCCL's watchdog (issue #16's bounded failure). Messages whose parts do not fit half the
buffer, CPU tensors, and groups where symmetric memory could not be set up on every rank take the
NCCL transport; every rank decides the same way (same sizes, and setup agreed by an all-reduce).

Not yet run on more than one GPU (no multi-GPU machine has been lent since it was written): the
steps are tested on CPU under Triton's interpreter with every rank's buffer in one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import quantize
from .allreduce import QuantizedAllReduce

DEFAULT_CAPACITY = 64 << 20  # bytes per rank: region A (half) holds a 32 MiB bf16 message's int8 parts
DEFAULT_TIMEOUT_MS = 30_000


@dataclass(frozen=True)
class Layout:
    """Where one call's bytes lie in each rank's buffer of `capacity` bytes."""

    world: int
    rank: int
    part_bytes: int  # one packed part (a chunk's codes, then its scales)
    capacity: int

    @classmethod
    def of(cls, numel: int, fmt: str, block: int, world: int, rank: int, capacity: int) -> Layout:
        chunk = quantize.chunk_values(numel, world, block)
        return cls(world, rank, quantize.part_bytes(chunk, fmt, block), capacity)

    @property
    def region_b(self) -> int:  # byte offset of region B (this rank's reduced part), fixed
        return self.capacity // 2 // 16 * 16

    def fits(self) -> bool:
        return self.world * self.part_bytes <= self.region_b and self.part_bytes <= self.capacity - self.region_b


def pack(ops, tensor: torch.Tensor, fmt: str, block: int, layout: Layout, local: torch.Tensor) -> None:
    """Step 1: this rank's parts into region A of its own buffer `local` (uint8)."""
    sent = local[:layout.world * layout.part_bytes].view(layout.world, layout.part_bytes)
    ops.quantize_pack(tensor, fmt, block, layout.world, out=sent)


def reduce(ops, peers: torch.Tensor, fmt: str, block: int, layout: Layout, local: torch.Tensor) -> None:
    """Step 2: row `rank` of every rank's region A, summed and requantised into this rank's region B."""
    mine = local[layout.region_b:layout.region_b + layout.part_bytes]
    ops.reduce_requantise_peers(peers, layout.rank * layout.part_bytes, layout.part_bytes, fmt, block, mine)


def gather(ops, peers: torch.Tensor, fmt: str, block: int, layout: Layout, local: torch.Tensor, shape,
           dtype: torch.dtype) -> torch.Tensor:
    """Step 3: every rank's region B, dequantised: the sum, the same bits on every rank."""
    return ops.unpack_dequantise_peers(peers, layout.region_b, layout.part_bytes, fmt, block, shape, dtype, local)


@dataclass
class _Peers:
    local: torch.Tensor  # this rank's symmetric buffer (uint8, capacity bytes)
    peers: torch.Tensor  # every rank's buffer address (int64, on this device)
    handle: object  # torch's symmetric-memory handle (its barrier)


class SymmetricQuantizedAllReduce(QuantizedAllReduce):
    """QuantizedAllReduce over symmetric memory: three kernels and two barriers, no collective."""

    def __init__(self, fmt: str = "int8", block: int = 128, capacity: int = DEFAULT_CAPACITY,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS):
        super().__init__(fmt, block)
        if capacity < 1024 or capacity % 16:
            raise ValueError(f"capacity must be a multiple of 16 bytes, at least 1024, got {capacity}")
        self.name = f"{fmt}-symm"
        self.capacity, self.timeout_ms = capacity, timeout_ms
        # (group name, device) -> _Peers, or None where symmetric memory is unavailable. Set up on
        # first use, which must be outside CUDA-graph capture (the engine warms up first).
        self._peers: dict[tuple, _Peers | None] = {}

    def __repr__(self) -> str:
        return f"SymmetricQuantizedAllReduce(fmt={self.fmt!r}, block={self.block}, capacity={self.capacity})"

    def __call__(self, tensor: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        if world == 1 or tensor.numel() == 0:
            return tensor
        ops = self._module(tensor)
        layout = Layout.of(tensor.numel(), self.fmt, self.block, world, dist.get_rank(group), self.capacity)
        state = self._setup(tensor.device, group) if tensor.is_cuda else None
        if state is None or ops is quantize or not layout.fits() or not ops._fused(tensor, self.block):
            return super().__call__(tensor, group)  # the NCCL transport: same bits
        pack(ops, tensor, self.fmt, self.block, layout, state.local)
        state.handle.barrier(channel=0, timeout_ms=self.timeout_ms)
        reduce(ops, state.peers, self.fmt, self.block, layout, state.local)
        state.handle.barrier(channel=1, timeout_ms=self.timeout_ms)
        return gather(ops, state.peers, self.fmt, self.block, layout, state.local, tensor.shape, tensor.dtype)

    def _setup(self, device: torch.device, group) -> _Peers | None:
        key = (group.group_name, device)
        if key not in self._peers:
            from .oneshot import symmetric_rendezvous

            made = symmetric_rendezvous(self.capacity, torch.uint8, device, group)
            self._peers[key] = None if made is None else _Peers(
                made[0], torch.tensor(made[1].buffer_ptrs, dtype=torch.int64, device=device), made[1])
        return self._peers[key]
