"""The pre-norm residual blocks a model's pattern is built from, one class per pattern letter.

Every block has the same surface, which is all the model and the engine use:

- `start(stream, delta, state, cu_seqlens=None, cp=None) -> (stream, pending)`: stream + delta is
  the block's input (delta None: the stream alone). The previous block's output is added to the
  stream inside this block's norm kernel, so the stream is read and written once per block.
  `pending.wait()` gives this block's output, whose all-reduce may still be in flight (prefill
  overlaps it). cu_seqlens: the stream packs several sequences end to end (ops/varlen.py); only
  kinds with `packs = True` take it (every kind here; a model with a kind that does not is never
  packed by the engine).
  cp: a ContextParallelSpans, the stream is this rank's span of a range split over the
  context-parallel group (context_parallel.py).
- `state_shapes(max_length)`: the per-sequence state on this rank, name -> (shape, dtype; None
  for the model's dtype). The names are LayerState's fields; an empty dict means stateless.

Parameter names: `norm.weight` and `mixer.*` for every kind (so pure-Mamba checkpoints keep their
names); the parallel block's attention is `attention.*`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from ..config import SSMConfig
from ..ops.dispatch import add_rms_norm
from .layers import DeferredOutput, PendingOutput, RMSNorm, SummedOutput

StateShapes = dict[str, tuple[tuple[int, ...], "torch.dtype | None"]]


@dataclass
class LayerState:
    """One block's context for a batch of sequences; fields a block kind does not use are None.

    Mamba: conv inputs [b, conv channels, K-1] and SSM state (fp32). Attention: keys and values
    [b, T, kv heads, head_dim] (T: the capacity, or the prefix of it a step may touch) and the
    number of positions filled per sequence, `length` [b]."""

    conv: torch.Tensor | None = None
    ssm: torch.Tensor | None = None
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    length: torch.Tensor | None = None
    # Host-side promise that every row's `length` is this many positions (the engine knows it for a
    # prefill group): attention then runs causal flash-able kernels instead of a full mask.
    filled: int | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def upto(self, positions: int | None, filled: int | None = None) -> "LayerState":
        """The same state with keys/values cut to their first `positions` (views: writes land in
        self). A step only reads and writes positions below the longest sequence's new length."""
        if self.k is None or positions is None:
            return self
        return LayerState(self.conv, self.ssm, self.k[:, :positions], self.v[:, :positions], self.length, filled)


class Block(nn.Module):
    kind = "?"
    packs = False  # takes packed sequences (cu_seqlens)
    uses_embeddings = False  # start() also takes the token embeddings (Zamba's S)

    def __init__(self, cfg: SSMConfig, *, dtype, device):
        super().__init__()
        self.residual_dtype = torch.float32 if cfg.residual_in_fp32 else dtype
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, device=device)

    def enter(self, stream: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed input, updated stream)."""
        if isinstance(delta, DeferredOutput):
            delta = delta.wait()
        return add_rms_norm(stream, delta, self.norm.weight, self.norm.eps, self.residual_dtype)

    def state_shapes(self, max_length: int = 0) -> StateShapes:
        return {}


def _mamba_shapes(mixer) -> StateShapes:
    conv, ssm = mixer.state_shapes()
    return {"conv": (conv, None), "ssm": (ssm, torch.float32)}


class MambaBlock(Block):
    """`M`: a Mamba-1 or Mamba-2 mixer."""

    kind = "M"
    packs = True  # conv1d and the scans restart at each packed sequence

    def __init__(self, cfg: SSMConfig, mixer: nn.Module, *, dtype, device):
        super().__init__(cfg, dtype=dtype, device=device)
        self.mixer = mixer

    def start(self, stream, delta, state: LayerState | None, cu_seqlens=None,
              cp=None) -> tuple[torch.Tensor, PendingOutput]:
        conv, ssm = (state.conv, state.ssm) if state is not None else (None, None)
        # One op for the entry and in_proj where the mixer takes it: one launch up to dispatch's entry_rows()
        entry = self.mixer.project_entry(stream, delta, self.norm, self.residual_dtype)
        if entry is not None:
            projected, stream = entry
            return stream, self.mixer.start(None, conv, ssm, cu_seqlens, cp=cp, projected=projected)
        normed, stream = self.enter(stream, delta)
        return stream, self.mixer.start(normed, conv, ssm, cu_seqlens, cp=cp)

    def state_shapes(self, max_length: int = 0) -> StateShapes:
        return _mamba_shapes(self.mixer)


class AttentionBlock(Block):
    """`*`: causal self-attention over the sequence's KV cache."""

    kind = "*"
    packs = True  # each packed sequence attends within itself, from position 0

    def __init__(self, cfg: SSMConfig, mixer: nn.Module, *, dtype, device):
        super().__init__(cfg, dtype=dtype, device=device)
        self.mixer = mixer

    def start(self, stream, delta, state: LayerState | None, cu_seqlens=None, cp=None):
        normed, stream = self.enter(stream, delta)
        return stream, self.mixer.start(normed, state, cp=cp, cu_seqlens=cu_seqlens)

    def state_shapes(self, max_length: int = 0) -> StateShapes:
        return self.mixer.state_shapes(max_length)


class MLPBlock(Block):
    """`-`: a stateless MLP."""

    kind = "-"
    packs = True  # position-wise

    def __init__(self, cfg: SSMConfig, mixer: nn.Module, *, dtype, device):
        super().__init__(cfg, dtype=dtype, device=device)
        self.mixer = mixer

    def start(self, stream, delta, state: LayerState | None = None, cu_seqlens=None, cp=None):
        normed, stream = self.enter(stream, delta)  # per token: packed or a CP span runs as it is
        return stream, self.mixer.start(normed)


class ParallelBlock(Block):
    """`P`: a Mamba-2 mixer and attention side by side on one norm's output; the block's output is
    ssm_out * mixer + attention_out * attention (Falcon-H1). Two all-reduces, both in flight
    together."""

    kind = "P"
    packs = True

    def __init__(self, cfg: SSMConfig, mixer: nn.Module, attention: nn.Module, *, dtype, device):
        super().__init__(cfg, dtype=dtype, device=device)
        self.mixer = mixer
        self.attention = attention
        self.attention_scale = cfg.multiplier("attention_out")  # (the mixer applies ssm_out itself)

    def start(self, stream, delta, state: LayerState | None, cu_seqlens=None, cp=None):
        normed, stream = self.enter(stream, delta)
        conv, ssm = (state.conv, state.ssm) if state is not None else (None, None)
        mixed = self.mixer.start(normed, conv, ssm, cu_seqlens, cp=cp)
        attended = self.attention.start(normed, state, self.attention_scale, cp=cp, cu_seqlens=cu_seqlens)
        return stream, SummedOutput(mixed, attended)

    def state_shapes(self, max_length: int = 0) -> StateShapes:
        return {**_mamba_shapes(self.mixer), **self.attention.state_shapes(max_length)}
