"""The projections' reference: a plain linear layer, the one op whose kernel only speeds up decode.

`scale` multiplies the output: a float, or a tensor of one factor per output feature. It is where
a family's constant multipliers go (Falcon-H1's muP: on a projection's input, which by linearity is
its output when it has no bias, and per-segment on Mamba-2's in_proj output), so that a decode step
runs them inside the projection's kernel instead of as kernels of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scale_output(y: torch.Tensor, scale: float | torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """y * scale in y's dtype (a per-feature scale broadcast over the last dim), computed in the
    wider of the two dtypes and rounded once. One pass written in y's dtype: `(y * scale).to(...)`
    with an fp32 scale made an fp32 copy of y and a second pass, which at a prefill's widths (Falcon-H1's
    gate_up, 8192 x 24576) cost more than the projection's epilogue saves at decode."""
    if scale is None:
        return y
    if y.requires_grad:  # training through project(): out= has no backward
        return (y * scale).to(y.dtype)
    return torch.mul(y, scale, out=y if in_place else torch.empty_like(y))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ weight^T + bias) * scale: x [..., K], weight [N, K], bias [N] or None, scale a float,
    [N] or None -> [..., N]."""
    return scale_output(F.linear(x, weight, bias), scale, in_place=True)  # F.linear's output is ours
