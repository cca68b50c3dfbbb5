"""The projections' reference: a plain linear layer, the one op whose kernel only speeds up decode.

`scale` multiplies the output: a float, or a tensor of one factor per output feature. It is where
a family's constant multipliers go (Falcon-H1's muP: on a projection's input, which by linearity is
its output when it has no bias, and per-segment on Mamba-2's in_proj output), so that a decode step
runs them inside the projection's kernel instead of as kernels of their own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scale_output(y: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """y * scale in y's dtype (a per-feature scale broadcast over the last dim)."""
    if scale is None:
        return y
    return (y * scale).to(y.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ weight^T + bias) * scale: x [..., K], weight [N, K], bias [N] or None, scale a float,
    [N] or None -> [..., N]."""
    return scale_output(F.linear(x, weight, bias), scale)
