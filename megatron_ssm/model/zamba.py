"""Zamba's shared transformer blocks and the `S` block that applies one before its Mamba layer.

A shared block (`SharedTransformer`) is attention + MLP whose weights the model holds once
(`MambaLM.shared_blocks`); every `S` position applies one of them with weights of its own around it
(`SharedApplication`): the output linear back to hidden and, for Zamba2, LoRA adapters on q/k/v and
on the MLP's gate/up rows. Per position j (docs/hybrids.md):

    t   = linear_j(mlp(pre_ff_norm(attention(input_norm([h, e])))))     no residual inside
    out = h + mamba_j(norm(h + t))

so the shared block feeds the Mamba layer's norm input only, never the residual stream. e is the
token embedding, which the model passes to the blocks that ask for it (`uses_embeddings`).

TP: the attention and MLP are the core's (heads split, MLP columns split, o_proj and down_proj
row-parallel). An adapter's down projection ([rank, in]) is replicated, its up projection is cut
like the rows it adds to (q/k/v rows by head, [gate | up] per rank), so the adapter output adds
to this rank's projection slice. linear_j is replicated: it reads the MLP's reduced output, and a
split would cost a third collective per application.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import SSMConfig
from ..ops.dispatch import add_rms_norm, rms_norm
from ..parallel import TPContext
from .attention import Attention
from .blocks import Block, LayerState, StateShapes, _mamba_shapes
from .layers import AllReduceFn, ColumnParallelLinear, PendingOutput, RMSNorm, local_param
from .mlp import MLP


class SharedTransformer(nn.Module):
    """One shared attention + MLP block; held once, applied at several positions."""

    def __init__(self, cfg: SSMConfig, tp: TPContext, mp_config, *, dtype, device, allreduce: AllReduceFn | None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.input_layernorm = RMSNorm(cfg.attention_input_size, cfg.norm_eps, **kw)
        self.attention = Attention(cfg, tp, mp_config, allreduce=allreduce, **kw)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.mlp = MLP(cfg, tp, mp_config, allreduce=allreduce, **kw)


class Adapter(nn.Module):
    """x -> up(down(x)): HF's Sequential(Linear(in, rank), Linear(rank, out)), names `0` and `1`
    kept; the up projection is column-parallel (this rank's rows of `out`)."""

    def __init__(self, in_size: int, rank: int, out_size: int, mp_config, *, dtype, device):
        super().__init__()
        self.add_module("0", nn.Module())
        self.get_submodule("0").weight = local_param(rank, in_size, dtype=dtype, device=device)
        self.add_module("1", ColumnParallelLinear(rank, out_size, config=mp_config, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_submodule("1")(F.linear(x, self.get_submodule("0").weight))


class SharedApplication(nn.Module):
    """What one position adds to a shared block: its output linear and its adapters."""

    def __init__(self, cfg: SSMConfig, tp: TPContext, mp_config, *, dtype, device):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        H, A = cfg.hidden_size, cfg.attention_input_size
        self.linear = nn.Module()
        self.linear.weight = local_param(H, H, **kw)
        r = cfg.adapter_rank
        if cfg.attention_adapters:
            d = cfg.attention_head_dim
            self.q_adapter = Adapter(A, r, cfg.num_attention_heads * d, mp_config, **kw)
            self.k_adapter = Adapter(A, r, cfg.num_kv_heads * d, mp_config, **kw)
            self.v_adapter = Adapter(A, r, cfg.num_kv_heads * d, mp_config, **kw)
        if r:  # Zamba2 (transformers 5.24) always has the MLP adapters
            self.mlp_adapter = Adapter(H, r, 2 * cfg.mlp_intermediate_size, mp_config, **kw)

    def qkv_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the adapters add to this rank's [q_r | k_r | v_r] projection rows."""
        if not hasattr(self, "q_adapter"):
            return None
        return torch.cat([self.q_adapter(x), self.k_adapter(x), self.v_adapter(x)], dim=-1)

    def gate_up_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.mlp_adapter(x) if hasattr(self, "mlp_adapter") else None


class SharedHybridBlock(Block):
    """`S`: one application of a shared block, then a Mamba layer (whose `norm` is HF's
    mamba_decoder.input_layernorm). State: the attention's keys/values at this position plus the
    Mamba layer's conv and SSM states."""

    kind = "S"
    uses_embeddings = True
    packs = True  # the shared attention within each packed sequence, the Mamba layer restarting at each

    def __init__(self, cfg: SSMConfig, mixer: nn.Module, application: SharedApplication,
                 shared: SharedTransformer, *, dtype, device):
        super().__init__(cfg, dtype=dtype, device=device)
        self.mixer = mixer
        self.application = application
        self._shared = [shared]  # a reference, not a submodule: the model holds the weights once

    @property
    def shared(self) -> SharedTransformer:
        return self._shared[0]

    def transformer(self, hidden: torch.Tensor, embeddings: torch.Tensor, state: LayerState | None,
                    cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """t = linear_j(shared block at this position): what this position adds to the Mamba norm's input."""
        shared, app = self.shared, self.application
        x = torch.cat([hidden.to(embeddings.dtype), embeddings], dim=-1)
        x = rms_norm(x, shared.input_layernorm.weight, shared.input_layernorm.eps)
        a = shared.attention.start(x, state, qkv_delta=app.qkv_delta(x), cu_seqlens=cu_seqlens).wait()
        n = rms_norm(a, shared.pre_ff_layernorm.weight, shared.pre_ff_layernorm.eps)
        f = shared.mlp.start(n, gate_up_delta=app.gate_up_delta(n)).wait()
        return F.linear(f, app.linear.weight)

    def start(self, stream, delta, state: LayerState | None, cu_seqlens=None, cp=None, *,
              embeddings: torch.Tensor) -> tuple[torch.Tensor, PendingOutput]:
        if cp is not None:
            raise NotImplementedError("context-parallel prefill does not cover Zamba's shared blocks yet")
        if delta is not None:
            stream = (stream.to(self.residual_dtype) + delta.to(self.residual_dtype))
        t = self.transformer(stream, embeddings, state, cu_seqlens)
        normed, _ = add_rms_norm(stream, t, self.norm.weight, self.norm.eps, self.residual_dtype)
        conv, ssm = (state.conv, state.ssm) if state is not None else (None, None)
        return stream, self.mixer.start(normed, conv, ssm, cu_seqlens)

    def state_shapes(self, max_length: int = 0) -> StateShapes:
        return {**_mamba_shapes(self.mixer), **self.shared.attention.state_shapes(max_length)}
