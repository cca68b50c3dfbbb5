"""Mamba-2 mixer, split by heads across the TP group.

HF packs in_proj as [z | x | B | C | dt] over all heads; a contiguous split of that would hand rank 0
all of z. Each rank instead holds its own packed rows [z_r | x_r | B_r | C_r | dt_r] (the checkpoint
converter lays them out so), and conv1d covers [x_r | B_r | C_r].

B and C belong to groups of heads. When tp divides n_groups each rank holds whole groups and the
gated norm is local. When n_groups divides tp (n_groups = 1 in most published checkpoints) each rank
holds the one group its heads belong to, replicated on tp/n_groups ranks; a norm group then spans
those ranks, so its sum of squares is all-reduced (one tiny collective of [tokens, n_groups]).

Falcon-H1 runs the same mixer with muP multipliers (its input scaled by ssm_in, each in_proj segment
[z, x, B, C, dt] by its own factor) and, in some sizes, without the gated norm (y * silu(z)).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm import ExactAllReduce
from ..config import SSMConfig
from ..ops.dispatch import (defer_norm, fused_decode, gated_rms_norm, mamba2_decode_step, mamba2_fused_rows,
                            mamba2_step_into_entry, ssd_chunk_scan, ssd_state_update, step_into_exit)
from ..parallel import TPContext
from .context_parallel import ContextParallelSpans
from .layers import (AllReduceFn, CausalConv1d, ColumnParallelLinear, LazyInput, Mixer, OutputFactors, PendingOutput,
                     RowParallelLinear, all_reduce_with_grad, decay_rates, differentiable, fold_input_scale,
                     local_param, project_entry)


def local_groups(cfg: SSMConfig, tp_size: int) -> int:
    """B/C groups held by each rank: n_groups/tp when split, 1 when replicated."""
    return cfg.n_groups // tp_size if cfg.n_groups % tp_size == 0 else 1


class Mamba2Mixer(Mixer):
    def __init__(self, cfg: SSMConfig, tp: TPContext, mp_config, *, dtype: torch.dtype, device: torch.device,
                 allreduce: AllReduceFn | None = None, small_allreduce: AllReduceFn | None = None):
        """allreduce: out_proj's (maybe lossy); small_allreduce: the exact one for the gated norm's
        sum of squares when a group spans ranks (default NCCL/gloo)."""
        super().__init__()
        cfg.validate(tp.size)
        self.cfg, self.tp = cfg, tp
        self.heads = cfg.num_heads // tp.size
        self.channels = self.heads * cfg.head_dim
        self.groups = local_groups(cfg, tp.size)
        self.bc_width = self.groups * cfg.state_size
        self.conv_channels = self.channels + 2 * self.bc_width
        # Only when a norm group spans ranks: which global group this rank's heads belong to.
        self.shared_group = None if cfg.n_groups % tp.size == 0 else tp.rank // (tp.size // cfg.n_groups)
        kw = dict(dtype=dtype, device=device)
        local_rows = 2 * self.channels + 2 * self.bc_width + self.heads
        self.in_proj = ColumnParallelLinear(cfg.hidden_size, tp.size * local_rows, config=mp_config,
                                            bias=cfg.use_bias)
        self.conv1d = CausalConv1d(self.conv_channels, cfg.conv_kernel, cfg.use_conv_bias, **kw)
        self.dt_bias = local_param(self.heads, **kw)
        self.A_log = local_param(self.heads, **kw)
        self.D = local_param(self.heads, **kw)
        if cfg.mamba_norm == "gated":
            self.norm = nn.Module()
            self.norm.weight = local_param(self.channels, **kw)
        else:
            self.norm = None
        self.out_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, config=mp_config,
                                          bias=cfg.out_proj_bias, tp=tp, allreduce=allreduce)
        self.small_allreduce = small_allreduce or ExactAllReduce()
        # Falcon-H1's multipliers: on the input (ssm_in), per segment of in_proj's output, and on the
        # output (ssm_out). Without a bias the input's is in_proj's output's, so both go into the
        # projection (its kernel's epilogue at decode) as one factor per output row.
        self.hidden_scale, folded = fold_input_scale(cfg.multiplier("ssm_in"), cfg.use_bias)
        widths = (self.channels, self.channels, self.bc_width, self.bc_width, self.heads)
        segments = cfg.ssm_multipliers or (1.0,) * len(widths)
        self.in_proj_factors = OutputFactors(widths, [m * folded for m in segments], device)
        self.output_scale = cfg.multiplier("ssm_out")

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence (conv state, SSM state) shapes on this rank."""
        return (self.conv_channels, self.cfg.conv_kernel - 1), (self.heads, self.cfg.head_dim, self.cfg.state_size)

    def _group_sum_of_squares(self, local: torch.Tensor) -> torch.Tensor:
        """Sum of squares over a norm group spread across ranks: each rank writes its partial sum in
        its group's column, one all-reduce adds the columns up, each rank reads its own back."""
        # Columns padded to a multiple of 4 fp32 (16 bytes), which the one-shot kernel needs.
        slots = local.new_zeros(*local.shape[:-1], -(-self.cfg.n_groups // 4) * 4)
        slots[..., self.shared_group] = local[..., 0]
        if differentiable(self.A_log):  # training: every rank's part of the gradient counts
            slots = all_reduce_with_grad(slots, self.tp.group)
        else:
            slots = self.small_allreduce(slots, self.tp.group)
        return slots[..., self.shared_group:self.shared_group + 1]

    def project_entry(self, stream, delta, norm, residual_dtype):
        if self.hidden_scale != 1.0:  # a multiplier on in_proj's input that its bias keeps there
            return None
        return project_entry(stream, delta, norm, residual_dtype, self.in_proj.weight, self.in_proj.bias,
                             self.in_proj_factors.scale)

    def start(self, hidden: torch.Tensor | None, conv_state: torch.Tensor | None = None,
              ssm_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              cp: ContextParallelSpans | None = None, projected: torch.Tensor | None = None) -> PendingOutput:
        """cp: this forward's tokens are one span of a range split over the CP group (see
        model/context_parallel.py); the states then hold the context before the whole range.
        projected: in_proj's output, from project_entry (hidden is then None)."""
        cfg = self.cfg
        zxbcdt = projected
        if zxbcdt is None:
            if self.hidden_scale != 1.0:
                hidden = hidden * self.hidden_scale
            zxbcdt = self.in_proj(hidden, scale=self.in_proj_factors.scale)
        b, L, _ = zxbcdt.shape
        z, xbc, dt = zxbcdt.split([self.channels, self.conv_channels, self.heads], dim=-1)
        if (L == 1 and conv_state is not None and ssm_state is not None and cu_seqlens is None and cp is None
                and fused_decode("mamba2") and b <= mamba2_fused_rows()):
            args = (xbc[:, 0], z[:, 0], dt[:, 0], conv_state, ssm_state)
            if step_into_exit() and b == 1 and self._deferred_norm():
                return self.out_proj.start(self._lazy_step(*args), self.output_scale)
            y, row_scale = self._decode_step(*args)
            return self.out_proj.start(y.unsqueeze(1), self.output_scale, row_scale)
        xbc = self.conv1d(xbc, conv_state, cu_seqlens) if cp is None else cp.conv(self.conv1d, xbc, conv_state)
        x, B, C = xbc.split([self.channels, self.bc_width, self.bc_width], dim=-1)
        x = x.reshape(b, L, self.heads, cfg.head_dim)
        B = B.reshape(b, L, self.groups, cfg.state_size)
        C = C.reshape(b, L, self.groups, cfg.state_size)
        A = decay_rates(self)
        if ssm_state is not None and L == 1 and cu_seqlens is None and cp is None:
            y = ssd_state_update(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, self.dt_bias,
                                 cfg.time_step_limit).unsqueeze(1)
        else:
            # Under CP only the first span starts from the real state; the others from zero, joined below.
            y, final = ssd_chunk_scan(x, dt, A, B, C, cfg.chunk_size, self.D, self.dt_bias,
                                      initial_state=None if cu_seqlens is not None or (cp is not None and not cp.is_first)
                                      else ssm_state, dt_limit=cfg.time_step_limit, cu_seqlens=cu_seqlens)
            if cp is not None:
                y = cp.join_ssd(y, final, dt, A, C, self.dt_bias, cfg.time_step_limit, ssm_state)
            elif ssm_state is not None:
                ssm_state.copy_(final)
        y = y.reshape(b, L, self.channels)
        if self.norm is None:
            y = y * F.silu(z)
        else:
            y = gated_rms_norm(y, z, self.norm.weight, cfg.norm_eps, group_size=cfg.intermediate_size // cfg.n_groups,
                               reduce_sum_of_squares=None if self.shared_group is None else self._group_sum_of_squares)
        return self.out_proj.start(y, self.output_scale)

    def _deferred_norm(self) -> bool:
        """Whether the decode step leaves its gated norm's 1/rms to out_proj: one norm group on this rank."""
        return self.norm is not None and self.groups == 1 and defer_norm()

    def _lazy_step(self, xbc, z, dt, conv_state, ssm_state) -> LazyInput:
        """The one-row decode step left for out_proj's consumer: alone (_decode_step) for any
        consumer, or with out_proj and the next block's entry in one launch for an entry (a local
        norm group: its 1/rms is one factor per row)."""
        cfg = self.cfg

        def into_entry(weight, scale, stream, norm, residual_dtype):
            return mamba2_step_into_entry(
                xbc, z, dt, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, ssm_state, decay_rates(self),
                self.D, self.dt_bias, cfg.time_step_limit, self.norm.weight, cfg.norm_eps, weight, scale, stream,
                norm.weight, norm.eps, residual_dtype)

        def materialize():
            y, row_scale = self._decode_step(xbc, z, dt, conv_state, ssm_state)
            return y.unsqueeze(1), row_scale

        return LazyInput(xbc.shape[0], materialize, into_entry)

    def _decode_step(self, xbc, z, dt, conv_state, ssm_state):
        """One token from in_proj's output to out_proj's input in one op (conv, state update and the
        gated norm), and the factor per row ([b, 1], or None) that out_proj applies after its product:
        the norm's 1/rms where this rank's channels are one norm group (whole or spanning ranks, its
        sum of squares then all-reduced), so that nothing walks the whole group in between."""
        cfg = self.cfg
        group_size = cfg.intermediate_size // cfg.n_groups
        state = (dt, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, ssm_state, decay_rates(self), self.D,
                 self.dt_bias, cfg.time_step_limit)
        if self._deferred_norm():
            return mamba2_decode_step(
                xbc, z, *state, self.norm.weight, cfg.norm_eps, defer_norm=True, group_size=group_size,
                reduce_sum_of_squares=None if self.shared_group is None else self._group_sum_of_squares)
        local_norm = self.norm is not None and self.shared_group is None
        y = mamba2_decode_step(xbc, z if self.norm is None or local_norm else None, *state,
                               self.norm.weight if local_norm else None, cfg.norm_eps)
        if self.norm is not None and not local_norm:
            y = gated_rms_norm(y, z, self.norm.weight, cfg.norm_eps, group_size=group_size,
                               reduce_sum_of_squares=self._group_sum_of_squares)
        return y, None
