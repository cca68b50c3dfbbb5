"""Rotary position embedding: the reference (HF's rotate-half form).

At decode a hybrid's attention rotates one token's queries and keys per layer. Written as torch ops
that is ~15 small kernels per tensor (the frequencies, cos and sin, the halves, the products), which
at batch 1 cost more than the attention itself: the kernel behind this signature does it in one.
"""
from __future__ import annotations

import torch


def rope_frequencies(theta: float, rotary_dim: int, device=None) -> torch.Tensor:
    """[rotary_dim / 2] fp32 inverse frequencies theta^(-2j / rotary_dim), as HF computes them."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [b, L, heads, d] rotated at positions [b, L] over its first 2 * len(inv_freq) channels
    (the rest pass through): channel j < half pairs with j + half, by angle positions * inv_freq[j]."""
    rotary_dim = 2 * inv_freq.shape[0]
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [b, L, rotary_dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
