"""Block quantisation for the quantised all-reduce, in plain torch.

A flat tensor is cut into blocks of `block` values; int8 and fp8 store one fp32 scale per block
(symmetric, scale = absmax / largest code), fp16 is a plain cast with no scales. These two functions
are the seam a fused kernel replaces: same arguments, same outputs (see triton_quantize.py).

Edge cases, chosen so that a quantised all-reduce never yields NaN or inf where the exact one
would not:
- scales are computed in fp32, with +-inf counted as +-fp32 max: a block holding an overflowed
  value (say an owner's sum past fp32 range) saturates to +-fp32 max, which a bf16 result rounds
  back to inf, instead of getting an infinite scale that turns its neighbours into NaN (0 * inf);
- an all-zero block gets scale 1, not 0, so quantising it divides 0 by 1, not 0 by 0;
- out-of-range values saturate. For fp16, which has no scale, that means |x| > 65504 comes back
  as 65504: finite but wrong, so fp16 suits activations known to stay in range;
- NaN stays NaN (int8 carries it in -128, a code the symmetric range never uses), as it would
  in an exact all-reduce.
"""
from __future__ import annotations

import torch

FORMATS = ("int8", "fp8", "fp16")

# The largest magnitude each format's codes can hold: the scale maps a block's absmax onto it.
_QMAX = {"int8": 127.0, "fp8": torch.finfo(torch.float8_e4m3fn).max, "fp16": torch.finfo(torch.float16).max}
_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn, "fp16": torch.float16}
_INT8_NAN = -128
_FP32_MAX = torch.finfo(torch.float32).max


def code_dtype(fmt: str) -> torch.dtype:
    """The dtype quantize_blocks returns its codes in."""
    _check(fmt, 1)
    return _QDTYPE[fmt]


def has_scales(fmt: str) -> bool:
    return fmt != "fp16"


def qmax(fmt: str) -> float:
    """The largest code magnitude: a block's absmax maps onto it."""
    _check(fmt, 1)
    return _QMAX[fmt]


def quantize_blocks(x_flat: torch.Tensor, fmt: str, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Quantise a 1-D float tensor whose length is a multiple of `block`.

    Returns (codes, scales): codes has x_flat's length and dtype code_dtype(fmt); scales is fp32 with
    one value per block, or None for fp16. x ~= codes.float() * scale of its block.
    """
    _check(fmt, block)
    if x_flat.dim() != 1 or x_flat.numel() % block:
        raise ValueError(f"quantize_blocks wants a 1-D tensor of a multiple of {block} values, "
                         f"got shape {tuple(x_flat.shape)}")
    top = _QMAX[fmt]
    x = x_flat.float()
    if fmt == "fp16":
        return x.clamp(-top, top).to(torch.float16), None
    x = x.view(-1, block)
    absmax = x.abs().nan_to_num(nan=0.0, posinf=_FP32_MAX).amax(dim=1)
    # Times the reciprocal, not divided: torch's CUDA kernels turn a division by a scalar into this,
    # so CPU, CUDA and the fused kernel compute the same scales.
    scales = absmax * (1.0 / top)
    # A zero scale (all-zero block, or an absmax so small it underflows) would divide 0 by 0.
    scales = torch.where(scales > 0, scales, 1.0)
    y = (x / scales[:, None]).clamp(-top, top)
    if fmt == "int8":
        q = torch.where(torch.isnan(y), _INT8_NAN, y.round()).to(torch.int8)
    else:
        q = y.to(torch.float8_e4m3fn)
    return q.view(-1), scales


def dequantize_blocks(q: torch.Tensor, scales: torch.Tensor | None, fmt: str, block: int) -> torch.Tensor:
    """Inverse of quantize_blocks: fp32, q's length (q may have any shape; it is read flat)."""
    _check(fmt, block)
    if fmt == "fp16":
        return q.reshape(-1).float()
    x = q.reshape(-1, block).float() * scales.reshape(-1, 1)
    if fmt == "int8":
        x = torch.where(q.reshape(-1, block) == _INT8_NAN, float("nan"), x)
    return x.view(-1)


def _check(fmt: str, block: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantisation format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
