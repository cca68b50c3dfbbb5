"""A norm whose only reader is a linear layer, as one op: the block norm before a mixer's in_proj, and
Mamba-2's gated norm before out_proj.

At decode a norm is a kernel of its own that costs more in launch and graph gaps than in memory
traffic. Its scale rsqrt(mean(h^2) + eps) is one number per row (per row and group for the gated
norm; one group of the whole row here), so it can multiply the product instead of the input, and
the skinny-GEMM kernel (`megatron_ssm.ops.triton.gemv`) computes the norm while it reads its input.
These references are the unfused path: the norm op, then the linear.
"""
from __future__ import annotations

import torch

from .linear import linear
from .norm import add_rms_norm, gated_rms_norm


def add_rms_norm_linear(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    residual_dtype: torch.dtype,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's entry straight into its first projection: (linear(normed, weight, bias), h)
    for (normed, h) = add_rms_norm(residual, delta, norm_weight, eps, residual_dtype)."""
    normed, h = add_rms_norm(residual, delta, norm_weight, eps, residual_dtype)
    return linear(normed, weight, bias), h


def gated_rms_norm_linear(
    y: torch.Tensor,
    gate: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """linear(gated_rms_norm(y, gate, norm_weight, eps, group_size=y's width), weight, bias): Mamba-2's
    gated norm with one group over this rank's channels, into out_proj."""
    return linear(gated_rms_norm(y, gate, norm_weight, eps, y.shape[-1]), weight, bias)
