"""The MLP of the hybrids: column-parallel up projection, activation, row-parallel down projection.

Two kinds: squared ReLU on `up_proj` (Nemotron-H) and gated SiLU, `up * silu(gate)`, whose gate and
up rows are packed per rank as [gate_r | up_r] in `gate_up_proj` (Falcon-H1, with its muP gate and
down multipliers). Stateless: its whole input is the current token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import GEGLU, RELU2, SWIGLU, ConfigError, SSMConfig
from ..ops.linear import scale_output
from ..parallel import TPContext
from .layers import AllReduceFn, ColumnParallelLinear, Mixer, OutputFactors, PendingOutput, RowParallelLinear


class MLP(Mixer):
    def __init__(self, cfg: SSMConfig, tp: TPContext, mp_config, *, dtype: torch.dtype, device: torch.device,
                 allreduce: AllReduceFn | None = None):
        super().__init__()
        if cfg.mlp_kind not in (RELU2, SWIGLU, GEGLU):
            raise ConfigError(f"MLP kind {cfg.mlp_kind!r} is not supported ({RELU2}, {SWIGLU} or {GEGLU})")
        cfg.validate(tp.size)
        self.kind = cfg.mlp_kind
        self.width = cfg.mlp_intermediate_size // tp.size
        I = cfg.mlp_intermediate_size
        if self.kind in (SWIGLU, GEGLU):
            self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, 2 * I, config=mp_config, bias=cfg.mlp_bias)
        else:
            self.up_proj = ColumnParallelLinear(cfg.hidden_size, I, config=mp_config, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(I, cfg.hidden_size, config=mp_config, bias=cfg.mlp_bias, tp=tp,
                                           allreduce=allreduce)
        # Falcon-H1's multiplier on the gate goes into gate_up_proj as a factor per output row (its
        # kernel's epilogue at decode); the one on the output into down_proj.
        gated = self.kind in (SWIGLU, GEGLU)
        gate = cfg.multiplier("mlp_gate") if gated else 1.0
        self.gate_up_factors = OutputFactors((self.width, self.width), (gate, 1.0), device)
        self.down_scale = cfg.multiplier("mlp_down")

    def start(self, hidden: torch.Tensor, gate_up_delta: torch.Tensor | None = None) -> PendingOutput:
        """gate_up_delta: a per-use adapter's addition to this rank's [gate_r | up_r] rows (Zamba2)."""
        if self.kind in (SWIGLU, GEGLU):
            scale = self.gate_up_factors.scale
            gate_up = self.gate_up_proj(hidden, scale=scale)
            if gate_up_delta is not None:
                gate_up = gate_up + scale_output(gate_up_delta, scale)
            gate, up = gate_up.split(self.width, dim=-1)
            y = up * (F.silu(gate) if self.kind == SWIGLU else F.gelu(gate))
        else:
            y = torch.square(F.relu(self.up_proj(hidden)))
        return self.down_proj.start(y, self.down_scale)
