"""Causal attention over packed sequences (ops/varlen.py: several sequences end to end in one row),
each sequence attending within itself from its own start; and decode attention, one query per row
against that row's cached keys.

The reference is SDPA with a block-diagonal causal mask over the pack: it runs anywhere, but costs
T^2 for a pack of T tokens. On a GPU, torch's flash varlen attention (`torch.nn.attention.varlen`,
torch >= 2.10) costs the sum of each sequence's L^2 and holds no mask (dispatch.py picks it, once a
probe on the device has seen it run and agree with the reference).
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from .varlen import seq_index

log = logging.getLogger(__name__)
_FLASH_WORKS: dict[torch.device, bool] = {}


def _per_query_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys/values [T, kv_heads, d] repeated to `heads` (grouped-query attention)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            scale: float | None = None) -> torch.Tensor:
    """q [T, heads, d], k and v [T, kv_heads, d] (heads a multiple of kv_heads), cu_seqlens [nseq + 1]
    int32 -> [T, heads, d]: token t of sequence s attends to the tokens of s up to t."""
    T, heads = q.shape[:2]
    seq = seq_index(cu_seqlens, T)
    tokens = torch.arange(T, device=q.device)
    visible = (seq[:, None] == seq[None, :]) & (tokens[None, :] <= tokens[:, None])  # [T, T]
    # keys/values per query head rather than enable_gqa: a mask-taking fused kernel then qualifies
    # whatever this torch's enable_gqa support (the math fallback holds [heads, T, T] fp32 scores)
    k, v = (_per_query_head(t, heads) for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=visible[None, None], scale=scale)
    return out[0].transpose(0, 1)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     scale: float | None = None) -> torch.Tensor:
    """q [b, heads, d], k_cache and v_cache [b, S, kv_heads, d] (heads a multiple of kv_heads),
    positions [b] -> [b, heads, d]: row i's query attends to its keys 0..positions[i] (all S when
    that is past the cache: a CUDA graph's free rows). The reference masks the whole cache; the
    kernel behind it reads each row's keys up to its position only."""
    S = k_cache.shape[1]
    visible = torch.arange(S, device=q.device)[None, :] <= positions[:, None]  # [b, S]
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=visible[:, None, None], enable_gqa=q.shape[1] != k_cache.shape[2],
                                         scale=scale)
    return out[:, :, 0]


@functools.lru_cache(maxsize=None)
def flash_varlen() -> Callable | None:
    """torch's flash varlen attention where this torch has it with causal windows and a scale
    (torch >= 2.10), else None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params or "scale" not in params:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=None)
def _takes_gqa(varlen_attn: Callable) -> bool:
    """Whether this varlen kernel takes fewer key/value heads itself (enable_gqa, torch >= 2.12); asked
    once per kernel, not per layer of every prefill."""
    return "enable_gqa" in inspect.signature(varlen_attn).parameters


def flash_works(device: torch.device) -> bool:
    """Whether torch's flash varlen kernel runs on `device` and matches the reference, found out once
    per device on a tiny pack (grouped-query, two sequences). Never during CUDA graph capture, which
    a failing kernel would leave broken: a first call there takes the reference, and asks again later."""
    ok = _FLASH_WORKS.get(device)
    if ok is not None:
        return ok
    if flash_varlen() is None or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(24, h, 64, generator=g, device=device, dtype=torch.bfloat16) for h in (4, 2, 2))
        cu = torch.tensor([0, 5, 24], dtype=torch.int32, device=device)
        got = packed_causal_attention_flash(q, k, v, cu).float()
        want = packed_causal_attention(q.float(), k.float(), v.float(), cu)
        ok = bool(torch.allclose(got, want, atol=3e-2, rtol=3e-2))
        if not ok:
            log.warning("torch's flash varlen attention disagrees with the reference here (max |diff| %.3g): "
                        "packed prefill takes the masked reference", (got - want).abs().max().item())
    except Exception as e:  # noqa: BLE001 - any refusal of the kernel means: use the reference
        log.warning("torch's flash varlen attention does not run here (%s): packed prefill takes the masked "
                    "reference", e)
        ok = False
    _FLASH_WORKS[device] = ok
    return ok


def packed_causal_attention_flash(q, k, v, cu_seqlens, scale=None):
    """packed_causal_attention through torch's flash varlen kernel (CUDA, fp16/bf16). The longest
    sequence is bounded by the pack's length, which keeps the call free of host syncs (a CUDA graph
    replays it for any lengths)."""
    varlen_attn = flash_varlen()
    T, heads = q.shape[:2]
    gqa = _takes_gqa(varlen_attn)
    if not gqa:
        k, v = (_per_query_head(t, heads) for t in (k, v))
    extra = {"enable_gqa": True} if gqa and k.shape[1] != heads else {}
    q, k, v = (t.contiguous() for t in (q, k, v))  # views of the qkv projection: its rows are wider
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, T, T, scale=scale, window_size=(-1, 0), **extra)
