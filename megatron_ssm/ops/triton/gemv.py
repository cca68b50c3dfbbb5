"""Skinny GEMMs for decode: y = (x @ W^T + bias) * scale for a few rows of x, at the weights' read bandwidth.

A decode step's projections have M = batch x tokens rows (1..16) against weights of megabytes: the
time is the weight read. cuBLAS reaches ~80% of an H200's copy bandwidth on wide outputs and ~60% on
narrow ones, where it splits K and reduces in a second kernel. Here one program reads a
[BLOCK_N, BLOCK_K] weight tile per step and keeps fp32 partial products; narrow outputs split K over
programs, and the last program to finish a column tile sums the other splits' partials and writes
the output, all in one launch. Its arrival counter resets itself, so the launch can be captured in a
CUDA graph and replayed without a memset (the counters are shared by every launch on the device:
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
kernel drains and wait for it to end.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..linear import Factors, linear as ref_linear
from . import pdl as _pdl
from .pdl import enter as _pdl_enter
from .runtime import INTERPRETED

_LOCKS: dict[torch.device, torch.Tensor] = {}
_LOCK_SLOTS = 1 << 16  # column tiles per launch, at most: N / BLOCK_N for any weight we hold


# M and the split count vary between calls of one shape (batch buckets, tuning): one compile for all.
# k_per_split stays specialised: its divisibility is what lets the weight loads be 16-byte vectors.
@triton.jit(do_not_specialize=["M", "splits"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, s_ptr, y_ptr, part_ptr, lock_ptr,
    M, N, K, k_per_split, splits, alpha,
    sxm, swn, sym,
    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr, SPLIT: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
    # Triton's own pipelining of the loads (docs/benchmarks.md, session 7).
    _pdl_enter(PDL)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = tl.multiple_of(k0, 16) + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no mask along K: a mask of unknown alignment would split the loads into scalars
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None], other=0.0)
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        else:
            k_mask = offs_k < k_hi
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
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
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * M * N + p_offs, mask=y_mask, other=0.0, cache_modifier=".cg")
            total = _epilogue(total, b_ptr, s_ptr, alpha, offs_n, n_mask, HAS_BIAS, SCALE)
            tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(lock, 0)  # ready for the next launch (or graph replay)
    else:
        out = _epilogue(out, b_ptr, s_ptr, alpha, offs_n, n_mask, HAS_BIAS, SCALE)
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _epilogue(v, b_ptr, s_ptr, alpha, offs_n, n_mask, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr):
    """(v + bias) * scale in fp32 for a [BLOCK_N, BLOCK_M] tile; SCALE 1: the float alpha, 2: one
    factor per output feature."""
    if HAS_BIAS:
        v += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if SCALE == 1:
        v = v * alpha
    if SCALE == 2:
        v = v * tl.load(s_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    return v


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


def _locks(device: torch.device) -> torch.Tensor:
    locks = _LOCKS.get(device)
    if locks is None:
        locks = _LOCKS[device] = torch.zeros(_LOCK_SLOTS, dtype=torch.int32, device=device)
    return locks


def _launch(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Config,
            pdl: bool = False, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    if cfg.block_n == 0:
        return ref_linear(x2, weight, bias, scale)
    m, k = x2.shape
    n = weight.shape[0]
    y2 = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
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
    _gemv_kernel[(grid_n, splits, m_blocks)](
        x2, weight, bias if bias is not None else weight, scale if vector else weight, y2, part, locks,
        m, n, k, per, splits, 1.0 if scale is None or vector else float(scale),
        x2.stride(0), weight.stride(0), y2.stride(0),
        HAS_BIAS=bias is not None, SCALE=2 if vector else int(scale is not None), SPLIT=split, USE_DOT=block_m > 1, IEEE=x2.dtype == torch.float32,
        UPCAST=INTERPRETED and x2.dtype != torch.float32, EVEN_K=k % cfg.block_k == 0, PDL=pdl,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
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
           scale: float | torch.Tensor | Factors | None = None, config: Config | None = None) -> torch.Tensor:
    """ops.linear's (x @ weight^T + bias) * scale for few rows of x: weight [N, K] with unit stride
    along K; scale a float, [N] or Factors (its per-feature tensor)."""
    k = x.shape[-1]
    n = weight.shape[0]
    given, scale = scale, scale.per_feature if isinstance(scale, Factors) else scale
    if (x.dtype != weight.dtype or weight.stride(-1) != 1 or (bias is not None and bias.dtype != x.dtype)
            or x.numel() == 0 or n == 0 or weight.dim() != 2
            or (isinstance(scale, torch.Tensor) and tuple(scale.shape) != (n,))):
        return ref_linear(x, weight, bias, given)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    if isinstance(scale, torch.Tensor) and scale.stride(0) != 1:
        scale = scale.contiguous()
    cfg = config or _config(x2, weight, bias)
    y2 = _launch(x2, weight, bias, cfg, _pdl.use(x2.device), scale)
    return y2.view(*x.shape[:-1], n)
