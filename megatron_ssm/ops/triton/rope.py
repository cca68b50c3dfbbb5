"""Rotary embedding in one launch: a program per (token, head) rotates its pairs in fp32 (the
reference rounds cos and sin to the activations' dtype first, as HF does: the kernel's result is
the more exact one, within that rounding of it)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import enter as pdl_enter


@triton.jit
def _rope_kernel(x_ptr, pos_ptr, f_ptr, y_ptr, L, sx_b, sx_l, sx_h, sp_b, sp_l, sy_b, sy_l, sy_h,
                 HALF: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
                 PDL: tl.constexpr):
    pdl_enter(PDL)
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = (t // L).to(tl.int64)
    i = (t % L).to(tl.int64)
    pos = tl.load(pos_ptr + b * sp_b + i * sp_l).to(tl.float32)
    j = tl.arange(0, BLOCK_H)
    m = j < HALF
    angle = pos * tl.load(f_ptr + j, mask=m, other=0.0)
    c, s = tl.cos(angle), tl.sin(angle)
    src = x_ptr + b * sx_b + i * sx_l + h * sx_h
    dst = y_ptr + b * sy_b + i * sy_l + h * sy_h
    x1 = tl.load(src + j, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + j, mask=m, other=0.0).to(tl.float32)
    tl.store(dst + j, (x1 * c - x2 * s).to(y_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF + j, (x2 * c + x1 * s).to(y_ptr.dtype.element_ty), mask=m)
    if BLOCK_R > 0:  # the channels past the rotary ones pass through
        r = 2 * HALF + tl.arange(0, BLOCK_R)
        rm = r < D
        tl.store(dst + r, tl.load(src + r, mask=rm, other=0.0), mask=rm)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    b, L, heads, d = x.shape
    half = inv_freq.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(b, L, heads, d, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    positions = positions.expand(b, L)
    inv_freq = inv_freq.to(torch.float32).contiguous()
    on = pdl.use(x.device)
    rest = d - 2 * half
    _rope_kernel[(b * L, heads)](
        x, positions, inv_freq, y, L, x.stride(0), x.stride(1), x.stride(2), positions.stride(0), positions.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        HALF=half, D=d, BLOCK_H=triton.next_power_of_2(half), BLOCK_R=triton.next_power_of_2(rest) if rest else 0,
        PDL=on, num_warps=1, **pdl.kwargs(on),
    )
    return y
