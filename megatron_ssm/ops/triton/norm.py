"""RMS norms in one kernel: the plain norm is the gated one without a gate and with one group.

One program normalises one (row, group) span held in registers. When a norm group spans TP ranks
the work splits in two launches around the caller's all-reduce: the local sum of squares, then the
normalisation with the reduced sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import enter as pdl_enter

_MAX_BLOCK = 32768  # one span in registers; wider rows are not a shape these models have

# What a launch does with the sum of squares.
_LOCAL, _WRITE_SS, _READ_SS = 0, 1, 2


@triton.jit
def _rms_norm_kernel(
    x_ptr, g_ptr, w_ptr, y_ptr, ss_ptr,
    span, divisor, eps,
    sx_row, sg_row, sy_row,
    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, MODE: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * span + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < span
    h = tl.load(x_ptr + row * sx_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g = tl.load(g_ptr + row * sg_row + offs, mask=mask, other=0.0).to(tl.float32)
        h = h * g * tl.sigmoid(g)
    if MODE == 1:
        tl.store(ss_ptr + row, tl.sum(h * h, axis=0))
    else:
        if MODE == 2:
            ss = tl.load(ss_ptr + row)
        else:
            ss = tl.sum(h * h, axis=0)
        # Round to the input dtype before the weight, as the reference does.
        out = (h * tl.rsqrt(ss / divisor + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
        if HAS_WEIGHT:
            out = out * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * sy_row + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_kernel(r_ptr, d_ptr, w_ptr, h_ptr, y_ptr, width, eps, sr_row, sd_row,
                         HAS_DELTA: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < width
    h = tl.load(r_ptr + row * sr_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        h += tl.load(d_ptr + row * sd_row + offs, mask=mask, other=0.0).to(tl.float32)
    h = h.to(h_ptr.dtype.element_ty)  # the stream's own rounding, as torch's add does it
    tl.store(h_ptr + row * width + offs, h, mask=mask)
    x = h.to(y_ptr.dtype.element_ty).to(tl.float32)  # the norm reads the stream in the weight's dtype
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    out = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32) * tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + row * width + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(residual, delta, weight, eps, residual_dtype):
    r2 = _rows(residual)
    d2 = _rows(delta) if delta is not None else r2
    rows, width = r2.shape
    block = triton.next_power_of_2(width)
    assert block <= _MAX_BLOCK, f"norm width {width} is wider than one program holds"
    h = torch.empty(rows, width, device=residual.device, dtype=residual_dtype)
    y = torch.empty(rows, width, device=residual.device, dtype=weight.dtype)
    on = pdl.use(residual.device)
    _add_rms_norm_kernel[(rows,)](r2, d2, weight, h, y, width, float(eps), r2.stride(0), d2.stride(0),
                                  HAS_DELTA=delta is not None, PDL=on, BLOCK=block,
                                  num_warps=min(16, max(1, block // 512)), **pdl.kwargs(on))
    shape = residual.shape
    return y.view(shape), h.view(shape)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(x, gate, weight, eps, span, divisor, mode, ss=None):
    x2 = _rows(x)
    g2 = _rows(gate) if gate is not None else x2
    rows, width = x2.shape
    out_dtype = x.dtype if weight is None else torch.promote_types(weight.dtype, x.dtype)
    block = triton.next_power_of_2(span)
    assert block <= _MAX_BLOCK, f"norm span {span} is wider than one program holds"
    num_warps = min(16, max(1, block // 512))
    on = pdl.use(x.device)
    if mode == _WRITE_SS:
        ss = torch.empty(rows, device=x.device, dtype=torch.float32)
        y2 = x2  # not written
    else:
        y2 = torch.empty(rows, width, device=x.device, dtype=out_dtype)
    _rms_norm_kernel[(rows, width // span)](
        x2, g2, weight if weight is not None else x2, y2, ss if ss is not None else x2,
        span, float(divisor), float(eps),
        x2.stride(0), g2.stride(0), y2.stride(0),
        HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None, MODE=mode, PDL=on, BLOCK=block,
        num_warps=num_warps, **pdl.kwargs(on),
    )
    return ss if mode == _WRITE_SS else y2.view(*x.shape[:-1], width)


def rms_norm(x, weight, eps):
    return _launch(x, None, weight, eps, span=x.shape[-1], divisor=x.shape[-1], mode=_LOCAL)


def gated_rms_norm(y, gate, weight, eps, group_size, reduce_sum_of_squares=None):
    if reduce_sum_of_squares is None:
        return _launch(y, gate, weight, eps, span=group_size, divisor=group_size, mode=_LOCAL)
    width = y.shape[-1]
    local = _launch(y, gate, None, eps, span=width, divisor=group_size, mode=_WRITE_SS)
    ss = reduce_sum_of_squares(local.view(*y.shape[:-1], 1))
    ss = ss.reshape(-1).to(torch.float32).contiguous()
    return _launch(y, gate, weight, eps, span=width, divisor=group_size, mode=_READ_SS, ss=ss)
