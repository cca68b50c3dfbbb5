"""Fused Triton versions of quantize.quantize_blocks / dequantize_blocks (CUDA tensors only).

One kernel each instead of torch's chain of elementwise ops and a reduction; same arguments, same
results bit for bit (scale = absmax times the reciprocal, IEEE division, round-half-even, as
torch does them). Imported only for CUDA
tensors, where Triton is installed. Anything the kernels don't cover (fp16, which is a single cast
already; a block that is not a power of two; a CPU tensor) goes to the torch versions.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import quantize as _torch

_FP32_MAX: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).max)
_INT8_NAN: tl.constexpr = tl.constexpr(-128)
# Values per program: enough work per program to hide memory latency at any block size.
_VALUES_PER_PROGRAM = 2048


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, nblocks, QMAX: tl.constexpr, IS_INT8: tl.constexpr,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < nblocks
    offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offs, mask=live[:, None], other=0.0).to(tl.float32)
    a = tl.abs(x)
    a = tl.where(a != a, 0.0, tl.minimum(a, _FP32_MAX))  # as torch: NaN counts 0, inf fp32 max
    scale = tl.max(a, axis=1) * (1.0 / QMAX)
    scale = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(x, scale[:, None])
    clamped = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT8:
        q = tl.where(y != y, _INT8_NAN, libdevice.rint(clamped)).to(tl.int8)
    else:
        q = tl.where(y != y, y, clamped).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    tl.store(q_ptr + offs, q, mask=live[:, None])
    tl.store(s_ptr + rows, scale, mask=live)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, nblocks, IS_INT8: tl.constexpr, BLOCK: tl.constexpr,
                       ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < nblocks
    offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    q = tl.load(q_ptr + offs, mask=live[:, None])  # masked lanes are never stored
    s = tl.load(s_ptr + rows, mask=live, other=1.0)
    x = q.to(tl.float32) * s[:, None]
    if IS_INT8:
        x = tl.where(q == _INT8_NAN, float("nan"), x)
    tl.store(out_ptr + offs, x, mask=live[:, None])


def _fused(x: torch.Tensor, fmt: str, block: int) -> bool:
    return x.is_cuda and fmt != "fp16" and block & (block - 1) == 0


def _rows(block: int) -> int:
    return max(1, _VALUES_PER_PROGRAM // block)


def quantize_blocks(x_flat: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not _fused(x_flat, fmt, block) or x_flat.dim() != 1 or x_flat.numel() % block:
        return _torch.quantize_blocks(x_flat, fmt, block)  # also raises for bad arguments
    x = x_flat.contiguous()
    nblocks = x.numel() // block
    q = torch.empty(x.numel(), dtype=_torch.code_dtype(fmt), device=x.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    rows = _rows(block)
    if nblocks:
        _quantize_kernel[(triton.cdiv(nblocks, rows),)](
            x, q, scales, nblocks, QMAX=_torch.qmax(fmt), IS_INT8=fmt == "int8", BLOCK=block, ROWS=rows)
    return q, scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor | None, fmt: str, block: int) -> torch.Tensor:
    if not _fused(q, fmt, block) or q.numel() % block:
        return _torch.dequantize_blocks(q, scales, fmt, block)
    q = q.reshape(-1).contiguous()
    scales = scales.reshape(-1).contiguous()
    nblocks = q.numel() // block
    out = torch.empty(q.numel(), dtype=torch.float32, device=q.device)
    rows = _rows(block)
    if nblocks:
        _dequantize_kernel[(triton.cdiv(nblocks, rows),)](
            q, scales, out, nblocks, IS_INT8=fmt == "int8", BLOCK=block, ROWS=rows)
    return out
