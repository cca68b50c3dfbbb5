"""Block quantisation for the quantised all-reduce, in plain torch.

A flat tensor is cut into blocks of `block` values; int8 and fp8 store one fp32 scale per block
(symmetric, scale = absmax / largest code), fp16 is a plain cast with no scales. quantize_blocks
and dequantize_blocks define the numbers; triton_quantize.py has fused kernels with the same
arguments and outputs.

The quantised all-reduce moves codes and scales packed in one uint8 buffer of `parts` rows, one per
rank: row j holds chunk j's codes, then its fp32 scales. quantize_pack / reduce_requantise /
unpack_dequantise are its three steps on that layout, written here as the plain composition of
quantize_blocks / dequantize_blocks; triton_quantize.py fuses each into one pass over memory.

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

import math

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


def chunk_values(n: int, parts: int, block: int) -> int:
    """Values per part when n values are cut into `parts` equal chunks of whole blocks, padded with
    zeros at the end. A whole number of 4-block groups: with 1-byte codes, every part's codes and
    scales then start 16-byte aligned, so kernels move them in 16-byte vectors. (Padding adds zero
    blocks only: a block's codes never depend on where chunks end.)"""
    group = 4 * block
    return -(-n // (parts * group)) * group


def part_bytes(chunk: int, fmt: str, block: int) -> int:
    """Bytes of one packed part: a chunk's codes, then its scales."""
    scale_bytes = chunk // block * 4 if has_scales(fmt) else 0
    return chunk * code_dtype(fmt).itemsize + scale_bytes


def part_chunk(nbytes: int, fmt: str, block: int) -> int:
    """The chunk (values per part) of a packed part of `nbytes` bytes (the inverse of part_bytes)."""
    per_block = block * code_dtype(fmt).itemsize + (4 if has_scales(fmt) else 0)
    if nbytes % per_block:
        raise ValueError(f"{nbytes} bytes are not a packed {fmt} part of block {block}")
    return nbytes // per_block * block


def packed_chunk(packed: torch.Tensor, fmt: str, block: int) -> int:
    """The chunk (values per part) of a packed (parts, bytes) uint8 buffer."""
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        raise ValueError(f"not a packed {fmt} buffer of block {block}: {packed.dtype} {tuple(packed.shape)}")
    try:
        return part_chunk(packed.shape[1], fmt, block)
    except ValueError:
        raise ValueError(f"not a packed {fmt} buffer of block {block}: {packed.dtype} {tuple(packed.shape)}") from None


def packed_out(out: torch.Tensor | None, parts: int, nbytes: int, device) -> torch.Tensor:
    """`out` checked to be a (parts, nbytes) uint8 buffer on `device` (e.g. a view of a symmetric
    buffer), or a new one."""
    if out is None:
        return torch.empty(parts, nbytes, dtype=torch.uint8, device=device)
    if out.shape != (parts, nbytes) or out.dtype != torch.uint8 or out.device != torch.device(device):
        raise ValueError(f"out must be ({parts}, {nbytes}) uint8 on {device}, got {tuple(out.shape)} {out.dtype} "
                         f"on {out.device}")
    return out


def quantize_pack(x: torch.Tensor, fmt: str, block: int, parts: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Quantise x (any shape, read flat, padded with zeros to parts * chunk_values) and pack it:
    (parts, part_bytes) uint8, part j = chunk j's codes then its scales; into `out` if given."""
    n = x.numel()
    chunk = chunk_values(n, parts, block)
    flat = torch.nn.functional.pad(x.reshape(-1), (0, parts * chunk - n))
    packed = _pack(*quantize_blocks(flat, fmt, block), parts)
    if out is None:
        return packed
    return packed_out(out, parts, packed.shape[1], x.device).copy_(packed)


def reduce_requantise(got: torch.Tensor, fmt: str, block: int, out: torch.Tensor) -> torch.Tensor:
    """The owner's step: dequantise the parts of `got` (parts, bytes), sum them in fp32 in row
    order (0 + row 0 + row 1 + ..., as torch.sum does), requantise the sum and write it packed into
    `out` (part_bytes uint8, e.g. this rank's row of the all-gather buffer). Returns out."""
    parts, chunk = got.shape[0], packed_chunk(got, fmt, block)
    pieces = dequantize_blocks(*_unpack(got, fmt, chunk), fmt, block).view(parts, chunk)
    total = torch.zeros(chunk, dtype=torch.float32, device=got.device)
    for piece in pieces:
        total = total + piece
    out.view(-1).copy_(_pack(*quantize_blocks(total, fmt, block), 1).view(-1))
    return out


def unpack_dequantise(packed: torch.Tensor, fmt: str, block: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """Dequantise a packed (parts, bytes) buffer: its first prod(shape) values, in `dtype` and `shape`."""
    chunk = packed_chunk(packed, fmt, block)
    n = math.prod(shape)
    return dequantize_blocks(*_unpack(packed, fmt, chunk), fmt, block)[:n].to(dtype).view(shape)


def _pack(q: torch.Tensor, scales: torch.Tensor | None, parts: int) -> torch.Tensor:
    # uint8 because neither gloo nor older NCCL move float8 (and codes are never summed by the backend).
    payload = q.view(torch.uint8).view(parts, -1)
    if scales is None:
        return payload
    return torch.cat([payload, scales.view(torch.uint8).view(parts, -1)], dim=1)


def _unpack(packed: torch.Tensor, fmt: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype = code_dtype(fmt)
    code_bytes = chunk * dtype.itemsize
    q = packed[:, :code_bytes].contiguous().view(dtype)
    scales = packed[:, code_bytes:].contiguous().view(torch.float32) if has_scales(fmt) else None
    return q, scales


def _check(fmt: str, block: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantisation format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")
