"""Mamba-1 / Falcon-Mamba mixer, split by channel across the TP group.

in_proj is column-parallel with its x and z halves split separately, so rank r holds channels
[r*d/tp, (r+1)*d/tp) of both. conv1d, dt_proj, A and D are split by the same channels and stay
local. x_proj reads all channels, so it is row-parallel: its all-reduce gives every rank the full
(dt, B, C). out_proj is row-parallel: the layer's second all-reduce.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..config import FALCON_MAMBA, SSMConfig
from ..ops.dispatch import fold_rows, fused_decode, mamba1_decode_step, rms_norm, selective_scan, selective_state_update
from ..parallel import TPContext
from .context_parallel import ContextParallelSpans
from .layers import (AllReduceFn, CausalConv1d, ColumnParallelLinear, Mixer, PendingOutput, RowParallelLinear,
                     decay_rates, local_param, project, project_entry)


class Mamba1Mixer(Mixer):
    def __init__(self, cfg: SSMConfig, tp: TPContext, mp_config, *, dtype: torch.dtype, device: torch.device,
                 allreduce: AllReduceFn | None = None):
        super().__init__()
        cfg.validate(tp.size)
        self.cfg = cfg
        d = cfg.intermediate_size // tp.size
        self.channels = d
        kw = dict(dtype=dtype, device=device)
        self.in_proj = ColumnParallelLinear(cfg.hidden_size, 2 * cfg.intermediate_size, config=mp_config,
                                            bias=cfg.use_bias)
        self.conv1d = CausalConv1d(d, cfg.conv_kernel, cfg.use_conv_bias, **kw)
        self.x_proj = RowParallelLinear(cfg.intermediate_size, cfg.time_step_rank + 2 * cfg.state_size,
                                        config=mp_config, bias=False, tp=tp, allreduce=allreduce,
                                        replicated_output=False)  # each rank uses (dt, B, C) on its channels
        self.dt_proj = nn.Linear(cfg.time_step_rank, d, bias=True, **kw).requires_grad_(False)
        self.A_log = local_param(d, cfg.state_size, **kw)
        self.D = local_param(d, **kw)
        self.out_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, config=mp_config,
                                          bias=cfg.use_bias, tp=tp, allreduce=allreduce)

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence (conv state, SSM state) shapes on this rank."""
        return (self.channels, self.cfg.conv_kernel - 1), (self.channels, self.cfg.state_size)

    def project_entry(self, stream, delta, norm, residual_dtype):
        return project_entry(stream, delta, norm, residual_dtype, self.in_proj.weight, self.in_proj.bias)

    def start(self, hidden: torch.Tensor | None, conv_state: torch.Tensor | None = None,
              ssm_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              cp: ContextParallelSpans | None = None, projected: torch.Tensor | None = None) -> PendingOutput:
        """cp: this forward's tokens are one span of a range split over the CP group (see
        model/context_parallel.py); the states then hold the context before the whole range.
        projected: in_proj's output, from project_entry (hidden is then None)."""
        cfg = self.cfg
        x, z = (self.in_proj(hidden) if projected is None else projected).split(self.channels, dim=-1)
        decode = ssm_state is not None and x.shape[1] == 1 and cu_seqlens is None and cp is None
        if decode and fused_decode("mamba1"):
            return self.out_proj.start(self._decode_step(x[:, 0], z[:, 0], conv_state, ssm_state).unsqueeze(1))
        x = self.conv1d(x, conv_state, cu_seqlens) if cp is None else cp.conv(self.conv1d, x, conv_state)
        dt, B, C = self.x_proj(x).split([cfg.time_step_rank, cfg.state_size, cfg.state_size], dim=-1)
        if cfg.family == FALCON_MAMBA:
            dt, B, C = (rms_norm(t, None, cfg.mixer_rms_eps) for t in (dt, B, C))
        dt = dt @ self.dt_proj.weight.t()  # the bias is added in fp32 inside the scan
        A = decay_rates(self)
        if decode:
            y = selective_state_update(ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, z[:, 0],
                                       dt_bias=self.dt_proj.bias).unsqueeze(1)
        else:
            # Under CP only the first span starts from the real state; the others from zero, joined below.
            y, final = selective_scan(x, dt, A, B, C, self.D, z, dt_bias=self.dt_proj.bias,
                                      initial_state=None if cu_seqlens is not None or (cp is not None and not cp.is_first)
                                      else ssm_state, cu_seqlens=cu_seqlens)
            if cp is not None:
                y = cp.join_selective_scan(y, final, z, dt, A, C, self.dt_proj.bias, ssm_state)
            elif ssm_state is not None:
                ssm_state.copy_(final)
        return self.out_proj.start(y)

    def _decode_step(self, x: torch.Tensor, z: torch.Tensor, conv_state: torch.Tensor,
                     ssm_state: torch.Tensor) -> torch.Tensor:
        """One token [b, channels] from in_proj's output to out_proj's input: Falcon-Mamba's norms
        inside the state update (the dt norm has no weight, so it is a per-row scale that commutes
        with dt_proj: ops/decode.py), and at few rows dt_proj inside it too."""
        cfg = self.cfg
        x = self.conv1d(x.unsqueeze(1), conv_state)[:, 0]
        dt, B, C = self.x_proj(x).split([cfg.time_step_rank, cfg.state_size, cfg.state_size], dim=-1)
        fold = x.shape[0] <= fold_rows()
        falcon = cfg.family == FALCON_MAMBA
        return mamba1_decode_step(ssm_state, x, dt if fold else project(dt, self.dt_proj.weight), decay_rates(self),
                                  B, C, self.D, z, self.dt_proj.bias, norm_eps=cfg.mixer_rms_eps if falcon else None,
                                  dt_in=dt if falcon else None, dt_weight=self.dt_proj.weight if fold else None)
