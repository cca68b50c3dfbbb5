"""Fused Triton versions of the all-reduce's three steps in quantize.py (CUDA tensors only).

One kernel each instead of torch's chain of copies, elementwise ops and reductions; same arguments,
same results bit for bit (scale = absmax times the reciprocal, IEEE division, round-half-even, the
owner's sum in rank order, as the torch versions do them). Imported only for CUDA tensors, where
Triton is installed. Anything the kernels don't cover (a block that is not a power of two; a CPU
tensor) goes to the torch versions. Under TRITON_INTERPRET=1 CPU tensors run the kernels too, so tests can check them
without a GPU.

The all-reduce's three steps read and write the packed (parts, part_bytes) uint8 buffers directly:
- quantize_pack: input (any float dtype, read flat; values past its end count as 0) -> send buffer;
- reduce_requantise: received buffer -> dequantise, sum, requantise -> one row of the gather buffer;
- unpack_dequantise: gathered buffer -> the first n values, in the output dtype.
Each touches its input and output once; fp32 values exist only in registers. fp16 runs the same
three kernels with HAS_SCALES off: its codes are float16 (2 bytes each, read and written through a
float16 view of the buffer), quantising is a clamped cast and there are no scales to load or store.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..ops.triton.runtime import INTERPRETED
from . import quantize as _torch

_FP32_MAX: tl.constexpr = tl.constexpr(torch.finfo(torch.float32).max)
_INT8_NAN: tl.constexpr = tl.constexpr(-128)
_ROUNDER: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2^23: fp32 values past it are integers
# Values per program: enough work per program to hide memory latency at any block size.
_VALUES_PER_PROGRAM = 2048


@triton.jit
def _quantise_rows(x, QMAX: tl.constexpr, IS_INT8: tl.constexpr):
    """fp32 [rows, BLOCK] -> (codes as uint8 bits, one fp32 scale per row), as quantize_blocks."""
    a = tl.abs(x)
    a = tl.where(a != a, 0.0, tl.minimum(a, _FP32_MAX))  # as torch: NaN counts 0, inf fp32 max
    scale = tl.max(a, axis=1) * (1.0 / QMAX)
    scale = tl.where(scale > 0, scale, 1.0)
    y = tl.math.div_rn(x, scale[:, None])
    clamped = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_INT8:
        # Round half to even by adding and subtracting 1.5 * 2^23: exact for |clamped| <= 127, and
        # unlike libdevice.rint it also runs in Triton's CPU interpreter.
        rounded = (clamped + _ROUNDER) - _ROUNDER
        q = tl.where(y != y, _INT8_NAN, rounded).to(tl.int8)
    else:
        q = tl.where(y != y, y, clamped).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return q.to(tl.uint8, bitcast=True), scale


@triton.jit
def _clamp_to_fp16(x, QMAX: tl.constexpr):
    """fp32 -> fp16 codes, as quantize_blocks for fp16: +-inf and beyond +-QMAX saturate, NaN stays NaN
    (minimum / maximum may drop a NaN on the GPU, hence the where)."""
    clamped = tl.minimum(tl.maximum(x, -QMAX), QMAX)
    return tl.where(x != x, x, clamped).to(tl.float16, fp_downcast_rounding="rtne")


@triton.jit
def _dequantise_rows(codes, scale, IS_INT8: tl.constexpr):
    """uint8 code bits [rows, BLOCK] and fp32 scales [rows] -> fp32, as dequantize_blocks."""
    if IS_INT8:
        q = codes.to(tl.int8, bitcast=True)
        x = q.to(tl.float32) * scale[:, None]
        x = tl.where(q == _INT8_NAN, float("nan"), x)
    else:
        x = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale[:, None]
    return x


# Packed buffers are passed twice: as codes (uint8 bits for int8 / fp8, float16 for fp16) and as a
# float32 view of the same memory (scales). Part j's codes start at code j * part_bytes / CODE_BYTES,
# its scales (int8 / fp8 only) at word (j * part_bytes + chunk) / 4 (one-byte codes there;
# chunk_values keeps both multiples of 16 bytes).

@triton.jit
def _quantize_pack_kernel(x_ptr, codes_ptr, scales_ptr, n, nblocks, chunk, part_bytes,
                          QMAX: tl.constexpr, IS_INT8: tl.constexpr, HAS_SCALES: tl.constexpr,
                          CODE_BYTES: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # global block index
    live = rows < nblocks
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)  # past n: the zero padding
    part, inner = rows // (chunk // BLOCK), rows % (chunk // BLOCK)
    if HAS_SCALES:
        q, scale = _quantise_rows(x, QMAX, IS_INT8)
        tl.store(scales_ptr + (part * part_bytes + chunk) // 4 + inner, scale, mask=live)
    else:
        q = _clamp_to_fp16(x, QMAX)
    base = part * (part_bytes // CODE_BYTES)
    tl.store(codes_ptr + base[:, None] + inner[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :], q,
             mask=live[:, None])


@triton.jit
def _part_row(buf_ptr, peers_ptr, part, part_bytes, offset, PEERS: tl.constexpr):
    """Byte address (a uint8 pointer, or a tensor of them for a tensor of parts) of packed part
    `part`: row `part` of a local (parts, part_bytes) buffer, or, with PEERS, byte `offset` of rank
    `part`'s symmetric buffer (peers_ptr: every rank's buffer address as int64, mapped here)."""
    if PEERS:
        return tl.load(peers_ptr + part).to(tl.pointer_type(tl.uint8)) + offset
    return buf_ptr + part * part_bytes


@triton.jit
def _reduce_requantise_kernel(got_codes_ptr, got_scales_ptr, peers_ptr, offset, out_codes_ptr, out_scales_ptr, chunk,
                              part_bytes, PARTS: tl.constexpr, QMAX: tl.constexpr, IS_INT8: tl.constexpr,
                              HAS_SCALES: tl.constexpr, CODE_BYTES: tl.constexpr, BLOCK: tl.constexpr,
                              ROWS: tl.constexpr, PEERS: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # block index within the chunk
    live = rows < chunk // BLOCK
    code_offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    stride = part_bytes.to(tl.int64)
    got_bytes = got_codes_ptr.to(tl.pointer_type(tl.uint8))
    total = tl.zeros((ROWS, BLOCK), dtype=tl.float32)  # 0 + row 0 + row 1 ...: torch.sum's order
    for j in tl.static_range(PARTS):
        row = _part_row(got_bytes, peers_ptr, j, stride, offset, PEERS)
        codes = tl.load(row.to(got_codes_ptr.dtype) + code_offs, mask=live[:, None], other=0)
        if HAS_SCALES:
            scale = tl.load((row + chunk).to(got_scales_ptr.dtype) + rows, mask=live, other=1.0)
            total += _dequantise_rows(codes, scale, IS_INT8)
        else:
            total += codes.to(tl.float32)
    if HAS_SCALES:
        q, scale = _quantise_rows(total, QMAX, IS_INT8)
        tl.store(out_scales_ptr + chunk // 4 + rows, scale, mask=live)
    else:
        q = _clamp_to_fp16(total, QMAX)
    tl.store(out_codes_ptr + code_offs, q, mask=live[:, None])


@triton.jit
def _unpack_dequantise_kernel(codes_ptr, scales_ptr, peers_ptr, offset, out_ptr, n, chunk, part_bytes,
                              IS_INT8: tl.constexpr, HAS_SCALES: tl.constexpr, CODE_BYTES: tl.constexpr,
                              BLOCK: tl.constexpr, ROWS: tl.constexpr, PEERS: tl.constexpr):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # global block index
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    live = offs < n
    part, inner = rows // (chunk // BLOCK), rows % (chunk // BLOCK)
    row = _part_row(codes_ptr.to(tl.pointer_type(tl.uint8)), peers_ptr, part, part_bytes.to(tl.int64), offset, PEERS)
    codes = tl.load(row[:, None].to(codes_ptr.dtype) + inner[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :],
                    mask=live, other=0)
    if HAS_SCALES:
        scale = tl.load((row + chunk).to(scales_ptr.dtype) + inner, mask=rows * BLOCK < n, other=1.0)
        x = _dequantise_rows(codes, scale, IS_INT8)
    else:
        x = codes.to(tl.float32)
    tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=live)


def _fused(x: torch.Tensor, block: int) -> bool:
    return (x.is_cuda or INTERPRETED) and block & (block - 1) == 0


def _rows(block: int) -> int:
    return max(1, _VALUES_PER_PROGRAM // block)


def _packed_meta(fmt: str, block: int) -> dict:
    return dict(IS_INT8=fmt == "int8", BLOCK=block, ROWS=_rows(block), HAS_SCALES=_torch.has_scales(fmt),
                CODE_BYTES=_torch.code_dtype(fmt).itemsize)


def _views(buf: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed uint8 buffer (or row) as the kernels' (codes, scales) arguments: its uint8 code bits and a
    float32 view for int8 / fp8; for fp16 a float16 view, passed twice (the kernels read no scales)."""
    if _torch.has_scales(fmt):
        return buf, buf.view(torch.float32)
    codes = buf.view(_torch.code_dtype(fmt))
    return codes, codes


