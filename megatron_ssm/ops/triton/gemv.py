"""Skinny GEMMs for decode: y = (x @ W^T + bias) * scale for a few rows of x, at the weights' read bandwidth.

A decode step's projections have M = batch x tokens rows (1..16) against weights of megabytes: the
time is the weight read. cuBLAS reaches ~80% of an H200's copy bandwidth on wide outputs and ~60% on
narrow ones, where it splits K and reduces in a second kernel. Here one program reads a
[BLOCK_N, BLOCK_K] weight tile per step and keeps fp32 partial products; narrow outputs split K over
programs, and the last program to finish a column tile sums the other splits' partials (loaded
together, not one split after another) and writes the output, all in one launch. Its arrival
counter resets itself, so the launch can be captured in a CUDA graph and replayed without a memset (the counters are shared by every launch on the device:
launches must not run concurrently on two streams, which the engine never does).

The products go through tl.dot with the rows padded to 16 (Triton then pipelines the weight loads
over `stages` buffers); for one row the tuner also tries elementwise products reduced once at the
end. On an H200 the tuner took the dot path at M = 1 too on all but the narrowest output (2026-12-01,
docs/benchmarks.md).

Each (M bucket, N, K, dtype, bias) shape is timed once on its first call outside graph capture,
among a few tile shapes and splits and cuBLAS itself; the fastest is kept (`tuned()` lists them).
Captured before any eager call, a shape takes a heuristic configuration.

In a captured graph (decode) on Hopper each launch is a programmatic dependent of the kernel before
it (ops/triton/pdl.py; `MEGATRON_SSM_PDL=0` turns it off): its programs are scheduled while that
kernel drains and wait for it to end. While they wait, each asks L2 for the first lines of its
weight rows (`MEGATRON_SSM_GEMV_PREFETCH` bytes a row, 0: none), which the graph never changes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..linear import Factors, RowRms, linear as ref_linear
from ..norm import EntryParts, linear_into_entry as ref_linear_into_entry
from . import pdl as _pdl
from .norm import _rows, add_rms_norm
from .pdl import enter as _pdl_enter
from .runtime import INTERPRETED

_LOCKS: dict[torch.device, torch.Tensor] = {}
_LOCK_SLOTS = 1 << 16  # column tiles per launch, at most: N / BLOCK_N for any weight we hold
_REDUCE_TILE = 4096  # fp32 partials the reducing program loads at once (32 a thread at 4 warps)
_NORM_TILE = 4096  # stream elements an entry's program loads at once for its rows' sums of squares
_LINE = 128  # bytes of an L2 line
# Bytes of each weight row of its slice that a program of a PDL launch hints to L2 before its wait.
# 256 measured best on the H200 (graphed steps, session 11): mamba2-2.7b b1 2.317 -> 2.300 ms, b16
# 3.935 -> 3.860; falcon-mamba-7b b1 4.280 -> 4.216, b32 unchanged. More is slower (4096: +8%,
# the whole slice: +13-24%): the hints then compete with the kernel before and with the loop's own loads.
PREFETCH_ENV = "MEGATRON_SSM_GEMV_PREFETCH"
PREFETCH_DEFAULT = 256
# The same only for projections that narrow (K > N: out_proj, x_proj, which follow a mixer kernel
# that leaves HBM mostly idle) measured slower still: 1024 / 4096 / the whole slice +0.23 / +0.54 /
# +0.54 us a layer of mamba2-2.7b b1, +0.30 / +2.0 / +7.8 of falcon-mamba-7b b1 (session 14).


# M and the split count vary between calls of one shape (batch buckets, tuning): one compile for all.
# k_per_split stays specialised: its divisibility is what lets the weight loads be 16-byte vectors.
@triton.jit(do_not_specialize=["M", "splits"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, r_ptr, y_ptr, part_ptr, lock_ptr, d_ptr, nw_ptr, h_ptr, xs_ptr,
    e_res_ptr, e_nw_ptr, e_h_ptr, e_xw_ptr, e_sq_ptr,
    M, N, K, k_per_split, splits, alpha, eps, rs_parts, rs_width, rs_eps,
    sxm, swn, sym, sdm, shm, s_res_m, s_eh_m, s_exw_m,
    EXIT: tl.constexpr, BLOCK_T: tl.constexpr,
    NORM: tl.constexpr, HAS_DELTA: tl.constexpr, NORM_ROWS: tl.constexpr, NORM_BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, ROW_SCALE: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    RED_ROWS: tl.constexpr, RED_SPLITS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * swn
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * sxm
    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # Under PDL everything waits, the weights too: reading the first weight tile before the wait (it
    # is constant in the graph) measured 7-11% slower a decode step, as that peeled loop loses
    # Triton's own pipelining of the loads (docs/benchmarks.md, session 7). A hint to L2 holds no
    # register and changes no loop: the program's first PREFETCH_LINES lines of each weight row
    # stream from HBM while the kernel before still runs.
    if PREFETCH_LINES > 0:
        offs_l = tl.minimum(k_lo + tl.arange(0, PREFETCH_LINES) * LINE, k_hi - 1)
        _prefetch_l2(w_ptr + tl.minimum(offs_n, N - 1).to(tl.int64)[:, None] * swn + offs_l[None, :])
    _pdl_enter(PDL)
    if NORM:
        # x is the block's entry: norm(residual + delta). The norm's scale needs each row's whole
        # sum of squares, so every program reads its rows once before its K slice (from L2: the
        # previous kernel just wrote them); the first column tile's programs write the stream of
        # their slice.
        offs_q = pid_m * BLOCK_M + tl.arange(0, NORM_ROWS)  # one row, or the tile's rows
        first_tile = (tl.arange(0, NORM_BLOCK) * 0 + pid_n) == 0
        ss = tl.zeros((NORM_ROWS,), dtype=tl.float32)
        for q0 in range(0, K, NORM_BLOCK):
            offs_qk = q0 + tl.arange(0, NORM_BLOCK)
            q_mask = (offs_q < M)[:, None] & (offs_qk < K)[None, :]
            hs = _stream(x_ptr, d_ptr, offs_q, offs_qk, sxm, sdm, q_mask, HAS_DELTA, h_ptr.dtype.element_ty)
            own = first_tile & (offs_qk >= k_lo) & (offs_qk < k_hi)
            tl.store(h_ptr + offs_q.to(tl.int64)[:, None] * shm + offs_qk[None, :], hs, mask=q_mask & own[None, :])
            hq = hs.to(w_ptr.dtype.element_ty).to(tl.float32)
            ss += tl.sum(hq * hq, axis=1)
        rstd = tl.rsqrt(ss / K + eps)[:, None]
        # The slice's x, normed as the add_rms_norm kernel norms it, into xs, for the K loop to load
        # as it loads a plain x: loads that reach tl.dot through arithmetic are not loaded ahead by
        # Triton's pipeliner, so the loop waited on them each step (2.5x a falcon-mamba-7b decode
        # step, session 10). Other column tiles' programs write the same values to the same places.
        for q0 in range(k_lo, k_hi, NORM_BLOCK):
            offs_qk = q0 + tl.arange(0, NORM_BLOCK)
            in_slice = offs_qk < k_hi
            q_mask = (offs_q < M)[:, None] & in_slice[None, :]
            hs = _stream(x_ptr, d_ptr, offs_q, offs_qk, sxm, sdm, q_mask, HAS_DELTA, h_ptr.dtype.element_ty)
            xn = (hs.to(w_ptr.dtype.element_ty).to(tl.float32) * rstd).to(w_ptr.dtype.element_ty).to(tl.float32)
            xn = xn * tl.load(nw_ptr + offs_qk, mask=in_slice, other=0.0).to(tl.float32)[None, :]
            tl.store(xs_ptr + offs_q.to(tl.int64)[:, None] * K + offs_qk[None, :], xn.to(w_ptr.dtype.element_ty),
                     mask=q_mask)
        tl.debug_barrier()  # the program's own stores, read back by other threads in the loop
        x_rows = xs_ptr + offs_m.to(tl.int64)[:, None] * K
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = tl.multiple_of(k0, 16) + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no mask along K: a mask of unknown alignment would split the loads into scalars
            x_mask = m_mask[:, None]
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < k_hi
            x_mask = m_mask[:, None] & k_mask[None, :]
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        if USE_DOT:
            if UPCAST:
                acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc2 += w.to(tl.float32) * x.to(tl.float32)  # x is [1, BLOCK_K]
    if USE_DOT:
        out = acc  # [BLOCK_N, BLOCK_M]
    else:
        out = tl.sum(acc2, axis=1)[:, None]  # [BLOCK_N, 1]
    y_offs = offs_m.to(tl.int64)[None, :] * sym + offs_n[:, None]
    y_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT:
        # Partials [splits, M, N] in fp32; the last of the tile's `splits` programs to arrive reduces.
        p_offs = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
        tl.store(part_ptr + pid_k.to(tl.int64) * M * N + p_offs, out, mask=y_mask)
        tl.debug_barrier()  # every thread's partial stored before the release below
        lock = lock_ptr + pid_n + pid_m * tl.num_programs(0)
        arrived = tl.atomic_add(lock, 1, sem="acq_rel")
        if arrived == splits - 1:
            # The partials load RED_SPLITS at a time in one [splits, BLOCK_N, rows] tile: a load a
            # split, each waiting on L2, was half of x_proj's 7.5 us (Nsight Compute, session 10).
            # RED_ROWS is 1 at one row, where the dot path's other 15 padded rows hold nothing.
            offs_r = pid_m * BLOCK_M + tl.arange(0, RED_ROWS)
            r_offs = offs_r.to(tl.int64)[None, :] * N + offs_n[:, None]
            r_mask = n_mask[:, None] & (offs_r < M)[None, :]
            total = tl.zeros((BLOCK_N, RED_ROWS), dtype=tl.float32)
            for s0 in range(0, splits, RED_SPLITS):
                offs_s = s0 + tl.arange(0, RED_SPLITS)
                tile = tl.load(part_ptr + offs_s.to(tl.int64)[:, None, None] * M * N + r_offs[None, :, :],
                               mask=(offs_s < splits)[:, None, None] & r_mask[None, :, :], other=0.0,
                               cache_modifier=".cg")
                total += tl.sum(tile, axis=0)
            total = _epilogue(total, b_ptr, s_ptr, r_ptr, alpha, offs_n, n_mask, offs_r, offs_r < M, HAS_BIAS, SCALE,
                              ROW_SCALE, rs_parts, rs_width, rs_eps, BLOCK_T)
            if EXIT:
                _exit(total.to(y_ptr.dtype.element_ty), offs_n, n_mask, offs_r, offs_r < M, pid_n, tl.num_programs(0),
                      e_res_ptr, e_nw_ptr, e_h_ptr, e_xw_ptr, e_sq_ptr, s_res_m, s_eh_m, s_exw_m)
            else:
                tl.store(y_ptr + offs_r.to(tl.int64)[None, :] * sym + offs_n[:, None],
                         total.to(y_ptr.dtype.element_ty), mask=r_mask)
            tl.atomic_xchg(lock, 0)  # ready for the next launch (or graph replay)
    else:
        out = _epilogue(out, b_ptr, s_ptr, r_ptr, alpha, offs_n, n_mask, offs_m, m_mask, HAS_BIAS, SCALE, ROW_SCALE,
                        rs_parts, rs_width, rs_eps, BLOCK_T)
        if EXIT:
            _exit(out.to(y_ptr.dtype.element_ty), offs_n, n_mask, offs_m, m_mask, pid_n, tl.num_programs(0),
                  e_res_ptr, e_nw_ptr, e_h_ptr, e_xw_ptr, e_sq_ptr, s_res_m, s_eh_m, s_exw_m)
        else:
            tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _prefetch_l2(ptrs):
    """Ask L2 to fetch the lines at `ptrs` (a hint: nothing is loaded into registers, nothing waits)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _stream(r_ptr, d_ptr, rows, cols, srm, sdm, mask, HAS_DELTA: tl.constexpr, dtype: tl.constexpr):
    """residual + delta at [rows, cols] in fp32, rounded to the stream's dtype (as torch's add does it)."""
    h = tl.load(r_ptr + rows.to(tl.int64)[:, None] * srm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DELTA:
        h += tl.load(d_ptr + rows.to(tl.int64)[:, None] * sdm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return h.to(dtype)


@triton.jit
def _epilogue(v, b_ptr, s_ptr, r_ptr, alpha, offs_n, n_mask, offs_rows, row_mask, HAS_BIAS: tl.constexpr,
              SCALE: tl.constexpr, ROW_SCALE: tl.constexpr, rs_parts, rs_width, rs_eps, BLOCK_T: tl.constexpr):
    """(v * row scale + bias) * scale in fp32 for a [BLOCK_N, rows] tile; SCALE 1: the float alpha,
    2: one factor per output feature; ROW_SCALE 1: one fp32 factor per row of x (a norm's 1/rms,
    which commutes with the projection); 2: that 1/rms from its rows' rs_parts partial sums of
    squares over rs_width features ([M, rs_parts] fp32 at r_ptr: ops.linear.RowRms)."""
    if ROW_SCALE == 1:
        v = v * tl.load(r_ptr + offs_rows, mask=row_mask, other=0.0)[None, :]
    if ROW_SCALE == 2:
        offs_t = tl.arange(0, BLOCK_T)
        sq = tl.load(r_ptr + offs_rows.to(tl.int64)[None, :] * rs_parts + offs_t[:, None],
                     mask=row_mask[None, :] & (offs_t < rs_parts)[:, None], other=0.0)
        v = v * tl.rsqrt(tl.sum(sq, axis=0) / rs_width + rs_eps)[None, :]
    if HAS_BIAS:
        v += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if SCALE == 1:
        v = v * alpha
    if SCALE == 2:
        v = v * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    return v


@triton.jit
def _exit(delta, offs_n, n_mask, offs_rows, row_mask, tile, tiles, res_ptr, nw_ptr, h_ptr, xw_ptr, sq_ptr,
          s_res_m, s_h_m, s_xw_m):
    """The next block's entry from this [BLOCK_N, rows] tile of the projection's output (rounded to
    its dtype, as a projection returns it): h = residual + delta in the stream's dtype, h rounded to
    the norm weight's dtype times the weight, and this tile's part of each row's sum of squares of
    h (ops.norm.linear_into_entry; [M, tiles] fp32 at sq_ptr)."""
    mask = n_mask[:, None] & row_mask[None, :]
    rows = offs_rows.to(tl.int64)[None, :]
    cols = offs_n[:, None]
    res = tl.load(res_ptr + rows * s_res_m + cols, mask=mask, other=0.0).to(tl.float32)
    h = (res + delta.to(tl.float32)).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows * s_h_m + cols, h, mask=mask)
    hq = h.to(xw_ptr.dtype.element_ty).to(tl.float32)
    nw = tl.load(nw_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(xw_ptr + rows * s_xw_m + cols, (hq * nw[:, None]).to(xw_ptr.dtype.element_ty), mask=mask)
    tl.store(sq_ptr + offs_rows.to(tl.int64) * tiles + tile, tl.sum(tl.where(mask, hq * hq, 0.0), axis=0), mask=row_mask)


@dataclass(frozen=True)
class Config:
    """One launch shape; block_n == 0 means cuBLAS (F.linear). dot: tl.dot over rows padded to 16
    (else, for one row only, elementwise products); stages: the K loop's software pipelining depth."""

    block_n: int
    block_k: int
    splits: int
    num_warps: int
    dot: bool = True
    stages: int = 3

    def __str__(self) -> str:
        if self.block_n == 0:
            return "cublas"
        return (f"{'d' if self.dot else 'e'}n{self.block_n}k{self.block_k}s{self.splits}w{self.num_warps}"
                f"p{self.stages}")


CUBLAS = Config(0, 0, 1, 0)
_TUNED: dict[tuple, Config] = {}
_TUNE_LOG: dict[tuple, list[tuple[str, float]]] = {}
_TUNED_KERNEL: dict[tuple, Config] = {}  # the fastest of our own configurations, where cuBLAS won
TUNE_ENV = "MEGATRON_SSM_GEMV_TUNE"  # "0": skip timing, take the heuristic configuration

# Tile shapes the tuner tries: (block_n, block_k, num_warps, dot, stages); elementwise ones for M == 1.
_DOT_SHAPES = [(16, 256, 4, True, 3), (32, 128, 4, True, 3), (64, 128, 4, True, 3), (64, 128, 4, True, 5),
               (128, 128, 8, True, 3), (128, 64, 4, True, 4)]
_ELEMENTWISE_SHAPES = [(16, 512, 4, False, 3), (32, 256, 4, False, 3)]


def tuned() -> dict[tuple, tuple[Config, list[tuple[str, float]]]]:
    """Every tuned shape (M bucket, N, K, dtype, bias) -> (chosen config, [(config, us)] timed)."""
    return {key: (cfg, _TUNE_LOG.get(key, [])) for key, cfg in _TUNED.items()}


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else max(16, triton.next_power_of_2(m))


def _block_m(m: int, cfg: Config) -> int:
    return max(16, triton.next_power_of_2(m)) if cfg.dot or m > 1 else 1


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fit(shape, n, k, m_blocks, sms, min_programs=None) -> Config:
    """Splits of K so that about `min_programs` programs run (each split a whole number of blocks)."""
    block_n, block_k, num_warps, dot, stages = shape
    tiles = triton.cdiv(n, block_n) * m_blocks
    k_blocks = triton.cdiv(k, block_k)
    want = min_programs or 3 * sms
    splits = max(1, min(k_blocks, 64, triton.cdiv(want, tiles)))
    per = triton.cdiv(k_blocks, splits)
    splits = triton.cdiv(k_blocks, per)  # no empty split
    return Config(block_n, block_k, splits, num_warps, dot, stages)


def heuristic(m: int, n: int, k: int, device: torch.device) -> Config:
    block_k = min(128, max(16, triton.next_power_of_2(k)))
    m_blocks = triton.cdiv(m, max(16, triton.next_power_of_2(m)))
    return _fit((64, block_k, 4, True, 3), n, k, m_blocks, _sm_count(device))


def _candidates(m: int, n: int, k: int, device: torch.device) -> list[Config]:
    sms = _sm_count(device)
    m_blocks = triton.cdiv(m, max(16, triton.next_power_of_2(m)))
    out = {CUBLAS}
    for shape in _DOT_SHAPES + (_ELEMENTWISE_SHAPES if m == 1 else []):
        if shape[1] > max(16, triton.next_power_of_2(k)):
            continue
        for programs in (sms, 2 * sms, 4 * sms):
            out.add(_fit(shape, n, k, m_blocks, sms, programs))
        out.add(_fit(shape, n, k, m_blocks, sms, 1))
    return sorted(out, key=str)


def _prefetch_lines(k_per_split: int, element_size: int) -> int:
    """Lines of each weight row of its slice that a program hints to L2 before its PDL wait: the
    environment's byte count, at most the slice, as a power of two (0: none)."""
    want = int(os.environ.get(PREFETCH_ENV, PREFETCH_DEFAULT) or 0)
    if want <= 0 or INTERPRETED:
        return 0
    lines = min(triton.cdiv(want, _LINE), triton.cdiv(k_per_split * element_size, _LINE))
    return triton.next_power_of_2(lines)


def _locks(device: torch.device) -> torch.Tensor:
    locks = _LOCKS.get(device)
    if locks is None:
        locks = _LOCKS[device] = torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)
    return locks


@dataclass(frozen=True)
class Entry:
    """A launch's x as a block's entry (see add_rms_norm_linear): x2 is then the residual, and the
    kernel writes the stream residual + delta to `stream` ([M, K], its dtype the stream's)."""

    delta: torch.Tensor | None
    norm_weight: torch.Tensor
    eps: float
    stream: torch.Tensor


@dataclass(frozen=True)
class Exit:
    """A launch's output as the next block's entry (see linear_into_entry): instead of y, the kernel
    writes stream = residual + y ([M, N]), scaled = stream * norm_weight in its dtype ([M, N]) and
    sum_sq ([M, column tiles] fp32)."""

    residual: torch.Tensor
    norm_weight: torch.Tensor
    stream: torch.Tensor
    scaled: torch.Tensor
    sum_sq: torch.Tensor


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config,
            pdl: bool = False, scale: float | torch.Tensor | None = None, entry: Entry | None = None,
            row_scale: torch.Tensor | RowRms | None = None, exit: Exit | None = None) -> torch.Tensor:
    if cfg.block_n == 0:
        return ref_linear(x2, weight, bias, scale, row_scale)
    m, k = x2.shape
    n = weight.shape[0]
    y2 = torch.empty(m, n, device=x2.device, dtype=weight.dtype)
    block_m = _block_m(m, cfg)
    m_blocks = triton.cdiv(m, block_m)
    per = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.splits) * cfg.block_k
    splits = triton.cdiv(k, per)
    grid_n = triton.cdiv(n, cfg.block_n)
    split = splits > 1
    part = torch.empty(splits, m, n, device=x2.device, dtype=torch.float32) if split else y2
    locks = _locks(x2.device) if split else y2
    assert not split or grid_n * m_blocks <= _LOCK_SLOTS, "more column tiles than arrival counters"
    vector = isinstance(scale, torch.Tensor)
    red_rows = 1 if m == 1 else block_m
    norm_block = min(triton.next_power_of_2(k), max(16, _NORM_TILE // red_rows))
    delta = entry.delta if entry is not None and entry.delta is not None else x2
    red_splits = min(triton.next_power_of_2(splits), max(1, _REDUCE_TILE // (cfg.block_n * red_rows)))
    rms = row_scale if isinstance(row_scale, RowRms) else None
    if rms is not None:
        row_scale = rms.sum_sq  # [m, parts], contiguous: linear() made it so
    assert exit is None or tuple(exit.sum_sq.shape) == (m, grid_n), "one sum of squares a row and column tile"
    _gemv_kernel[(grid_n, splits, m_blocks)](
        x2, weight, bias if bias is not None else weight, scale if vector else weight,
        row_scale if row_scale is not None else weight, y2, part, locks,
        delta, entry.norm_weight if entry else weight, entry.stream if entry else y2,
        torch.empty(m, k, device=x2.device, dtype=weight.dtype) if entry else y2,
        *((exit.residual, exit.norm_weight, exit.stream, exit.scaled, exit.sum_sq) if exit else (y2,) * 5),
        m, n, k, per, splits, 1.0 if scale is None or vector else float(scale), entry.eps if entry else 0.0,
        row_scale.shape[1] if rms else 1, float(rms.width) if rms else 1.0, float(rms.eps) if rms else 0.0,
        x2.stride(0), weight.stride(0), y2.stride(0), delta.stride(0), entry.stream.stride(0) if entry else 0,
        *((exit.residual.stride(0), exit.stream.stride(0), exit.scaled.stride(0)) if exit else (0, 0, 0)),
        EXIT=exit is not None, BLOCK_T=triton.next_power_of_2(row_scale.shape[1]) if rms else 1,
        NORM=entry is not None, HAS_DELTA=entry is not None and entry.delta is not None, NORM_ROWS=red_rows,
        NORM_BLOCK=norm_block, HAS_BIAS=bias is not None, SCALE=2 if vector else int(scale is not None),
        ROW_SCALE=2 if rms else int(row_scale is not None), SPLIT=split, USE_DOT=block_m > 1, IEEE=weight.dtype == torch.float32,
        UPCAST=INTERPRETED and weight.dtype != torch.float32, EVEN_K=k % cfg.block_k == 0, PDL=pdl,
        PREFETCH_LINES=_prefetch_lines(per, weight.element_size()) if pdl else 0, LINE=_LINE // weight.element_size(),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, RED_ROWS=red_rows, RED_SPLITS=red_splits,
        num_warps=cfg.num_warps,
        num_stages=cfg.stages, **_pdl.kwargs(pdl),
    )
    return y2


def _time(fn, weights: list[torch.Tensor], reps: int = 20) -> float:
    """GPU microseconds per call, the launches queued behind a sleep so host launch cost is hidden,
    cycling over copies of the weight so that a small one is read from HBM as in the model."""
    stream = torch.cuda.current_stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn(weights[0])  # compile
    torch.cuda._sleep(10_000_000)  # ~5 ms: longer than the host takes to queue the reps
    start.record(stream)
    for i in range(reps):
        fn(weights[i % len(weights)])
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def _tune(key, x2, weight, bias) -> Config:
    m, k = x2.shape
    n = weight.shape[0]
    nbytes = weight.numel() * weight.element_size()
    copies = [weight]
    try:
        copies += [weight.clone() for _ in range(min(31, math.ceil(160e6 / max(nbytes, 1)) - 1))]
    except torch.OutOfMemoryError:
        pass
    candidates = _candidates(m, n, k, x2.device)
    pdl = _pdl.requested() and _pdl.supported(x2.device)  # time what capture will run
    times = [_time(lambda w, c=cfg: _launch(x2, w, bias, c, pdl), copies) for cfg in candidates]
    del copies
    _TUNE_LOG[key] = sorted(((str(c), t) for c, t in zip(candidates, times)), key=lambda e: e[1])
    ours = [i for i, c in enumerate(candidates) if c.block_n]
    if ours:  # none where K is below every tile (cuBLAS alone is timed): the entry takes the heuristic
        _TUNED_KERNEL[key] = candidates[min(ours, key=times.__getitem__)]
    return candidates[min(range(len(times)), key=times.__getitem__)]


def _config(x2, weight, bias) -> Config:
    m, k = x2.shape
    key = (_m_bucket(m), weight.shape[0], k, x2.dtype, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    if (not x2.is_cuda or os.environ.get(TUNE_ENV) == "0" or torch.cuda.is_current_stream_capturing()):
        return heuristic(m, weight.shape[0], k, x2.device)  # not kept: an eager call may still tune
    cfg = _TUNED[key] = _tune(key, x2, weight, bias)
    return cfg


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | torch.Tensor | Factors | None = None, row_scale: torch.Tensor | RowRms | None = None,
           config: Config | None = None) -> torch.Tensor:
    """ops.linear's (x @ weight^T * row_scale + bias) * scale for few rows of x: weight [N, K] with
    unit stride along K; scale a float, [N] or Factors (its per-feature tensor); row_scale fp32
    x.shape[:-1]."""
    k = x.shape[-1]
    n = weight.shape[0]
    given, scale = scale, scale.per_feature if isinstance(scale, Factors) else scale
    if (x.dtype != weight.dtype or weight.stride(-1) != 1 or (bias is not None and bias.dtype != x.dtype)
            or x.numel() == 0 or n == 0 or weight.dim() != 2
            or (isinstance(scale, torch.Tensor) and tuple(scale.shape) != (n,))
            or not _row_scale_fits(row_scale, x)):
        return ref_linear(x, weight, bias, given, row_scale)
    if isinstance(row_scale, torch.Tensor):
        row_scale = row_scale.reshape(-1).contiguous()
    elif row_scale is not None:  # [rows, parts], as x2's rows (cuBLAS's path broadcasts it so too)
        row_scale = row_scale._replace(sum_sq=row_scale.sum_sq.reshape(-1, row_scale.sum_sq.shape[-1]).contiguous())
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if isinstance(scale, torch.Tensor) and scale.stride(0) != 1:
        scale = scale.contiguous()
    cfg = config or _config(x2, weight, bias)
    y2 = _launch(x2, weight, bias, cfg, _pdl.use(x2.device), scale, row_scale=row_scale)
    return y2.view(*x.shape[:-1], n)


def _row_scale_fits(row_scale, x: torch.Tensor) -> bool:
    if row_scale is None:
        return True
    if isinstance(row_scale, RowRms):
        sq = row_scale.sum_sq
        return sq.dtype == torch.float32 and sq.dim() == x.dim() and sq.shape[:-1] == x.shape[:-1] and sq.shape[-1] >= 1
    return row_scale.dtype == torch.float32 and row_scale.shape == x.shape[:-1]


def linear_into_entry(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor | None, residual: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float, residual_dtype: torch.dtype,
                      scale: float | None = None, config: Config | None = None) -> EntryParts:
    """ops.norm.linear_into_entry in one launch: the projection's epilogue (the last program of each
    column tile, where K is split) adds its tile to the residual, writes the stream and its scaled
    copy, and its tile's sums of squares, which the next projection's epilogue sums (RowRms)."""
    k = x.shape[-1]
    n = weight.shape[0]
    fits = (weight.dim() == 2 and weight.stride(-1) == 1 and x.dtype == weight.dtype and weight.shape[1] == k
            and x.numel() > 0 and n > 0 and tuple(residual.shape) == (*x.shape[:-1], n)
            and tuple(norm_weight.shape) == (n,) and norm_weight.stride(0) == 1 and norm_weight.dtype == weight.dtype
            and (row_scale is None or (row_scale.dtype == torch.float32 and row_scale.shape == x.shape[:-1]))
            and not isinstance(scale, torch.Tensor))
    if not fits:
        return ref_linear_into_entry(x, weight, row_scale, residual, norm_weight, eps, residual_dtype, scale)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = _rows(residual)
    m = x2.shape[0]
    cfg = config or _kernel_config(m, k, weight, None)
    lead = x.shape[:-1]
    out = Exit(r2, norm_weight, torch.empty(m, n, device=x.device, dtype=residual_dtype),
               torch.empty(m, n, device=x.device, dtype=weight.dtype),
               torch.empty(m, triton.cdiv(n, cfg.block_n), device=x.device, dtype=torch.float32))
    if row_scale is not None:
        row_scale = row_scale.reshape(-1).contiguous()
    _launch(x2, weight, None, cfg, _pdl.use(x2.device), scale, row_scale=row_scale, exit=out)
    return EntryParts(out.scaled.view(*lead, n), out.stream.view(*lead, n),
                      RowRms(out.sum_sq.view(*lead, -1), n, float(eps)))


def _kernel_config(m: int, k: int, weight: torch.Tensor, bias: torch.Tensor | None) -> Config:
    """linear's configuration for this shape, tuned as linear's (on a probe of x) where it was not
    yet; our kernel's fastest where cuBLAS won: the entry's norm needs our kernel."""
    key = (_m_bucket(m), weight.shape[0], k, weight.dtype, bias is not None)
    cfg = _TUNED.get(key)
    if cfg is None:
        cfg = _config(torch.zeros(m, k, device=weight.device, dtype=weight.dtype), weight, bias)
    if cfg.block_n == 0:
        cfg = _TUNED_KERNEL.get(key) or heuristic(m, weight.shape[0], k, weight.device)
    return cfg


def add_rms_norm_linear(residual: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                        residual_dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        scale: float | torch.Tensor | Factors | None = None,
                        config: Config | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.norm.add_rms_norm_linear's (linear(norm(residual + delta)), residual + delta) in one
    launch: the block's entry kernel and its first projection's, whose boundary cost ~1.9 us a
    layer of a graphed decode step on an H200 (tools/ablate_step.py, session 10)."""
    k = residual.shape[-1]
    n = weight.shape[0]
    per_feature = scale.per_feature if isinstance(scale, Factors) else scale
    fits = (weight.dim() == 2 and weight.stride(-1) == 1 and norm_weight.dtype == weight.dtype
            and tuple(norm_weight.shape) == (k,) and norm_weight.stride(0) == 1 and weight.shape[1] == k
            and residual.numel() > 0 and n > 0 and (bias is None or bias.dtype == weight.dtype)
            and (delta is None or delta.shape == residual.shape)
            and (not isinstance(per_feature, torch.Tensor) or tuple(per_feature.shape) == (n,)))
    if not fits:
        normed, stream = add_rms_norm(residual, delta, norm_weight, eps, residual_dtype)
        return linear(normed, weight, bias, scale), stream
    r2 = _rows(residual)
    d2 = _rows(delta) if delta is not None else None
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if isinstance(per_feature, torch.Tensor) and per_feature.stride(0) != 1:
        per_feature = per_feature.contiguous()
    m = r2.shape[0]
    stream = torch.empty(m, k, device=residual.device, dtype=residual_dtype)
    cfg = config or _kernel_config(m, k, weight, bias)
    y2 = _launch(r2, weight, bias, cfg, _pdl.use(r2.device), per_feature, Entry(d2, norm_weight, float(eps), stream))
    return y2.view(*residual.shape[:-1], n), stream.view(residual.shape)
