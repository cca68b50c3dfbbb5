"""Kernels that read a weight's bytes into L2 without using them (see `megatron_ssm.ops.prefetch`).

- `bulk`: each lane issues one Hopper TMA bulk prefetch (`cp.async.bulk.prefetch.L2`) of a 16 KB
  chunk and the program exits: the copy engines fetch while the SMs stay free for the kernels the
  prefetch runs beside. sm_90 and later.
- `loads`: programs read the bytes with ordinary loads, kept in L2 by an evict-last policy, and
  fold them into a checksum so the loads are not removed. Any CUDA GPU (and Triton's interpreter),
  but the programs occupy SMs while they wait on HBM.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BULK_CHUNK = 16384  # bytes per lane's bulk prefetch (a multiple of 16)
BULK_LANES = 32
LOADS_BLOCK = 2048  # int32 per load
LOADS_ITERS = 8


@triton.jit
def _bulk_prefetch_kernel(ptr, nbytes, sink_ptr, CHUNK: tl.constexpr, LANES: tl.constexpr):
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    start = lane.to(tl.int64) * CHUNK
    live = (start < nbytes).to(tl.int32)
    size = tl.minimum(nbytes - start, CHUNK).to(tl.int32)
    size = tl.where(live != 0, size, 16)  # a lane past the end issues nothing (predicated below)
    done = tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [ptr + start, live, size], dtype=tl.int32, is_pure=False, pack=1)
    tl.store(sink_ptr + lane, done, mask=done != 0)  # never stores: keeps the asm's result live


@triton.jit
def _loads_prefetch_kernel(ptr, n, sink_ptr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(ITERS):
        offs = (pid * ITERS + i).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        acc ^= tl.load(ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + pid, tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def sink_size(nbytes: int, mode: str) -> int:
    """int32 slots the kernel for `mode` may write for a prefetch of `nbytes`."""
    if mode == "bulk":
        return triton.cdiv(nbytes, BULK_CHUNK * BULK_LANES) * BULK_LANES
    return triton.cdiv(triton.cdiv(nbytes, 4), LOADS_BLOCK * LOADS_ITERS)


def prefetch(t: torch.Tensor, nbytes: int, mode: str, sink: torch.Tensor) -> None:
    """Read the first `nbytes` of contiguous `t` (a multiple of 16, 16-byte aligned) into L2."""
    flat = t.view(-1).view(torch.uint8)[:nbytes]
    if mode == "bulk":
        _bulk_prefetch_kernel[(triton.cdiv(nbytes, BULK_CHUNK * BULK_LANES),)](
            flat, nbytes, sink, CHUNK=BULK_CHUNK, LANES=BULK_LANES, num_warps=1)
    elif mode == "loads":
        words = flat.view(torch.int32)
        _loads_prefetch_kernel[(sink_size(nbytes, mode),)](words, words.numel(), sink, BLOCK=LOADS_BLOCK,
                                                           ITERS=LOADS_ITERS, num_warps=4)
    else:
        raise ValueError(f"unknown prefetch mode {mode!r}; expected 'bulk' or 'loads'")
