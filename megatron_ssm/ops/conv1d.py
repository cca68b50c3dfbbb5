"""Depthwise causal conv1d over the channel-last activations, with a carried state of the last
K-1 inputs, so that prefill can continue from a cached prefix and decode needs one column."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .varlen import check_packed, split_packed


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    silu: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, L, C]; weight [C, K]; initial_state [b, C, K-1] (the inputs before x; zeros if None).

    Returns (y [b, L, C], final_state [b, C, K-1]). With cu_seqlens (ops/varlen.py), x [1, T, C]
    packs nseq sequences, each convolved from zeros: final_state is [nseq, C, K-1].
    """
    if cu_seqlens is not None:
        check_packed(x, cu_seqlens, initial_state)
        parts = [causal_conv1d(x[:, s:e], weight, bias, None, silu) for s, e in split_packed(cu_seqlens)]
        return torch.cat([y for y, _ in parts], 1), torch.cat([f for _, f in parts], 0)
    b, L, C = x.shape
    K = weight.shape[-1]
    xt = x.transpose(1, 2)
    if initial_state is None:
        initial_state = xt.new_zeros(b, C, K - 1)
    padded = torch.cat([initial_state.to(xt.dtype), xt], dim=-1)
    if L == 0:  # (an empty packed sequence) nothing to convolve; the state passes through
        return x.clone(), padded.contiguous()
    y = F.conv1d(padded.to(weight.dtype), weight.unsqueeze(1), bias, groups=C)
    if silu:
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype), padded[:, :, L:].contiguous()


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
) -> torch.Tensor:
    """One decode step. x [b, C]; conv_state [b, C, K-1] is advanced in place. Returns y [b, C]."""
    window = torch.cat([conv_state, x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window[:, :, 1:])
    y = (window.to(weight.dtype) * weight).sum(-1)
    if bias is not None:
        y = y + bias
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
