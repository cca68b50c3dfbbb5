"""Selective-scan kernels for Mamba-1 and Mamba-2, one kernel per phase for both models.

Both models run the same per-channel recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t over an
[n]-vector of state per channel, and read y_t = C_t h_t + D x_t. They differ only in what is shared:
Mamba-1 has a dt and a row of A per channel and one B/C for all channels; Mamba-2 shares dt, A and
D across the `headdim` channels of a head and B/C across the heads of a group. So each kernel works
on flat channels c, with head = c // HEADDIM (HEADDIM = 1 for Mamba-1) and group = head //
heads_per_group; a program takes BLOCK_D channels of one group and keeps their state in fp32
registers.

Prefill (`_scan_kernel`) walks time one step at a time, as the recurrence does: its work per step
is small (an exp2 and four multiply-adds per state), so the kernel is about keeping that at its
instruction and SFU floor (no shuffles, the state in the thread), streaming x, dt, z and y through
in coalesced rows with the next steps' loads in flight, and a grid that fills the GPU at batch 1
too. Decode (`_state_update_kernel`) reads each state element once and writes it once.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..varlen import check_packed
from . import pdl
from .pdl import enter as pdl_enter


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with log1p done the accurate way (fp32 log(1 + e) loses e's low bits when e is
    # small), and torch's threshold of 20 above which softplus is the identity.
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _softplus_fast(x, FAST_MATH: tl.constexpr):
    # softplus in ~20 instructions instead of ~50 (the prefill scan pays it per channel per step).
    # For e = exp(x) < 1/4, log1p(e) = 2 atanh(s) with s = e / (2 + e) <= 1/9, by its series to s^7
    # (truncation below 3e-9 relative); above, log2(1 + e) ln 2, where lg2.approx's absolute error is
    # small against the result. Past 20, torch's softplus is the identity. FAST_MATH picks the
    # hardware log2 (and, in the kernel, divide) on CUDA; the interpreter has no libdevice.
    e = tl.exp2(tl.minimum(x, 20.0) * 1.4426950408889634)
    s = e / (2.0 + e)
    s2 = s * s
    small = 2.0 * s * (1.0 + s2 * (0.3333333333333333 + s2 * (0.2 + s2 * 0.14285714285714285)))
    if FAST_MATH:
        big = libdevice.fast_log2f(1.0 + e) * 0.6931471805599453
    else:
        big = tl.log2(1.0 + e) * 0.6931471805599453
    return tl.where(x > 20.0, x, tl.where(e < 0.25, small, big))


@triton.jit
def _softplus_poly(x):
    # softplus(x) = max(x, 0) + log1p(u), u = exp(-|x|) in (0, 1]: one exp2 and a degree-8 polynomial
    # for log1p(u) / u (least squares in relative error on [0, 1]: 1.9e-7 in fp32), instead of
    # exp2, log2 and a divide (three SFU ops a channel a step, which the scan's SFU is short of).
    # Past 20 it gives x to fp32 precision, as torch's threshold does.
    u = tl.exp2(tl.abs(x) * -1.4426950408889634)
    q = 0.005039820913225412 * u - 0.028619538992643356
    q = q * u + 0.07656408846378326
    q = q * u - 0.13499100506305695
    q = q * u + 0.19014495611190796
    q = q * u - 0.24814373254776
    q = q * u + 0.3331443667411804
    q = q * u - 0.49999162554740906
    q = q * u + 0.9999998807907104
    return tl.maximum(x, 0.0) + u * q


@triton.jit
def _tanh_approx(x):
    # the SFU's tanh (relative error ~2^-11): silu(z) = z (1 + tanh(z / 2)) / 2 in one SFU op instead
    # of exp2 and a divide. Only for 16-bit outputs, whose own rounding (2^-8) is coarser.
    return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _dt(dt, bias_ptr, heads, mask, dt_min, dt_max, HAS_DT_BIAS: tl.constexpr):
    dt = dt.to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(bias_ptr + heads, mask=mask, other=0.0).to(tl.float32)
    return tl.minimum(tl.maximum(_softplus(dt), dt_min), dt_max)


@triton.jit
def _scan_step_inputs(x_p, dt_p, B_p, C_p, z_p, offs_c, offs_n, live, nchan, N_BOUND, HAS_Z: tl.constexpr,
                      EVEN_N: tl.constexpr):
    """One step's x, dt, B, C, z (z: x again without a gate) as stored; nothing when `live` is false.
    No `other`: what a masked lane holds is never used (a channel past nchan is never stored, a
    step past the end never computed), and zero-filling costs instructions every step. Only states
    past n must read zeros, as they enter the sum y = C h."""
    c_ok = offs_c < tl.where(live, nchan, 0)
    n_ok = offs_n < tl.where(live, N_BOUND, 0)
    x = tl.load(x_p, mask=c_ok)
    dt = tl.load(dt_p, mask=c_ok)
    if EVEN_N:
        B = tl.load(B_p, mask=n_ok)
        C = tl.load(C_p, mask=n_ok)
    else:
        B = tl.load(B_p, mask=n_ok, other=0.0)
        C = tl.load(C_p, mask=n_ok, other=0.0)
    if HAS_Z:
        z = tl.load(z_p, mask=c_ok)
    else:
        z = x
    return x, dt, B, C, z


# Layout. A program's channels are a [P, W] tile: W = 32 * num_warps lanes (or fewer: then a
# channel's states split over 32 * num_warps / W lanes), each with P neighbouring channels (channel
# w * P + p of the block: one vector load per lane). Its state is [n, P, W], n and P inside the
# thread, so y = C h sums in registers and the conversion of each step's B and C (the same for
# every channel) is shared by P channels. Triton gives a tensor the layout of the memory accesses
# it meets, and breaks ties between dimensions differently across versions (3.6: the first
# dimension fastest; 3.9: the last), so the kernel has no [n, P, W] memory access at all: A, h0
# and hT move one state index at a time as [P, W] tiles (once per program), which leaves the state
# the default layout (lanes along W) on every version; the per-step [P, W] accesses are contiguous
# along P, so they too put lanes along W and P in the thread.
@triton.jit
def _scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h0_ptr, y_ptr, hT_ptr, cu_ptr,
    L, nchan, nstate, heads_per_group, dt_min, dt_max,
    sx_b, sx_l, sx_c,
    sdt_b, sdt_l, sdt_h,
    sA_h, sA_n, sD, sbias,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sz_b, sz_l, sz_c,
    sy_b, sy_l, sy_c,
    sh0_b, sh0_c, sh0_n,
    shT_b, shT_c, shT_n,
    HEADDIM: tl.constexpr, A_PER_HEAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_H0: tl.constexpr, PACKED: tl.constexpr,
    P: tl.constexpr, W: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, UNROLL: tl.constexpr,
    AHEAD: tl.constexpr, FAST_MATH: tl.constexpr,
    SP_POLY: tl.constexpr, SILU_TANH: tl.constexpr, DT_LIMIT: tl.constexpr,
):
    BLOCK_D: tl.constexpr = P * W
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # the batch row; packed: the sequence (all in row 0)
    offs_c = pid_d * BLOCK_D + tl.arange(0, W)[None, :] * P + tl.arange(0, P)[:, None]  # [P, W]
    offs_n = tl.arange(0, BLOCK_N)
    if PACKED:  # a program per sequence, over its own time span: it starts from zeros and ends in hT[seq]
        row = 0
        first = tl.load(cu_ptr + pid_b).to(tl.int64)
        end = tl.load(cu_ptr + pid_b + 1).to(tl.int64)
    else:
        row = pid_b
        first = 0
        end = L
    cmask = offs_c < nchan
    heads = offs_c // HEADDIM
    group = (pid_d * BLOCK_D // HEADDIM) // heads_per_group
    n3 = offs_n[:, None, None]
    # A is kept as A log2(e): each step's decay is one exp2.
    if A_PER_HEAD:
        A = tl.load(A_ptr + heads * sA_h, mask=cmask, other=0.0).to(tl.float32)[None, :, :] * 1.4426950408889634
    else:
        A = tl.zeros([BLOCK_N, P, W], dtype=tl.float32)
        for k in tl.static_range(BLOCK_N):
            a_k = tl.load(A_ptr + heads * sA_h + k * sA_n, mask=offs_c < tl.where(k < nstate, nchan, 0), other=0.0)
            A = tl.where(n3 == k, a_k.to(tl.float32)[None, :, :] * 1.4426950408889634, A)
    if HAS_D:
        Dv = tl.load(D_ptr + heads * sD, mask=cmask, other=0.0).to(tl.float32)
    if HAS_DT_BIAS:
        bias = tl.load(dt_bias_ptr + heads * sbias, mask=cmask, other=0.0).to(tl.float32)
    h = tl.zeros([BLOCK_N, P, W], dtype=tl.float32)
    if HAS_H0:
        for k in tl.static_range(BLOCK_N):
            h_k = tl.load(h0_ptr + pid_b * sh0_b + offs_c * sh0_c + k * sh0_n, mask=offs_c < tl.where(k < nstate, nchan, 0), other=0.0)
            h = tl.where(n3 == k, h_k.to(tl.float32)[None, :, :], h)

    # Pointers at time `first`, advanced one step per iteration (64-bit: a packed row can hold more
    # than 2^31 elements).
    x_p = x_ptr + row * sx_b + first * sx_l + offs_c * sx_c
    dt_p = dt_ptr + row * sdt_b + first * sdt_l + heads * sdt_h
    B_p = B_ptr + row * sB_b + first * sB_l + group * sB_g + offs_n * sB_n
    C_p = C_ptr + row * sC_b + first * sC_l + group * sC_g + offs_n * sC_n
    z_p = z_ptr + row * sz_b + first * sz_l + offs_c * sz_c
    y_p = y_ptr + row * sy_b + first * sy_l + offs_c * sy_c
    # Software pipelining by hand: step t's inputs were loaded AHEAD steps earlier (1 or 2), so a
    # load's latency hides behind that many steps of arithmetic even with few warps per SM (batch 1).
    # (A step past the end loads nothing: its masks compare against zero channels and states. With
    # n a power of two the bound on n is a constant, so B and C load as vectors.)
    if EVEN_N:
        N_BOUND: tl.constexpr = BLOCK_N
    else:
        N_BOUND = nstate
    x_n, dt_n, B_n, C_n, z_n = _scan_step_inputs(x_p, dt_p, B_p, C_p, z_p, offs_c, offs_n, first < end, nchan,
                                                 N_BOUND, HAS_Z, EVEN_N)
    if AHEAD == 2:
        x_n2, dt_n2, B_n2, C_n2, z_n2 = _scan_step_inputs(
            x_p + sx_l, dt_p + sdt_l, B_p + sB_l, C_p + sC_l, z_p + sz_l, offs_c, offs_n, first + 1 < end, nchan,
            N_BOUND, HAS_Z, EVEN_N)
    for t in tl.range(first, end, loop_unroll_factor=UNROLL):
        x = x_n.to(tl.float32)
        dt = dt_n.to(tl.float32)
        Bt = B_n.to(tl.float32)[:, None, None]
        Ct = C_n.to(tl.float32)[:, None, None]
        if HAS_Z:
            z = z_n.to(tl.float32)
        if AHEAD == 2:
            x_n, dt_n, B_n, C_n, z_n = x_n2, dt_n2, B_n2, C_n2, z_n2
            x_n2, dt_n2, B_n2, C_n2, z_n2 = _scan_step_inputs(
                x_p + 2 * sx_l, dt_p + 2 * sdt_l, B_p + 2 * sB_l, C_p + 2 * sC_l, z_p + 2 * sz_l, offs_c, offs_n,
                t + 2 < end, nchan, N_BOUND, HAS_Z, EVEN_N)
        else:
            x_n, dt_n, B_n, C_n, z_n = _scan_step_inputs(x_p + sx_l, dt_p + sdt_l, B_p + sB_l, C_p + sC_l, z_p + sz_l,
                                                         offs_c, offs_n, t + 1 < end, nchan, N_BOUND, HAS_Z, EVEN_N)
        if HAS_DT_BIAS:
            dt += bias
        if SP_POLY:
            dt = _softplus_poly(dt)
        else:
            dt = _softplus_fast(dt, FAST_MATH)
        if DT_LIMIT:
            dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        h = tl.exp2(dt[None, :, :] * A) * h + (dt * x)[None, :, :] * Bt
        y = tl.sum(h * Ct, axis=0)
        if HAS_D:
            y += x * Dv
        if HAS_Z and SILU_TANH:
            y = y * (z * (0.5 + 0.5 * _tanh_approx(0.5 * z)))
        elif HAS_Z:  # y silu(z) = y z / (1 + exp(-z))
            den = 1.0 + tl.exp2(z * -1.4426950408889634)
            if FAST_MATH:
                y = libdevice.fast_dividef(y * z, den)
            else:
                y = y * z / den
        tl.store(y_p, y.to(y_ptr.dtype.element_ty), mask=cmask)
        x_p += sx_l
        dt_p += sdt_l
        B_p += sB_l
        C_p += sC_l
        z_p += sz_l
        y_p += sy_l
    for k in tl.static_range(BLOCK_N):
        h_k = tl.sum(tl.where(n3 == k, h, 0.0), axis=0)
        tl.store(hT_ptr + pid_b * shT_b + offs_c * shT_c + k * shT_n, h_k, mask=offs_c < tl.where(k < nstate, nchan, 0))


@triton.jit
def _weightless_rms_norm(v, width, eps):
    f = v.to(tl.float32)
    return (f * tl.rsqrt(tl.sum(f * f, axis=0) / width + eps)).to(v.dtype)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr, dt_in_ptr, dtw_ptr,
    nchan, nstate, heads_per_group, dt_min, dt_max, norm_eps, dt_in_width, dt_rank,
    ss_b, ss_c, ss_n,
    sx_b, sx_c,
    sdt_b, sdt_h, sdw_c,
    sA_h, sA_n,
    sB_b, sB_g, sB_n,
    sC_b, sC_g, sC_n,
    sz_b, sz_c,
    sy_b, sy_c,
    sdi_b,
    HEADDIM: tl.constexpr, A_PER_HEAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, NORM_BC: tl.constexpr, DT_SCALE: tl.constexpr, DT_PROJ: tl.constexpr,
    PDL: tl.constexpr, EARLY: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_RP: tl.constexpr,
):
    # EARLY (ops/triton/pdl.py): the state and dt_proj's rows, which the kernels before do not write,
    # are loaded before the PDL wait (A and D stay where they are used: held across the wait too,
    # they cost registers).
    if not EARLY:
        pdl_enter(PDL)
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    cmask = offs_c < nchan
    nmask = offs_n < nstate
    cn_mask = cmask[:, None] & nmask[None, :]
    heads = offs_c // HEADDIM
    group = (pid_d * BLOCK_D // HEADDIM) // heads_per_group

    s_ptrs = state_ptr + pid_b * ss_b + offs_c[:, None] * ss_c + offs_n[None, :] * ss_n
    s = tl.load(s_ptrs, mask=cn_mask, other=0.0)
    if DT_PROJ:  # dt is dt_proj's input [b, dt_rank]: this block's rows of dt_proj, rounded as its output
        # (the whole [BLOCK_D, rank] tile in one load: a loop over the rank waits on memory once per
        # step, which measured slower than the projection kernel it replaces)
        offs_rp = tl.arange(0, BLOCK_RP)
        r_ok = offs_rp < dt_rank
        w = tl.load(dtw_ptr + offs_c[:, None] * sdw_c + offs_rp[None, :], mask=cmask[:, None] & r_ok[None, :], other=0.0)
    if EARLY:
        pdl_enter(PDL)
    x = tl.load(x_ptr + pid_b * sx_b + offs_c * sx_c, mask=cmask, other=0.0).to(tl.float32)
    if DT_PROJ:
        v = tl.load(dt_ptr + pid_b * sdt_b + offs_rp * sdt_h, mask=r_ok, other=0.0)
        dt = tl.sum(w.to(tl.float32) * v.to(tl.float32)[None, :], axis=1).to(dt_ptr.dtype.element_ty).to(tl.float32)
    else:
        dt = tl.load(dt_ptr + pid_b * sdt_b + heads * sdt_h, mask=cmask, other=0.0).to(tl.float32)
    if DT_SCALE:  # dt = dt_proj(dt_in) of the raw dt_in: apply dt_in's (weightless) RMS norm now
        offs_r = tl.arange(0, BLOCK_R)
        di = tl.load(dt_in_ptr + pid_b * sdi_b + offs_r, mask=offs_r < dt_in_width, other=0.0).to(tl.float32)
        dt = dt * tl.rsqrt(tl.sum(di * di, axis=0) / dt_in_width + norm_eps)
    dt = _dt(dt, dt_bias_ptr, heads, cmask, dt_min, dt_max, HAS_DT_BIAS)
    Bv = tl.load(B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n, mask=nmask, other=0.0)
    Cv = tl.load(C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n, mask=nmask, other=0.0)
    if NORM_BC:  # Falcon-Mamba's weightless norms of B and C, rounded to their dtype as the reference's
        Bv = _weightless_rms_norm(Bv, nstate, norm_eps)
        Cv = _weightless_rms_norm(Cv, nstate, norm_eps)
    Bv, Cv = Bv.to(tl.float32), Cv.to(tl.float32)
    if A_PER_HEAD:
        dA = tl.exp(dt * tl.load(A_ptr + heads * sA_h, mask=cmask, other=0.0).to(tl.float32))[:, None]
    else:
        A = tl.load(A_ptr + heads[:, None] * sA_h + offs_n[None, :] * sA_n, mask=cn_mask, other=0.0)
        dA = tl.exp(dt[:, None] * A.to(tl.float32))
    h = s.to(tl.float32) * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=cn_mask)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + heads, mask=cmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * sz_b + offs_c * sz_c, mask=cmask, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * sy_b + offs_c * sy_c, y.to(y_ptr.dtype.element_ty), mask=cmask)


# ---- launch helpers shared by both models -------------------------------------------------------

def _block_d(nchan: int, group_width: int, ngroups: int, want: int) -> int:
    """Largest power of two <= want such that a block never straddles two B/C groups."""
    bd = min(want, triton.next_power_of_2(nchan))
    if ngroups > 1:
        while group_width % bd:
            bd //= 2
    return bd


def _vec(t):
    return None if t is None else t.contiguous()


def _flat_channels(t: torch.Tensor, lead: int) -> torch.Tensor:
    """[.., h, p, ...] -> [.., h*p, ...] at dim `lead`: a view for the layouts the model produces."""
    return t.flatten(lead, lead + 1)


# Tuning for the prefill scan, per state size: (P, W, num_warps, AHEAD) candidates, widest first
# (see the layout note at `_scan_kernel`: blocks of P * W channels; W < 32 * num_warps splits a
# channel's states over lanes, for more programs; AHEAD steps of loads in flight). `_scan_block`
# takes the widest candidate whose grid still gives SCAN_WARPS_PER_SM warps to every SM, else the
# narrowest: long prompts at batch 1 get narrow blocks with loads two steps ahead, as there are
# too few warps per SM to hide a load behind one step. SCAN_UNROLL is the time loop's unroll
# factor. Chosen from the kernels compiled for sm_90 by Triton 3.6 (the GPU machine's) and 3.9, not
# yet from timings (tools/scan_check.py --sweep times every candidate; tools/kernel_sass.py shows
# these): per step under Triton 3.6, P = 4 is ~151 instructions per channel (217 registers), P = 2
# ~169 (168), P = 1 ~236 (95), W = 16 / 8 ~210 / ~145 per 16 / 8 channels; every channel-step also
# takes 21 MUFU ops (16 exp2 for the states), so from P = 2 on the SFU, not issue, is the limit.
# Nsight Compute on the H200 (docs/benchmarks.md, session 9) finds P = 4 at b32 x 512 latency-bound
# at 2 warps a scheduler (54% of issue slots, the SFU at 61%); capping registers for more warps
# spilled and measured slower (a launch's maxnreg of 192, 168, 128).
SCAN_CONFIG = {16: ((4, 32, 1, 1), (2, 32, 1, 1), (1, 32, 1, 1), (1, 16, 1, 2), (1, 8, 1, 2)),
               128: ((1, 8, 1, 1), (1, 4, 1, 2))}
SCAN_WARPS_PER_SM = 7
SCAN_UNROLL = 1
# Per-channel math in the wide layouts (P >= 2: 4 channels x 16 states a lane, SFU-bound): softplus by
# one exp2 and a polynomial, silu by the SFU's tanh for 16-bit outputs, no dt clamp without a limit:
# 84 -> 72 MUFU and 606 -> 555 instructions a step at P = 4; measured on the H200 (session 19,
# docs/benchmarks.md) 1130 -> 1026 us at b32 x 512 and 546 -> 471 us for 16 packed 512-token prompts.
# The narrow layouts (P = 1, states split over lanes: long prompts at batch 1) are latency-bound,
# and the polynomial's dependent chain made them 12-18% slower there, so they keep the old softplus.


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: small, so that tiny tests take the narrow candidates too
    return torch.cuda.get_device_properties(device).multi_processor_count


def _scan_block(n: int, nchan: int, group_width: int, ngroups: int, rows: int, device) -> tuple[int, int, int, int]:
    """(P, W, num_warps, AHEAD) for the prefill scan of `rows` rows (or packed sequences) of `nchan` channels."""
    bn = triton.next_power_of_2(n)
    cands = SCAN_CONFIG.get(n) or ((1, 32, 1, 1), (1, max(1, 512 // bn), 1, 2))
    want = _sm_count(device) * SCAN_WARPS_PER_SM
    for i, (p, w, warps, ahead) in enumerate(cands):
        bd = _block_d(nchan, group_width, ngroups, p * w)  # a block never straddles two B/C groups
        p = max(1, bd // w)
        w = bd // p
        warps = max(1, min(warps, w * bn // 32))
        if triton.cdiv(nchan, bd) * rows * warps >= want or i == len(cands) - 1:
            return p, w, warps, ahead


def _scan(x3, dt3, A2, B4, C4, D, z3, dt_bias, h0, headdim, a_per_head, dt_limit, cu_seqlens=None):
    """x3, z3 [b, L, nchan]; dt3 [b, L, nheads]; B4, C4 [b, L, g, n]; h0 [b, nchan, n] or None.
    cu_seqlens: x3's one row packs sequences (h0 None); the final states are then [nseq, nchan, n]."""
    b, L, nchan = x3.shape
    g, n = B4.shape[-2:]
    nheads = nchan // headdim
    bn = triton.next_power_of_2(n)
    y = torch.empty(b, L, nchan, device=x3.device, dtype=x3.dtype)
    cu = A2  # placeholder, read only when packed
    rows = b
    if cu_seqlens is not None:
        check_packed(x3, cu_seqlens, h0)
        cu, rows = cu_seqlens, cu_seqlens.shape[0] - 1
    p, w, num_warps, ahead = _scan_block(n, nchan, nchan // g, g, rows, x3.device)
    hT = torch.empty(rows, nchan, n, device=x3.device, dtype=torch.float32)
    zs = z3.stride() if z3 is not None else (0, 0, 0)
    h0s = h0.stride() if h0 is not None else (0, 0, 0)
    _scan_kernel[(triton.cdiv(nchan, p * w), rows)](
        x3, dt3, A2, B4, C4, D if D is not None else x3, z3 if z3 is not None else x3,
        dt_bias if dt_bias is not None else x3, h0 if h0 is not None else hT, y, hT, cu,
        L, nchan, n, nheads // g, float(dt_limit[0]), float(dt_limit[1]),
        *x3.stride(), *dt3.stride(), *A2.stride(), D.stride(0) if D is not None else 0,
        dt_bias.stride(0) if dt_bias is not None else 0,
        *B4.stride(), *C4.stride(), *zs, *y.stride(), *h0s, *hT.stride(),
        HEADDIM=headdim, A_PER_HEAD=a_per_head, HAS_D=D is not None, HAS_Z=z3 is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_H0=h0 is not None, PACKED=cu_seqlens is not None,
        P=p, W=w, BLOCK_N=bn, EVEN_N=bn == n, UNROLL=SCAN_UNROLL, AHEAD=ahead, FAST_MATH=x3.is_cuda,
        SP_POLY=p >= 2, SILU_TANH=x3.is_cuda and y.element_size() == 2, DT_LIMIT=tuple(dt_limit) != _NO_LIMIT,
        num_warps=num_warps,
    )
    return y, hT


# State elements per decode program: enough loads in flight per program, and enough programs to
# cover every SM at batch 1 (Mamba2-2.7B: 5120 x 128 state elements a layer). Projecting dt too,
# a program also reads its channels' rows of dt_proj (falcon-mamba-7b: 8192 x 256) as one tile of
# at most DT_PROJ_TILE elements, so it takes fewer channels.
UPDATE_BLOCK = 2048
UPDATE_BLOCK_DT_PROJ = 512
DT_PROJ_TILE = 8192


def _state_update(state3, x2, dt2, A2, B3, C3, D, z2, dt_bias, headdim, a_per_head, dt_limit,
                  norm_eps=None, dt_in=None, dt_weight=None):
    """state3 [b, nchan, n] updated in place; x2, z2 [b, nchan]; dt2 [b, nheads]; B3, C3 [b, g, n].
    norm_eps: B and C RMS-normalised first, and dt scaled by dt_in's [b, R] inverse RMS if given.
    dt_weight [nchan, R] (Mamba-1): dt2 [b, R] is dt_proj's input, projected here."""
    b, nchan, n = state3.shape
    g = B3.shape[1]
    nheads = nchan // headdim
    bn = triton.next_power_of_2(n)
    dt_proj = dt_weight is not None
    block_rp = triton.next_power_of_2(dt_weight.shape[1]) if dt_proj else 1
    want = min(UPDATE_BLOCK_DT_PROJ // bn, DT_PROJ_TILE // block_rp) if dt_proj else UPDATE_BLOCK // bn
    bd = _block_d(nchan, nchan // g, g, max(1, want))
    if dt_proj and dt_weight.stride(-1) != 1:
        dt_weight = dt_weight.contiguous()
    y = torch.empty(b, nchan, device=x2.device, dtype=x2.dtype)
    D, dt_bias = _vec(D), _vec(dt_bias)
    zs = z2.stride() if z2 is not None else (0, 0)
    scale_dt = norm_eps is not None and dt_in is not None
    if scale_dt and dt_in.stride(-1) != 1:
        dt_in = dt_in.contiguous()
    on = pdl.use(x2.device)
    _state_update_kernel[(triton.cdiv(nchan, bd), b)](
        state3, x2, dt2, A2, B3, C3, D if D is not None else x2, z2 if z2 is not None else x2,
        dt_bias if dt_bias is not None else x2, y, dt_in if scale_dt else x2, dt_weight if dt_proj else x2,
        nchan, n, nheads // g, float(dt_limit[0]), float(dt_limit[1]),
        float(norm_eps) if norm_eps is not None else 0.0, dt_in.shape[-1] if scale_dt else 1,
        dt_weight.shape[1] if dt_proj else 0,
        *state3.stride(), *x2.stride(), *dt2.stride(), dt_weight.stride(0) if dt_proj else 0,
        *A2.stride(), *B3.stride(), *C3.stride(), *zs, *y.stride(), dt_in.stride(0) if scale_dt else 0,
        HEADDIM=headdim, A_PER_HEAD=a_per_head, HAS_D=D is not None, HAS_Z=z2 is not None,
        HAS_DT_BIAS=dt_bias is not None, NORM_BC=norm_eps is not None, DT_SCALE=scale_dt, DT_PROJ=dt_proj, PDL=on, EARLY=pdl.early_loads(on),
        BLOCK_D=bd, BLOCK_N=bn, BLOCK_R=triton.next_power_of_2(dt_in.shape[-1]) if scale_dt else 1,
        BLOCK_RP=block_rp, num_warps=4, **pdl.kwargs(on),
    )
    return y


_NO_LIMIT = (0.0, float("inf"))


# ---- Mamba-1 --------------------------------------------------------------------------------------

def selective_scan(u, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, cu_seqlens=None):
    return _scan(u, dt, A, B.unsqueeze(2), C.unsqueeze(2), D, z, dt_bias, initial_state,
                 headdim=1, a_per_head=False, dt_limit=_NO_LIMIT, cu_seqlens=cu_seqlens)


def selective_state_update(state, u, dt, A, B, C, D=None, z=None, dt_bias=None):
    return _state_update(state, u, dt, A, B.unsqueeze(1), C.unsqueeze(1), D, z, dt_bias,
                         headdim=1, a_per_head=False, dt_limit=_NO_LIMIT)


def mamba1_decode_step(state, u, dt, A, B, C, D=None, z=None, dt_bias=None, norm_eps=None, dt_in=None,
                       dt_weight=None):
    """selective_state_update with Falcon-Mamba's B/C/dt norms, and dt_proj if dt_weight is given,
    inside the same launch."""
    return _state_update(state, u, dt, A, B.unsqueeze(1), C.unsqueeze(1), D, z, dt_bias,
                         headdim=1, a_per_head=False, dt_limit=_NO_LIMIT, norm_eps=norm_eps, dt_in=dt_in,
                         dt_weight=dt_weight)


# ---- Mamba-2 --------------------------------------------------------------------------------------

def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_state=None,
                   dt_limit=_NO_LIMIT, cu_seqlens=None):
    """The SSD recurrence by the same chunked scan as Mamba-1 (`chunk_size` only shapes the
    reference's algorithm; the result is the same function)."""
    b, L, h, p = x.shape
    h0 = _flat_channels(initial_state, 1) if initial_state is not None else None
    y, hT = _scan(_flat_channels(x, 2), dt, A.reshape(h, 1), B, C, D, None, dt_bias, h0,
                  headdim=p, a_per_head=True, dt_limit=dt_limit, cu_seqlens=cu_seqlens)
    return y.view(b, L, h, p), hT.view(hT.shape[0], h, p, -1)


def ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_limit=_NO_LIMIT):
    b, h, p = x.shape
    viewable = _viewable(state)
    state3 = state.flatten(1, 2)  # a view of the cache for the layouts it has; else a copy, written back
    y = _state_update(state3, x.flatten(1), dt, A.reshape(h, 1), B, C, D, None, dt_bias,
                      headdim=p, a_per_head=True, dt_limit=dt_limit)
    if not viewable:
        state.copy_(state3.view_as(state))
    return y.view(b, h, p)


def _viewable(state: torch.Tensor) -> bool:
    """[b, h, p, n] whose (h, p) dims merge into one channel dim without a copy."""
    return state.stride(1) == state.shape[2] * state.stride(2)
