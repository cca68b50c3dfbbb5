"""Decode attention (ops/attention.py's `decode_attention`): one query per row against its cached
keys, reading only the keys up to the row's position.

The cache is split along its positions over `splits` programs per (row, kv head), so that a long
context keeps the GPU busy at batch 1; each program keeps an online softmax (running max, sum and
weighted values) for the query heads of its kv head, and a second launch merges the splits. A
split past a row's position reads nothing. Scores are taken with tl.dot over the group's query
heads padded to 16 rows.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import enter as pdl_enter
from .runtime import INTERPRETED

BLOCK_S = 32  # keys per step
SPLIT_KEYS = 256  # cache positions per split, at least
MAX_SPLITS = 16


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, S, per_split, splits, scale_log2e,
                  sq_b, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_S: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    sp = tl.program_id(2)
    end = tl.minimum(tl.load(pos_ptr + b).to(tl.int64) + 1, S)
    lo = sp * per_split
    hi = tl.minimum(lo + per_split, end)
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = dd < D
    q = tl.load(q_ptr + b * sq_b + (hk * G + g)[:, None] * sq_h + dd[None, :], mask=gm[:, None] & dm[None, :],
                other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    for s0 in range(lo, hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        sm = s < hi
        k = tl.load(k_base + s[:, None] * sk_s + dd[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
        v = tl.load(v_base + s[:, None] * sv_s + dd[None, :], mask=sm[:, None] & dm[None, :], other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(sm[None, :], scores * scale_log2e, float("-inf"))  # [BLOCK_G, BLOCK_S]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        p = tl.exp2(scores - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (b * tl.num_programs(1) + hk) * splits + sp
    tl.store(acc_ptr + (row * BLOCK_G + g)[:, None] * BLOCK_D + dd[None, :], acc)
    tl.store(ml_ptr + (row * BLOCK_G + g) * 2, m_i)
    tl.store(ml_ptr + (row * BLOCK_G + g) * 2 + 1, l_i)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, o_ptr, splits, so_b, so_h,
                  G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_SPLITS: tl.constexpr, PDL: tl.constexpr):
    pdl_enter(PDL)  # scheduled while the split kernel drains; reads its partials only after it ends
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    sp = tl.arange(0, BLOCK_SPLITS)
    g = tl.arange(0, BLOCK_G)
    dd = tl.arange(0, BLOCK_D)
    live = sp < splits
    rows = ((b * tl.num_programs(1) + hk) * splits + sp)[:, None] * BLOCK_G + g[None, :]  # [SPLITS, G]
    m = tl.load(ml_ptr + rows * 2, mask=live[:, None], other=float("-inf"))
    l = tl.load(ml_ptr + rows * 2 + 1, mask=live[:, None], other=0.0)
    top = tl.max(m, axis=0)  # split 0 always holds the row's position 0: finite
    w = tl.where(live[:, None], tl.exp2(m - top[None, :]), 0.0)
    total = tl.sum(l * w, axis=0)
    acc = tl.load(acc_ptr + rows[:, :, None] * BLOCK_D + dd[None, None, :], mask=live[:, None, None], other=0.0)
    out = tl.sum(acc * w[:, :, None], axis=0) / total[:, None]
    mask = (g < G)[:, None] & (dd < D)[None, :]
    tl.store(o_ptr + b * so_b + (hk * G + g)[:, None] * so_h + dd[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    b, heads, d = q.shape
    S, kv_heads = k_cache.shape[1], k_cache.shape[2]
    G = heads // kv_heads
    out = torch.empty_like(q)
    if b == 0:
        return out
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    positions = positions.contiguous()
    splits = max(1, min(MAX_SPLITS, triton.cdiv(S, SPLIT_KEYS)))
    per_split = triton.cdiv(triton.cdiv(S, splits), BLOCK_S) * BLOCK_S
    splits = triton.cdiv(S, per_split)
    block_g, block_d = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(d))
    acc = torch.empty(b * kv_heads * splits * block_g * block_d, device=q.device, dtype=torch.float32)
    ml = torch.empty(b * kv_heads * splits * block_g * 2, device=q.device, dtype=torch.float32)
    scale_log2e = (scale if scale is not None else 1.0 / math.sqrt(d)) * 1.4426950408889634
    on = pdl.use(q.device)
    _split_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, positions, acc, ml, S, per_split, splits, scale_log2e,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        G=G, D=d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_S=BLOCK_S,
        UPCAST=INTERPRETED and q.dtype != torch.float32, IEEE=q.dtype == torch.float32, PDL=on,
        num_warps=4, **pdl.kwargs(on),
    )
    _merge_kernel[(b, kv_heads)](acc, ml, out, splits, out.stride(0), out.stride(1),
                                 G=G, D=d, BLOCK_G=block_g, BLOCK_D=block_d,
                                 BLOCK_SPLITS=triton.next_power_of_2(splits), PDL=on, num_warps=4, **pdl.kwargs(on))
    return out
