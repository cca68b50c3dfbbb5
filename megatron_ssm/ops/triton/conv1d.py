"""Depthwise causal conv1d: prefill over [b, L, C] (channel-last, so a block of channels is one
coalesced row) and the one-token decode step that shifts the [b, C, K-1] state in place."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..varlen import check_packed, seq_index
from . import pdl
from .pdl import enter as pdl_enter


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, init_ptr, y_ptr, seq_ptr, cu_ptr, final_ptr,
    L, C,
    sx_b, sx_l, sx_c,
    sw_c, sw_k,
    si_b, si_c, si_k,
    sy_b, sy_l, sy_c,
    sf_s, sf_c, sf_k,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    PACKED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr, FAST_DIV: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    x_base = x_ptr + pid_b * sx_b
    first = tl.zeros([BLOCK_L], dtype=tl.int32)  # the first input time a tap may read
    if PACKED:  # each packed sequence starts over: taps before its first token read zeros
        lmask = offs_l < L
        seq = tl.load(seq_ptr + offs_l, mask=lmask, other=0)
        first = tl.load(cu_ptr + seq, mask=lmask, other=0)
        end = tl.load(cu_ptr + seq + 1, mask=lmask, other=0)
    for k in tl.static_range(K):
        w = tl.load(w_ptr + offs_c * sw_c + k * sw_k, mask=cmask, other=0.0).to(tl.float32)
        src = offs_l + (k - (K - 1))  # input time of this tap; negative times live in the state
        # (Masked in the load: a where() after unmasked loads, so that they need not wait on the
        # sequence starts, measured 2-8% slower on every packed tile, session 16.)
        xv = tl.load(x_base + src[:, None] * sx_l + offs_c[None, :] * sx_c,
                     mask=((src >= first) & (src < L))[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        if PACKED and k == K - 1:
            # This tile's own inputs: those among their sequence's last K-1 are its conv state
            # (the slots before a shorter sequence's start stay the zeros they were made with).
            slot = offs_l - (end - (K - 1))
            tl.store(final_ptr + seq[:, None].to(tl.int64) * sf_s + offs_c[None, :] * sf_c + slot[:, None] * sf_k,
                     xv.to(final_ptr.dtype.element_ty), mask=(lmask & (slot >= 0))[:, None] & cmask[None, :])
        acc += xv * w[None, :]
    if HAS_INIT:
        # Only the first tile's first K-1 times reach into the state: the other tiles skip these loads
        # (strided along channels, their pointers doubled the registers of a tile: at 128 rows the
        # kernel spilled and ran 20x slower, docs/benchmarks.md).
        if pid_l == 0:
            for k in tl.static_range(K - 1):
                w = tl.load(w_ptr + offs_c * sw_c + k * sw_k, mask=cmask, other=0.0).to(tl.float32)
                src = offs_l + (k - (K - 1))
                # The reference casts the state to x's dtype before convolving: round the same way.
                sv = tl.load(init_ptr + pid_b * si_b + offs_c[None, :] * si_c + (src[:, None] + (K - 1)) * si_k,
                             mask=(src < 0)[:, None] & cmask[None, :], other=0.0)
                acc += sv.to(x_ptr.dtype.element_ty).to(tl.float32) * w[None, :]
    if SILU:  # x sigmoid(x) = x / (1 + exp(-x)), with the hardware's approximate divide on CUDA
        den = 1.0 + tl.exp2(acc * -1.4426950408889634)
        if FAST_DIV:
            acc = libdevice.fast_dividef(acc, den)
        else:
            acc = acc / den
    tl.store(y_ptr + pid_b * sy_b + offs_l[:, None] * sy_l + offs_c[None, :] * sy_c,
             acc.to(y_ptr.dtype.element_ty), mask=(offs_l < L)[:, None] & cmask[None, :])


# (BLOCK_L, BLOCK_C, num_warps) of the prefill conv, for separate sequences and for packed ones. A
# program's weights are K strided loads per channel (weight is [C, K]). From a sweep on the H200
# (tools/scan_check.py --sweep, docs/benchmarks.md "Session 6"), once only the first tile read the
# state: (16, 256, 4) took 36 us for one 2048-token Falcon-Mamba prompt, 183 us for 32 x 512, 334 us
# for a 32768-token Mamba-2 prompt (its x | B | C inside in_proj's rows) and 34 us for a 2048-token
# one, the fastest or within 1% on each; packed prompts (each row's first tap masked by its
# sequence's start) ran 2x slower with it, and fastest with taller, narrower tiles: (128, 64, 4)
# took 172 us for 16 packed 512-token prompts (the best, (8, 1024, 8), 166 us, was 2x slower on
# the Mamba-2 shapes). Once the packed kernel wrote the conv states itself and seq_index was one
# searchsorted (session 16), (32, 128, 4) took 126 us for 16 packed 512-token Falcon-Mamba prompts
# and 127 us for [700, 1, 300, 23] x 8 (the old (128, 64, 4): 145 / 145; (16, 256, 4): 127 / 129),
# 95 us for 16 packed Mamba-2 ones (the best, (16, 256, 4), 93).
CONV_BLOCK = (16, 256, 4)
CONV_BLOCK_PACKED = (32, 128, 4)


def causal_conv1d(x, weight, bias=None, initial_state=None, silu=True, cu_seqlens=None):
    b, L, C = x.shape
    K = weight.shape[-1]
    y = torch.empty_like(x)
    init = initial_state if initial_state is not None else x  # placeholder pointer, never read
    seq = cu = final = weight  # placeholders, used only when packed
    if cu_seqlens is not None:
        check_packed(x, cu_seqlens, initial_state)
        seq, cu = seq_index(cu_seqlens, L), cu_seqlens
        final = x.new_zeros(cu.shape[0] - 1, C, K - 1)  # the kernel writes each sequence's last K-1 inputs
    BLOCK_L, BLOCK_C, num_warps = CONV_BLOCK_PACKED if cu_seqlens is not None else CONV_BLOCK
    grid = (triton.cdiv(L, BLOCK_L), triton.cdiv(C, BLOCK_C), b)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, init, y, seq, cu, final,
        L, C,
        *x.stride(), *weight.stride(),
        *(init.stride() if initial_state is not None else (0, 0, 0)),
        *y.stride(), *(final.stride() if cu_seqlens is not None else (0, 0, 0)),
        K=K, HAS_BIAS=bias is not None, HAS_INIT=initial_state is not None, SILU=silu,
        PACKED=cu_seqlens is not None, BLOCK_L=BLOCK_L, BLOCK_C=BLOCK_C, FAST_DIV=x.is_cuda, num_warps=num_warps,
    )
    if cu_seqlens is not None:
        return y, final
    # The last K-1 inputs (reaching into the initial state when L < K-1): a small copy, left to torch.
    if L >= K - 1:
        final = x[:, L - (K - 1):].transpose(1, 2).contiguous()
    else:
        prev = x.new_zeros(b, C, K - 1) if initial_state is None else initial_state.to(x.dtype)
        final = torch.cat([prev, x.transpose(1, 2)], dim=-1)[:, :, L:].contiguous()
    return y, final


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr,
    C,
    sx_b, sx_c,
    ss_b, ss_c, ss_k,
    sw_c, sw_k,
    sy_b, sy_c,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # EARLY (ops/triton/pdl.py): the conv state and weights, which in_proj does not write, before the wait
    if not EARLY:
        pdl_enter(PDL)
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    cmask = offs_c < C
    s_ptrs = state_ptr + pid_b * ss_b + offs_c[:, None] * ss_c + offs_k[None, :] * ss_k
    # The window [state | x] as one [BLOCK_C, BLOCK_K] tile, x in column K-1 (cast to the state's
    # dtype, as the reference stores it).
    old = tl.load(s_ptrs, mask=cmask[:, None] & (offs_k < K - 1)[None, :], other=0.0)
    w = tl.load(w_ptr + offs_c[:, None] * sw_c + offs_k[None, :] * sw_k,
                mask=cmask[:, None] & (offs_k < K)[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if EARLY:
        pdl_enter(PDL)
    xv = tl.load(x_ptr + pid_b * sx_b + offs_c * sx_c, mask=cmask, other=0.0).to(state_ptr.dtype.element_ty)
    window = tl.where((offs_k == K - 1)[None, :], xv[:, None], old)
    acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += bias
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + pid_b * sy_b + offs_c * sy_c, acc.to(y_ptr.dtype.element_ty), mask=cmask)
    # Shift in place: column k takes column k+1. Another thread may own column k+1 of the same
    # channel, so every read of the old state must finish before the first write.
    tl.debug_barrier()
    tl.store(s_ptrs - ss_k, window, mask=cmask[:, None] & ((offs_k >= 1) & (offs_k < K))[None, :])


def causal_conv1d_update(x, conv_state, weight, bias=None, silu=True):
    b, C = x.shape
    K = weight.shape[-1]
    assert K >= 2, "a width-1 conv has no state"
    y = torch.empty_like(x)
    BLOCK_C = 128
    on = pdl.use(x.device)
    _conv_update_kernel[(triton.cdiv(C, BLOCK_C), b)](
        x, conv_state, weight, bias if bias is not None else weight, y,
        C, *x.stride(), *conv_state.stride(), *weight.stride(), *y.stride(),
        K=K, HAS_BIAS=bias is not None, SILU=silu, PDL=on, EARLY=pdl.early_loads(on), BLOCK_C=BLOCK_C, BLOCK_K=triton.next_power_of_2(K),
        num_warps=4, **pdl.kwargs(on),
    )
    return y