def quantize_pack(x: torch.Tensor, fmt: str, block: int, parts: int, out: torch.Tensor | None = None) -> torch.Tensor:
    if not _fused(x, block):
        return _torch.quantize_pack(x, fmt, block, parts, out)
    x = x.contiguous()  # read flat in place: no padded copy
    chunk = _torch.chunk_values(x.numel(), parts, block)
    nbytes = _torch.part_bytes(chunk, fmt, block)
    out = _torch.packed_out(out, parts, nbytes, x.device)
    nblocks = parts * chunk // block
    if nblocks:
        _quantize_pack_kernel[(triton.cdiv(nblocks, _rows(block)),)](
            x, *_views(out, fmt), x.numel(), nblocks, chunk, nbytes, QMAX=_torch.qmax(fmt),
            **_packed_meta(fmt, block))
    return out


def reduce_requantise(got: torch.Tensor, fmt: str, block: int, out: torch.Tensor) -> torch.Tensor:
    if not _fused(got, block):
        return _torch.reduce_requantise(got, fmt, block, out)
    chunk = _torch.packed_chunk(got, fmt, block)
    got = got.contiguous()
    if chunk:
        # No fused multiply-add: dequantise (a product) and sum are rounded separately, as in torch.
        _reduce_requantise_kernel[(triton.cdiv(chunk // block, _rows(block)),)](
            *_views(got, fmt), got, 0, *_views(out, fmt), chunk, got.shape[1], PARTS=got.shape[0],
            QMAX=_torch.qmax(fmt), **_packed_meta(fmt, block), PEERS=False, enable_fp_fusion=False)
    return out


def reduce_requantise_peers(peers: torch.Tensor, offset: int, part_bytes: int, fmt: str, block: int,
                            out: torch.Tensor) -> torch.Tensor:
    """reduce_requantise with part j read where rank j holds it: `part_bytes` bytes from `offset` of
    the symmetric buffer at address peers[j] (int64, one per rank, mapped on this device), instead
    of row j of a received buffer. `out` (part_bytes uint8) gets the requantised sum."""
    chunk = _torch.part_chunk(part_bytes, fmt, block)
    if chunk:
        _reduce_requantise_kernel[(triton.cdiv(chunk // block, _rows(block)),)](
            *_views(out.view(1, -1), fmt), peers, offset, *_views(out, fmt), chunk, part_bytes, PARTS=peers.numel(),
            QMAX=_torch.qmax(fmt), **_packed_meta(fmt, block), PEERS=True, enable_fp_fusion=False)
    return out


def unpack_dequantise(packed: torch.Tensor, fmt: str, block: int, shape, dtype: torch.dtype) -> torch.Tensor:
    if not _fused(packed, block):
        return _torch.unpack_dequantise(packed, fmt, block, shape, dtype)
    chunk = _torch.packed_chunk(packed, fmt, block)
    packed = packed.contiguous()
    n = math.prod(shape)
    if n > packed.shape[0] * chunk:
        raise ValueError(f"{tuple(shape)} wants {n} values; the packed buffer holds {packed.shape[0] * chunk}")
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    if n:
        _unpack_dequantise_kernel[(triton.cdiv(triton.cdiv(n, block), _rows(block)),)](
            *_views(packed, fmt), packed, 0, out, n, chunk, packed.shape[1], **_packed_meta(fmt, block), PEERS=False)
    return out


def unpack_dequantise_peers(peers: torch.Tensor, offset: int, part_bytes: int, fmt: str, block: int, shape,
                            dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """unpack_dequantise of the buffer whose row j is `part_bytes` bytes from `offset` of rank j's
    symmetric buffer (address peers[j]); `like` is any uint8 tensor on the device (its dtype types
    the kernel's pointers; it is not read)."""
    chunk = _torch.part_chunk(part_bytes, fmt, block)
    n = math.prod(shape)
    if n > peers.numel() * chunk:
        raise ValueError(f"{tuple(shape)} wants {n} values; the packed parts hold {peers.numel() * chunk}")
    out = torch.empty(shape, dtype=dtype, device=peers.device)
    if n:
        _unpack_dequantise_kernel[(triton.cdiv(triton.cdiv(n, block), _rows(block)),)](
            *_views(like, fmt), peers, offset, out, n, chunk, part_bytes,
            **_packed_meta(fmt, block), PEERS=True)
    return out
