"""Selective-scan kernels for Mamba-1 and Mamba-2, one kernel per phase for both models.

Both models run the same per-channel recurrence h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t over an
[n]-vector of state per channel, and read y_t = C_t h_t + D x_t. They differ only in what is shared:
Mamba-1 has a dt and a row of A per channel and one B/C for all channels; Mamba-2 shares dt, A and
D across the `headdim` channels of a head and B/C across the heads of a group. So each kernel works
on flat channels c, with head = c // HEADDIM (HEADDIM = 1 for Mamba-1) and group = head //
heads_per_group; a program takes BLOCK_D channels of one group and keeps their [BLOCK_D, n] state
in fp32 registers.

Prefill (`_scan_kernel`) walks time in chunks of T steps: the chunk's recurrence is solved by a
parallel associative scan over T, then joined to the state carried in. Decode
(`_state_update_kernel`) reads each state element once and writes it once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..varlen import check_packed


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with log1p done the accurate way (fp32 log(1 + e) loses e's low bits when e is
    # small), and torch's threshold of 20 above which softplus is the identity.
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _dt(dt, bias_ptr, heads, mask, dt_min, dt_max, HAS_DT_BIAS: tl.constexpr):
    dt = dt.to(tl.float32)
    if HAS_DT_BIAS:
        dt += tl.load(bias_ptr + heads, mask=mask, other=0.0).to(tl.float32)
    return tl.minimum(tl.maximum(_softplus(dt), dt_min), dt_max)


@triton.jit
def _linear_recurrence(a1, b1, a2, b2):
    # Compose h -> a1 h + b1, then h -> a2 h + b2.
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, h0_ptr, y_ptr, hT_ptr, cu_ptr,
    L, nchan, nstate, heads_per_group, dt_min, dt_max,
    sx_b, sx_l, sx_c,
    sdt_b, sdt_l, sdt_h,
    sA_h, sA_n,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sz_b, sz_l, sz_c,
    sy_b, sy_l, sy_c,
    sh0_b, sh0_c, sh0_n,
    shT_b, shT_c, shT_n,
    HEADDIM: tl.constexpr, A_PER_HEAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, HAS_H0: tl.constexpr, PACKED: tl.constexpr,
    T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # the batch row; packed: the sequence (all in row 0)
    offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, T)
    if PACKED:  # a program per sequence, over its own time span: it starts from zeros and ends in hT[seq]
        row = 0
        first = tl.load(cu_ptr + pid_b)
        end = tl.load(cu_ptr + pid_b + 1)
    else:
        row = pid_b
        first = 0
        end = L
    cmask = offs_c < nchan
    nmask = offs_n < nstate
    heads = offs_c // HEADDIM
    group = (pid_d * BLOCK_D // HEADDIM) // heads_per_group
    cn_mask = cmask[:, None] & nmask[None, :]

    if A_PER_HEAD:
        A = tl.load(A_ptr + heads * sA_h, mask=cmask, other=0.0).to(tl.float32)[None, :, None]
    else:
        A = tl.load(A_ptr + heads[:, None] * sA_h + offs_n[None, :] * sA_n, mask=cn_mask,
                    other=0.0).to(tl.float32)[None, :, :]
    if HAS_D:
        Dv = tl.load(D_ptr + heads, mask=cmask, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * sh0_b + offs_c[:, None] * sh0_c + offs_n[None, :] * sh0_n,
                    mask=cn_mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)

    x_base = x_ptr + row * sx_b + offs_c[None, :] * sx_c
    dt_base = dt_ptr + row * sdt_b + heads[None, :] * sdt_h
    B_base = B_ptr + row * sB_b + group * sB_g + offs_n[None, :] * sB_n
    C_base = C_ptr + row * sC_b + group * sC_g + offs_n[None, :] * sC_n
    z_base = z_ptr + row * sz_b + offs_c[None, :] * sz_c
    y_base = y_ptr + row * sy_b + offs_c[None, :] * sy_c
    for t0 in range(first, end, T):
        ts = t0 + offs_t
        tmask = ts < end
        tc_mask = tmask[:, None] & cmask[None, :]
        tn_mask = tmask[:, None] & nmask[None, :]
        x = tl.load(x_base + ts[:, None] * sx_l, mask=tc_mask, other=0.0).to(tl.float32)  # [T, D]
        dt = tl.load(dt_base + ts[:, None] * sdt_l, mask=tc_mask, other=0.0)
        # Steps past the end must leave h alone: dt = 0 makes them the identity.
        dt = tl.where(tc_mask, _dt(dt, dt_bias_ptr, heads[None, :], cmask[None, :], dt_min, dt_max,
                                   HAS_DT_BIAS), 0.0)
        Bt = tl.load(B_base + ts[:, None] * sB_l, mask=tn_mask, other=0.0).to(tl.float32)  # [T, N]
        Ct = tl.load(C_base + ts[:, None] * sC_l, mask=tn_mask, other=0.0).to(tl.float32)
        dA = tl.exp(dt[:, :, None] * A)  # [T, D, N] (or [T, D, 1] when A is per head)
        dA = tl.broadcast_to(dA, [T, BLOCK_D, BLOCK_N])
        dBx = (dt * x)[:, :, None] * Bt[:, None, :]
        if T == 1:  # a plain step-by-step scan: no parallel work within the chunk
            cum_a, cum_b = dA, dBx
        else:
            cum_a, cum_b = tl.associative_scan((dA, dBx), 0, _linear_recurrence)
        hs = cum_a * h[None, :, :] + cum_b
        y = tl.sum(hs * Ct[:, None, :], axis=2)  # [T, D]
        h = tl.sum(tl.where((offs_t == T - 1)[:, None, None], hs, 0.0), axis=0)
        if HAS_D:
            y += x * Dv[None, :]
        if HAS_Z:
            z = tl.load(z_base + ts[:, None] * sz_l, mask=tc_mask, other=0.0).to(tl.float32)
            y *= z * tl.sigmoid(z)
        tl.store(y_base + ts[:, None] * sy_l, y.to(y_ptr.dtype.element_ty), mask=tc_mask)
    tl.store(hT_ptr + pid_b * shT_b + offs_c[:, None] * shT_c + offs_n[None, :] * shT_n, h, mask=cn_mask)


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, dt_bias_ptr, y_ptr,
    nchan, nstate, heads_per_group, dt_min, dt_max,
    ss_b, ss_c, ss_n,
    sx_b, sx_c,
    sdt_b, sdt_h,
    sA_h, sA_n,
    sB_b, sB_g, sB_n,
    sC_b, sC_g, sC_n,
    sz_b, sz_c,
    sy_b, sy_c,
    HEADDIM: tl.constexpr, A_PER_HEAD: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
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
    x = tl.load(x_ptr + pid_b * sx_b + offs_c * sx_c, mask=cmask, other=0.0).to(tl.float32)
    dt = _dt(tl.load(dt_ptr + pid_b * sdt_b + heads * sdt_h, mask=cmask, other=0.0),
             dt_bias_ptr, heads, cmask, dt_min, dt_max, HAS_DT_BIAS)
    Bv = tl.load(B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n, mask=nmask, other=0.0).to(tl.float32)
    Cv = tl.load(C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n, mask=nmask, other=0.0).to(tl.float32)
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


# Tuning (T, BLOCK_D, num_warps) for the prefill scan, per state size, from a sweep on an H100 at
# 2048 tokens (docs/benchmarks.md). T * BLOCK_D * n is the register tile the associative scan works
# on: at n = 16 a 16-step scan pays; at n = 128 the tile is too big and stepping one token at a time
# (T = 1) wins, though the dispatcher prefers a chunked matrix-form SSD scan there anyway.
SCAN_CONFIG = {16: (16, 8, 4), 128: (1, 4, 1)}


def _scan_config(n: int):
    if n in SCAN_CONFIG:
        return SCAN_CONFIG[n]
    bn = triton.next_power_of_2(n)
    bd = 8 if bn <= 32 else 4
    return max(2, 2048 // (bn * bd)), bd, 4


def _scan(x3, dt3, A2, B4, C4, D, z3, dt_bias, h0, headdim, a_per_head, dt_limit, cu_seqlens=None):
    """x3, z3 [b, L, nchan]; dt3 [b, L, nheads]; B4, C4 [b, L, g, n]; h0 [b, nchan, n] or None.
    cu_seqlens: x3's one row packs sequences (h0 None); the final states are then [nseq, nchan, n]."""
    b, L, nchan = x3.shape
    g, n = B4.shape[-2:]
    nheads = nchan // headdim
    T, want_d, num_warps = _scan_config(n)
    bn = triton.next_power_of_2(n)
    bd = _block_d(nchan, nchan // g, g, want_d)
    y = torch.empty(b, L, nchan, device=x3.device, dtype=x3.dtype)
    cu = A2  # placeholder, read only when packed
    rows = b
    if cu_seqlens is not None:
        check_packed(x3, cu_seqlens, h0)
        cu, rows = cu_seqlens, cu_seqlens.shape[0] - 1
    hT = torch.empty(rows, nchan, n, device=x3.device, dtype=torch.float32)
    D, dt_bias = _vec(D), _vec(dt_bias)
    zs = z3.stride() if z3 is not None else (0, 0, 0)
    h0s = h0.stride() if h0 is not None else (0, 0, 0)
    _scan_kernel[(triton.cdiv(nchan, bd), rows)](
        x3, dt3, A2, B4, C4, D if D is not None else x3, z3 if z3 is not None else x3,
        dt_bias if dt_bias is not None else x3, h0 if h0 is not None else hT, y, hT, cu,
        L, nchan, n, nheads // g, float(dt_limit[0]), float(dt_limit[1]),
        *x3.stride(), *dt3.stride(), *A2.stride(), *B4.stride(), *C4.stride(), *zs, *y.stride(), *h0s,
        *hT.stride(),
        HEADDIM=headdim, A_PER_HEAD=a_per_head, HAS_D=D is not None, HAS_Z=z3 is not None,
        HAS_DT_BIAS=dt_bias is not None, HAS_H0=h0 is not None, PACKED=cu_seqlens is not None,
        T=T, BLOCK_D=bd, BLOCK_N=bn,
        num_warps=num_warps,
    )
    return y, hT


# State elements per decode program: enough loads in flight per program, and enough programs to
# cover every SM at batch 1 (Mamba2-2.7B: 5120 x 128 state elements a layer).
UPDATE_BLOCK = 2048


def _state_update(state3, x2, dt2, A2, B3, C3, D, z2, dt_bias, headdim, a_per_head, dt_limit):
    """state3 [b, nchan, n] updated in place; x2, z2 [b, nchan]; dt2 [b, nheads]; B3, C3 [b, g, n]."""
    b, nchan, n = state3.shape
    g = B3.shape[1]
    nheads = nchan // headdim
    bn = triton.next_power_of_2(n)
    bd = _block_d(nchan, nchan // g, g, max(1, UPDATE_BLOCK // bn))
    y = torch.empty(b, nchan, device=x2.device, dtype=x2.dtype)
    D, dt_bias = _vec(D), _vec(dt_bias)
    zs = z2.stride() if z2 is not None else (0, 0)
    _state_update_kernel[(triton.cdiv(nchan, bd), b)](
        state3, x2, dt2, A2, B3, C3, D if D is not None else x2, z2 if z2 is not None else x2,
        dt_bias if dt_bias is not None else x2, y,
        nchan, n, nheads // g, float(dt_limit[0]), float(dt_limit[1]),
        *state3.stride(), *x2.stride(), *dt2.stride(), *A2.stride(), *B3.stride(), *C3.stride(), *zs,
        *y.stride(),
        HEADDIM=headdim, A_PER_HEAD=a_per_head, HAS_D=D is not None, HAS_Z=z2 is not None,
        HAS_DT_BIAS=dt_bias is not None, BLOCK_D=bd, BLOCK_N=bn, num_warps=4,
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
