"""Zamba's Mamba-1 mixer with several "mamba heads", split by channel across the TP group.

HF's `ZambaMambaMixer` is Mamba-1 whose I = expand*hidden channels are cut into `n_mamba_heads`
heads of I/n_heads channels; each head has its own x_proj ([R+2N, head_dim] -> its own dt, B, C)
and its own dt_proj ([head_dim, R]), and runs its own selective scan. in_proj's 2I rows interleave
x and gate per channel ([x0, z0, x1, z1, ...]); the checkpoint converter hands rank r its channels'
rows as [x_r | z_r], like plain Mamba-1 (`checkpoint/partition.py`, `deinterleave`).

Rank r holds channels [r*I/tp, (r+1)*I/tp), and with them every per-channel tensor (conv1d, dt_proj
rows, dt bias, A, D) cut by channel. How x_proj is reduced depends on how heads meet ranks:
- tp divides n_heads: each rank holds whole heads; x_proj is local (no collective at all, unlike
  plain Mamba-1, whose single "head" spans every rank).
- n_heads divides tp: a head spans tp/n_heads ranks, each holding part of its channels; the
  partial x_proj sums are written into their head's slot of a [tokens, n_heads, R+2N] buffer and one
  all-reduce over the TP group adds them up (the slot of a head no rank of another head touches
  stays zero), so every rank reads its head's full dt, B, C back.
The rank's local heads ("pieces": whole heads, or one part of a head) are scanned one at a time
with the Mamba-1 ops (`ops/dispatch.py`); per-sequence states are [channels, K-1] and
[channels, N], channels in the rank's order, so a piece's state is a slice of rows.
"""
from __future__ import annotations

import torch

from ..ops.dispatch import selective_scan, selective_state_update
from ..parallel import TPContext
from .layers import (AllReduceFn, CausalConv1d, ColumnParallelLinear, Mixer, PendingOutput, RowParallelLinear,
                     decay_rates, local_param)


def head_pieces(n_heads: int, tp_size: int) -> int:
    """How many head pieces each rank holds: n_heads/tp whole heads, or 1 part of one head."""
    if n_heads % tp_size == 0:
        return n_heads // tp_size
    if tp_size % n_heads == 0:
        return 1
    raise ValueError(f"TP degree {tp_size} and n_mamba_heads {n_heads}: one must divide the other")


class ZambaMambaMixer(Mixer):
    def __init__(self, cfg, tp: TPContext, mp_config, *, dtype: torch.dtype, device: torch.device,
                 allreduce: AllReduceFn | None = None):
        """cfg: hidden_size, intermediate_size, state_size, conv_kernel, use_bias, use_conv_bias,
        time_step_rank and num_heads (HF's n_mamba_heads)."""
        super().__init__()
        self.cfg, self.tp = cfg, tp
        I, R, N = cfg.intermediate_size, cfg.time_step_rank, cfg.state_size
        if I % tp.size or I % cfg.num_heads:
            raise ValueError(f"intermediate_size {I} must split over TP {tp.size} and {cfg.num_heads} mamba heads")
        self.channels = d = I // tp.size
        self.pieces = head_pieces(cfg.num_heads, tp.size)
        self.piece_width = d // self.pieces
        # The head whose part this rank holds, when heads span ranks (else None: heads are local).
        self.spanned_head = None if cfg.num_heads % tp.size == 0 else tp.rank // (tp.size // cfg.num_heads)
        kw = dict(dtype=dtype, device=device)
        self.in_proj = ColumnParallelLinear(cfg.hidden_size, 2 * I, config=mp_config, bias=cfg.use_bias)
        self.conv1d = CausalConv1d(d, cfg.conv_kernel, cfg.use_conv_bias, **kw)
        self.x_proj_weight = local_param(self.pieces, R + 2 * N, self.piece_width, **kw)
        self.dt_proj_weight = local_param(self.pieces, self.piece_width, R, **kw)
        self.dt_proj_bias = local_param(self.pieces, self.piece_width, **kw)
        self.A_log = local_param(self.pieces, self.piece_width, N, **kw)
        self.D = local_param(self.pieces, self.piece_width, **kw)
        self.out_proj = RowParallelLinear(I, cfg.hidden_size, config=mp_config, bias=cfg.use_bias, tp=tp,
                                          allreduce=allreduce)
        self.allreduce = self.out_proj.allreduce

    def state_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per-sequence (conv state, SSM state) shapes on this rank."""
        return (self.channels, self.cfg.conv_kernel - 1), (self.channels, self.cfg.state_size)

    def _ssm_parameters(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, L, d] -> each piece's (dt, B, C) projections [b, L, pieces, R+2N], summed over the
        ranks that share a head when heads span ranks."""
        b, L, _ = x.shape
        partial = torch.einsum("blpw,pkw->blpk", x.view(b, L, self.pieces, self.piece_width), self.x_proj_weight)
        if self.spanned_head is None:
            return partial
        slots = partial.new_zeros(b, L, self.cfg.num_heads, partial.shape[-1])
        slots[:, :, self.spanned_head] = partial[:, :, 0]
        slots = self.allreduce(slots, self.tp.group)
        return slots[:, :, self.spanned_head:self.spanned_head + 1]

    def start(self, hidden: torch.Tensor, conv_state: torch.Tensor | None = None,
              ssm_state: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
              cp=None) -> PendingOutput:
        """As Mamba1Mixer.start; cu_seqlens: packed sequences (ops/varlen.py), each from a zero state.
        No context-parallel path (the model says so: MambaLM.supports_context_parallel)."""
        if cp is not None:
            raise NotImplementedError("Zamba's Mamba layers have no context-parallel prefill")
        cfg = self.cfg
        b, L, _ = hidden.shape
        P, W, N = self.pieces, self.piece_width, cfg.state_size
        x, z = self.in_proj(hidden).split(self.channels, dim=-1)
        x = self.conv1d(x, conv_state, cu_seqlens)
        dt, B, C = self._ssm_parameters(x).split([cfg.time_step_rank, N, N], dim=-1)
        dt = torch.einsum("blpr,pwr->blpw", dt, self.dt_proj_weight)  # the bias is added in fp32 in the scan
        A = decay_rates(self)  # [P, W, N]
        x, z = x.view(b, L, P, W), z.view(b, L, P, W)
        step = ssm_state is not None and L == 1 and cu_seqlens is None
        ys = []
        for p in range(P):
            rows = slice(p * W, (p + 1) * W)
            state = None if ssm_state is None else ssm_state[:, rows]
            args = (x[..., p, :], dt[..., p, :], A[p], B[..., p, :], C[..., p, :], self.D[p], z[..., p, :])
            if step:
                y = selective_state_update(state, *(t[:, 0] if t.dim() == 3 else t for t in args),
                                           dt_bias=self.dt_proj_bias[p]).unsqueeze(1)
            else:
                y, final = selective_scan(*args, dt_bias=self.dt_proj_bias[p],
                                          initial_state=None if cu_seqlens is not None else state,
                                          cu_seqlens=cu_seqlens)
                if state is not None:
                    state.copy_(final)
            ys.append(y)
        y = ys[0] if P == 1 else torch.cat(ys, dim=-1)
        return self.out_proj.start(y)
