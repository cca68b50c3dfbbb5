"""The language model: vocab-parallel embedding, Mamba blocks, final norm, vocab-parallel head.

Parameter names follow HF's (`backbone.` dropped), so a checkpoint shard is HF's tensor cut by the
rules in `checkpoint/partition.py`. The forward returns this rank's slice of the logits: sampling
works on slices (see inference/sampling.py) and gathers the full vocabulary only when it must.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from ..config import SSMConfig
from ..parallel import TPContext, megatron_config
from .layers import AllReduceFn, ColumnParallelLinear, PendingOutput, RMSNorm, VocabParallelEmbedding
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer


@dataclass
class LayerState:
    """One layer's recurrent context for a batch of sequences: conv inputs and SSM state."""

    conv: torch.Tensor  # [b, conv channels, K-1]
    ssm: torch.Tensor  # [b, channels, n] (Mamba-1) or [b, heads, head_dim, n] (Mamba-2), fp32


class MambaBlock(nn.Module):
    def __init__(self, cfg: SSMConfig, mixer: nn.Module, *, dtype, device):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype=dtype, device=device)
        self.mixer = mixer

    def forward(self, hidden: torch.Tensor, state: LayerState | None) -> torch.Tensor:
        return self.start(hidden, state).wait()

    def start(self, hidden: torch.Tensor, state: LayerState | None) -> PendingBlock:
        residual = hidden.float() if self.residual_in_fp32 else hidden
        states = (state.conv, state.ssm) if state is not None else ()
        return PendingBlock(residual, self.mixer.start(self.norm(hidden), *states))


@dataclass
class PendingBlock:
    """A block's output while its mixer's all-reduce is in flight."""

    residual: torch.Tensor
    mixer_out: PendingOutput

    def wait(self) -> torch.Tensor:
        return self.residual + self.mixer_out.wait()


class MambaLM(nn.Module):
    def __init__(self, cfg: SSMConfig, tp: TPContext, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, allreduce: AllReduceFn | None = None,
                 overlap_min_tokens: int = 8192):
        """overlap_min_tokens: from how many tokens per forward (batch x length) a forward with states
        at TP > 1 is cut in two micro-chunks whose all-reduces overlap the other's compute (0: never).
        Below it the reductions are latency-bound and the extra launches cost more than they hide."""
        super().__init__()
        self.overlap_min_tokens = overlap_min_tokens
        cfg.validate(tp.size)
        device = device or tp.device
        self.cfg, self.tp, self.dtype = cfg, tp, dtype
        self.padded_vocab = cfg.padded_vocab_size(tp.size)
        self.vocab_per_rank = self.padded_vocab // tp.size
        self.vocab_start = tp.rank * self.vocab_per_rank
        mp = megatron_config(tp.size, dtype, on_cpu=device.type == "cpu")
        kw = dict(dtype=dtype, device=device)
        mixer_cls = Mamba2Mixer if cfg.is_mamba2 else Mamba1Mixer
        self.embeddings = VocabParallelEmbedding(self.padded_vocab, cfg.hidden_size, config=mp, tp=tp)
        self.layers = nn.ModuleList(
            MambaBlock(cfg, mixer_cls(cfg, tp, mp, allreduce=allreduce, **kw), **kw) for _ in range(cfg.num_layers))
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else \
            ColumnParallelLinear(cfg.hidden_size, self.padded_vocab, config=mp, bias=False)
        self.requires_grad_(False)
        # Rows past the real vocabulary exist only for even sharding: never let them win.
        ids = torch.arange(self.vocab_start, self.vocab_start + self.vocab_per_rank, device=device)
        self.register_buffer("vocab_padding", ids >= cfg.vocab_size, persistent=False)

    def state_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        return [layer.mixer.state_shapes() for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, states: list[LayerState] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """input_ids [b, L] -> this rank's logits [b, L, padded_vocab / tp] in fp32.

        `states` (one per layer, for these b sequences) hold the context before input_ids and are
        advanced in place; None runs the sequences from scratch and keeps nothing. `last_only`
        computes logits for the last position only (prefill needs no others)."""
        hidden = self.embeddings(input_ids)
        parts = self._micro_chunks(input_ids.shape[1]) if states is not None and self._overlaps(input_ids) else []
        if parts:
            hidden = self._overlapped_layers(hidden, states, parts)
        else:
            for i, layer in enumerate(self.layers):
                hidden = layer(hidden, None if states is None else states[i])
        if last_only:
            hidden = hidden[:, -1:]
        hidden = self.norm_f(hidden)
        head = self.embeddings.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden.to(head.dtype), head).float()
        return logits.masked_fill_(self.vocab_padding, float("-inf"))

    def _overlaps(self, input_ids: torch.Tensor) -> bool:
        return (self.tp.size > 1 and 0 < self.overlap_min_tokens <= input_ids.numel()
                and input_ids.shape[1] > 1)

    def _micro_chunks(self, length: int) -> list[int]:
        """Two time spans, the first a whole number of SSD chunks where the length allows, so the
        scan of each half runs on full chunks."""
        unit = self.cfg.chunk_size if self.cfg.is_mamba2 and length >= 2 * self.cfg.chunk_size else 1
        first = -(-length // (2 * unit)) * unit
        return [first, length - first] if 0 < first < length else []

    def _overlapped_layers(self, hidden: torch.Tensor, states: list[LayerState], parts: list[int]) -> torch.Tensor:
        """The layers over consecutive time spans of the batch, interleaved so that each span's
        all-reduce runs while the next span computes: span 1 of layer i continues from the state
        span 0 of layer i left, and span 0 of layer i+1 waits only for its own reduction. The states
        advance as in one pass over the whole length."""
        spans = list(hidden.split(parts, dim=1))
        pending: list[PendingBlock | None] = [None] * len(spans)
        for i, layer in enumerate(self.layers):
            for p in range(len(spans)):
                if pending[p] is not None:
                    spans[p] = pending[p].wait()
                pending[p] = layer.start(spans[p], states[i])
        return torch.cat([p.wait() for p in pending], dim=1)
