"""One decode token of each mixer, everything between its projections, as one op.

At batch 1 a decode step is a chain of tiny kernels per layer, each costing a launch and a gap in
the graph more than its memory traffic. These ops name the whole chain between the projections so
that a kernel (`megatron_ssm.ops.triton.decode`) can run it in one launch. The references here ARE
the unfused path: they call the reference ops one after another, so a fused kernel is tested against
exactly what the model computes without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .conv1d import causal_conv1d_update
from .linear import linear
from .norm import EntryParts, gated_rms_norm, linear_into_entry, rms_norm
from .selective_scan import selective_state_update
from .ssd import ssd_state_update


def mamba2_decode_step(
    xbc: torch.Tensor,
    z: torch.Tensor | None,
    dt: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    norm_weight: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    defer_norm: bool = False,
    group_size: int | None = None,
    reduce_sum_of_squares=None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's mixer for one token, from in_proj's output to out_proj's input.

    xbc [b, channels + 2 g n] (x | B | C, before the conv); z [b, channels]; dt [b, h];
    conv_state [b, channels + 2 g n, K-1] and ssm_state [b, h, p, n] are advanced in place;
    conv_weight [channels + 2 g n, K]; A, D, dt_bias [h]. The number of B/C groups g follows from
    the widths. Returns [b, channels] in xbc's dtype: the gated norm of y by z over groups of
    channels/g channels (norm_weight given), else y * silu(z) (z given), else y itself (for a
    caller whose norm group spans ranks and needs an all-reduce in between).

    defer_norm (norm_weight and z given): the gated norm's 1/rms is left for out_proj to apply
    after its product (one factor per row commutes with it, ops.linear's row_scale), so that no
    kernel between the state update and out_proj needs the whole group. Returns (y * silu(z) *
    norm_weight [b, channels] in xbc's dtype, 1/rms [b, g] fp32) over groups of `group_size`
    channels (default channels/g); reduce_sum_of_squares maps the local sums of squares [b, g] to
    the whole group's where a group spans ranks (as gated_rms_norm's).
    """
    b = xbc.shape[0]
    h, p, n = ssm_state.shape[1:]
    channels = h * p
    g = (xbc.shape[1] - channels) // (2 * n)
    xbc = causal_conv1d_update(xbc, conv_state, conv_weight, conv_bias)
    x, B, C = xbc.split([channels, g * n, g * n], dim=-1)
    y = ssd_state_update(ssm_state, x.reshape(b, h, p), dt, A, B.reshape(b, g, n), C.reshape(b, g, n), D, dt_bias,
                         dt_limit).reshape(b, channels)
    if norm_weight is not None and defer_norm:
        gated = y.float() * F.silu(z.float())
        ss = gated.pow(2).view(b, g, channels // g).sum(-1)
        if reduce_sum_of_squares is not None:
            ss = reduce_sum_of_squares(ss)
        rstd = torch.rsqrt(ss / (group_size or channels // g) + norm_eps)
        return (gated * norm_weight.float()).to(y.dtype), rstd
    if norm_weight is not None:
        return gated_rms_norm(y, z, norm_weight, norm_eps, channels // g)
    if z is not None:
        return y * F.silu(z)
    return y


def mamba2_step_into_entry(
    xbc: torch.Tensor,
    z: torch.Tensor,
    dt: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    ssm_state: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    dt_limit: tuple[float, float],
    norm_weight: torch.Tensor,
    norm_eps: float,
    out_weight: torch.Tensor,
    out_scale: float | None,
    residual: torch.Tensor,
    entry_norm_weight: torch.Tensor,
    entry_eps: float,
    residual_dtype: torch.dtype,
) -> EntryParts:
    """Mamba-2's decode token from in_proj's output to the next block's entry: the step with its
    gated norm deferred (mamba2_decode_step, defer_norm), out_proj with that norm's 1/rms and
    `out_scale` after its product, and the next block's entry from out_proj's output
    (ops.norm.linear_into_entry) as one op, so that a kernel can stream out_proj's weight while the
    step waits on in_proj. One norm group (g = 1 on this rank, not spanning ranks): its 1/rms is one
    factor per row. xbc, z, dt as mamba2_decode_step's ([b, ...]); residual [b, ..., hidden], whose
    leading shape the returned parts take."""
    y, rstd = mamba2_decode_step(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, dt_limit,
                                 norm_weight, norm_eps, defer_norm=True)
    assert rstd.shape[-1] == 1, "one norm group: its 1/rms is one factor per row"
    lead = residual.shape[:-1]
    return linear_into_entry(y.view(*lead, y.shape[-1]), out_weight, rstd.view(lead), residual, entry_norm_weight,
                             entry_eps, residual_dtype, out_scale)


def mamba1_decode_step(
    state: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    norm_eps: float | None = None,
    dt_in: torch.Tensor | None = None,
    dt_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba-1's state update for one token with Falcon-Mamba's weightless RMS norms folded in.

    As `selective_state_update` (state [b, d, n] advanced in place; u, dt, z [b, d]; B, C [b, n]).
    With norm_eps, B and C are RMS-normalised first, and when dt_in (dt_proj's input [b, R]) is
    given, dt is dt_proj(dt_in) of the *raw* dt_in, scaled here by dt_in's inverse RMS: the norm has
    no weight, so it is a per-row scale that commutes with dt_proj (whose bias is dt_bias, added
    after). That leaves no norm kernel between x_proj and out_proj.
    With dt_weight [d, R] (dt_proj's weight), dt is dt_proj's input [b, R] and dt_proj runs here
    (its output rounded to dt's dtype, as the unfused projection's): no projection kernel either.
    """
    if dt_weight is not None:
        dt = linear(dt, dt_weight)
    if norm_eps is not None:
        B, C = rms_norm(B, None, norm_eps), rms_norm(C, None, norm_eps)
        if dt_in is not None:
            dt_in = dt_in.float()
            dt = dt.float() * torch.rsqrt(dt_in.pow(2).mean(-1, keepdim=True) + norm_eps)
    return selective_state_update(state, u, dt, A, B, C, D, z, dt_bias)
