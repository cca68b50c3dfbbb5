"""Each row's max and its first index, for a decode step's logits ([rows, vocabulary]).

torch reduces a row in one block: 16 us for one row of falcon-mamba-7b's 65,024 fp32 logits on an
H200, 0.4% of its whole decode step (session 11). Here a row is split over programs of BLOCK
values; each writes its block's (max, first index), and the last to arrive at the row's counter
(release/acquire, as in the skinny GEMM's split-K) reduces them and resets the counter, so
repeated and graph-captured launches need no memset.

A NaN counts as +inf (torch would return the NaN): logits are finite unless the model overflowed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reduce import row_max as reference_row_max

BLOCK = 2048
NUM_WARPS = 4
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_COUNTER_SLOTS = 1 << 12  # rows per launch, at most


@triton.jit(do_not_specialize=["V"])
def _row_max_kernel(x_ptr, val_ptr, idx_ptr, part_val_ptr, part_idx_ptr, counter_ptr, V, sx,
                    BLOCK: tl.constexpr, PARTS: tl.constexpr):
    part = tl.program_id(0)
    row = tl.program_id(1)
    parts = tl.num_programs(0)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + row.to(tl.int64) * sx + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    v = tl.where(v != v, float("inf"), v)
    best = tl.max(v, axis=0)
    first = tl.min(tl.where(v == best, offs, V), axis=0)  # V: only where the block is all -inf past V
    tl.store(part_val_ptr + row * parts + part, best)
    tl.store(part_idx_ptr + row * parts + part, first)
    tl.debug_barrier()  # the partial stored before the release below
    arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel")
    if arrived == parts - 1:
        p = tl.arange(0, PARTS)
        vals = tl.load(part_val_ptr + row * parts + p, mask=p < parts, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(part_idx_ptr + row * parts + p, mask=p < parts, other=V, cache_modifier=".cg")
        top = tl.max(vals, axis=0)
        tl.store(val_ptr + row, top)
        tl.store(idx_ptr + row, tl.min(tl.where(vals == top, idxs, V), axis=0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0)


def _counters(device: torch.device) -> torch.Tensor:
    counters = _COUNTERS.get(device)
    if counters is None:
        counters = _COUNTERS[device] = torch.zeros(_COUNTER_SLOTS, dtype=torch.int32, device=device)
    return counters


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.reduce.row_max: (values, first indices) of each row's max over the last dim."""
    v = x.shape[-1]
    x2 = x.reshape(-1, v) if x.dim() != 2 else x
    rows = x2.shape[0]
    if (x.dim() == 0 or v == 0 or rows == 0 or rows > _COUNTER_SLOTS or v >= 2**31 or not x.dtype.is_floating_point
            or x2.stride(-1) != 1):
        return reference_row_max(x)
    parts = triton.cdiv(v, BLOCK)
    values = torch.empty(rows, device=x.device, dtype=x.dtype)
    indices = torch.empty(rows, device=x.device, dtype=torch.long)
    part_val = torch.empty(rows, parts, device=x.device, dtype=torch.float32)
    part_idx = torch.empty(rows, parts, device=x.device, dtype=torch.int32)
    _row_max_kernel[(parts, rows)](x2, values, indices, part_val, part_idx, _counters(x.device), v, x2.stride(0),
                                   BLOCK=BLOCK, PARTS=triton.next_power_of_2(parts), num_warps=NUM_WARPS)
    return values.view(x.shape[:-1]), indices.view(x.shape[:-1])
