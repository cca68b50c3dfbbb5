"""RMS norms: the block norm, and Mamba-2's group-wise gated norm whose groups may span TP ranks."""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .linear import RowRms, linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """HF's MambaRMSNorm: normalise in fp32, cast back, then scale (weightless when weight is None)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else weight * y


def add_rms_norm(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    residual_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm block's entry: the residual stream h = residual + delta (the previous block's
    output; None for the first block) in `residual_dtype`, and HF's norm of h cast to the weight's
    dtype. Returns (normed, h). One op so that a kernel reads the stream once and writes it once."""
    h = _stream(residual, delta, residual_dtype)
    return rms_norm(h.to(weight.dtype), weight, eps), h


def _stream(residual: torch.Tensor, delta: torch.Tensor | None, residual_dtype: torch.dtype) -> torch.Tensor:
    """residual + delta in residual_dtype, as every block's entry forms it."""
    h = residual.to(residual_dtype)
    return h if delta is None else (h + delta).to(residual_dtype)


class EntryParts(NamedTuple):
    """A pre-norm block's entry (add_rms_norm) left in parts for its first projection, which then
    applies the norm's 1/rms after its product (a factor per row commutes with it): scaled is h
    rounded to the norm weight's dtype, times the weight; stream is h; row_rms gives each row's
    1/rms from its partial sums of squares (None: scaled is already the normed input)."""

    scaled: torch.Tensor
    stream: torch.Tensor
    row_rms: RowRms | None


def linear_into_entry(x: torch.Tensor, weight: torch.Tensor, row_scale: torch.Tensor | None, residual: torch.Tensor,
                      norm_weight: torch.Tensor, eps: float, residual_dtype: torch.dtype,
                      scale: float | None = None) -> EntryParts:
    """A block's last projection and the next block's entry in one op: delta = linear(x, weight,
    scale=scale, row_scale=row_scale), h = residual + delta as add_rms_norm forms it, and h's parts
    for the next projection (EntryParts), so that at decode nothing but the projection's own
    epilogue walks the stream between the two projections. linear(scaled, W, row_scale=row_rms)
    equals linear(add_rms_norm(...)[0], W) up to where the rounding falls."""
    delta = linear(x, weight, scale=scale, row_scale=row_scale)
    h = _stream(residual, delta, residual_dtype)
    hq = h.to(norm_weight.dtype)
    sum_sq = hq.float().pow(2).sum(-1, keepdim=True)
    return EntryParts(hq * norm_weight, h, RowRms(sum_sq, h.shape[-1], eps))


def add_rms_norm_linear(
    residual: torch.Tensor,
    delta: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    residual_dtype: torch.dtype,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's entry and its first projection: (linear(normed, weight, bias, scale), h) for
    add_rms_norm's (normed, h). One op so that a decode step runs both in one kernel."""
    normed, h = add_rms_norm(residual, delta, norm_weight, eps, residual_dtype)
    return linear(normed, weight, bias, scale), h


def gated_rms_norm(
    y: torch.Tensor,
    gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    group_size: int,
    reduce_sum_of_squares: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """norm(y * silu(gate)) per group of `group_size` channels, times weight.

    When this rank holds only part of one group (n_groups < tp), `reduce_sum_of_squares` maps the
    local sum of squares [..., 1] to the whole group's: the mean then covers the full group, so
    the result equals the unsharded norm.
    """
    h = y.float() * F.silu(gate.float())
    if reduce_sum_of_squares is None:
        *lead, width = h.shape
        hg = h.view(*lead, width // group_size, group_size)
        hg = hg * torch.rsqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
        h = hg.view(*lead, width)
    else:
        ss = reduce_sum_of_squares(h.pow(2).sum(-1, keepdim=True))
        h = h * torch.rsqrt(ss / group_size + eps)
    return weight * h.to(y.dtype)
