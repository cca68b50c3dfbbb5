"""The projections' reference: a plain linear layer, the one op whose kernel only speeds up decode.

`scale` multiplies the output: a float, a tensor of one factor per output feature, or `Factors`
(that tensor with the segments of equal factor it is made of). It is where a family's constant
multipliers go (Falcon-H1's muP: on a projection's input, which by linearity is its output when it
has no bias, and per-segment on Mamba-2's in_proj output), so that a decode step runs them inside
the projection's kernel instead of as kernels of their own.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class RowRms(NamedTuple):
    """A row_scale given as the parts it is made of: 1/rms of each row of a tensor (over `width`
    features) from `sum_sq` (fp32 [..., T]: its sums of squares over T slices of the features).
    What a block's entry leaves for its first projection when the projection before wrote the
    stream (ops.norm.linear_into_entry): the projection's kernel sums the T parts itself."""

    sum_sq: torch.Tensor
    width: int
    eps: float

    def value(self) -> torch.Tensor:
        return torch.rsqrt(self.sum_sq.sum(-1) / self.width + self.eps)


class Factors(NamedTuple):
    """A projection's output factors two ways: per_feature (fp32 [N]) for the GEMV's epilogue, and
    segments ((start, end, factor) for each run whose factor is not 1) for the reference, which
    multiplies each run in place by a scalar: torch's kernel for a bf16 tensor times an fp32 one
    casts element by element, unvectorised (416 us for Falcon-H1-7B's gate_up at 16 x 512 tokens on
    an H200, 55 ms of a 300 ms prefill), where a bf16 run times a scalar is vectorised, on only the
    runs that need it, with the same result (the product in fp32, rounded once)."""

    per_feature: torch.Tensor
    segments: tuple[tuple[int, int, float], ...]


def scale_output(y: torch.Tensor, scale: float | torch.Tensor | Factors | None, in_place: bool = False) -> torch.Tensor:
    """y * scale in y's dtype (a per-feature scale broadcast over the last dim), computed in the
    wider of the two dtypes and rounded once. One pass written in y's dtype: `(y * scale).to(...)`
    with an fp32 scale made an fp32 copy of y and a second pass, which at a prefill's widths (Falcon-H1's
    gate_up, 8192 x 24576) cost more than the projection's epilogue saves at decode."""
    if scale is None:
        return y
    if isinstance(scale, Factors):
        out = y if in_place else y.clone()
        for start, end, factor in scale.segments:
            out[..., start:end].mul_(factor)
        return out
    if y.requires_grad:  # training through project(): out= has no backward
        return (y * scale).to(y.dtype)
    return torch.mul(y, scale, out=y if in_place else torch.empty_like(y))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | torch.Tensor | Factors | None = None,
           row_scale: torch.Tensor | RowRms | None = None) -> torch.Tensor:
    """y = (x @ weight^T * row_scale + bias) * scale: x [..., K], weight [N, K], bias [N] or None,
    scale a float, [N], Factors or None, row_scale fp32 [...] (one factor per row of x: a norm's
    1/rms applied after the projection, see ops.decode.mamba2_decode_step's defer_norm), RowRms
    (the same from its parts) or None -> [..., N]."""
    if isinstance(row_scale, RowRms):
        row_scale = row_scale.value()
    if row_scale is None:
        return scale_output(F.linear(x, weight, bias), scale, in_place=True)  # F.linear's output is ours
    y = (F.linear(x, weight).float() * row_scale.unsqueeze(-1)).to(x.dtype)
    return scale_output(y if bias is None else y + bias, scale, in_place=True)
