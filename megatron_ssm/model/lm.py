"""The language model: vocab-parallel embedding, a stack of blocks, final norm, vocab-parallel head.

The stack is built from the config's pattern (`M` Mamba, `*` attention, `-` MLP, `P` Mamba-2 and
attention in parallel; see blocks.py): a pure Mamba model is `MMMM...`. Parameter names follow HF's
Mamba names (`backbone.` dropped; other families map theirs onto ours in checkpoint/names.py), so a
checkpoint shard is a full tensor cut by the rules in `checkpoint/partition.py`. The forward returns
this rank's slice of the logits: sampling works on slices (see inference/sampling.py) and gathers
the full vocabulary only when it must.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
from ..comm import OneShotAllReduce
from ..config import ATTENTION_BLOCK, MAMBA_BLOCK, MLP_BLOCK, PARALLEL_BLOCK, SHARED_BLOCK, ZAMBA, SSMConfig
from ..ops.dispatch import add_rms_norm
from ..ops.varlen import last_positions, validate_packed
from ..parallel import TPContext, megatron_config
from .attention import Attention
from .blocks import AttentionBlock, LayerState, MambaBlock, MLPBlock, ParallelBlock, StateShapes
from .context_parallel import ContextParallelSpans
from .layers import (AllReduceFn, ColumnParallelLinear, DeferredOutput, PendingOutput, RMSNorm, VocabParallelEmbedding, project,
                     project_entry)
from .mamba1 import Mamba1Mixer
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .zamba import SharedApplication, SharedHybridBlock, SharedTransformer
from .zamba_mamba import ZambaMambaMixer

__all__ = ["LayerState", "MambaBlock", "MambaLM"]


class MambaLM(nn.Module):
    def __init__(self, cfg: SSMConfig, tp: TPContext, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, allreduce: AllReduceFn | None = None,
                 overlap_min_tokens: int = 0):
        """overlap_min_tokens: from how many tokens per forward (batch x length) a forward with states
        at TP > 1 is cut in two micro-chunks whose all-reduces overlap the other's compute (0: never).
        Off by default: on 4 H100s the split doubles the kernel launches of a prefill whose CPU side
        already nearly matches its GPU time, and measured 3% slower at 32 x 1024-token chunks (8% faster
        at 32 x 4096; docs/benchmarks.md). Below ~8192 tokens the reductions are latency-bound."""
        super().__init__()
        self.overlap_min_tokens = overlap_min_tokens
        self.residual_dtype = torch.float32 if cfg.residual_in_fp32 else dtype
        cfg.validate(tp.size)
        device = device or tp.device
        self.cfg, self.tp, self.dtype = cfg, tp, dtype
        self.padded_vocab = cfg.padded_vocab_size(tp.size)
        self.vocab_per_rank = self.padded_vocab // tp.size
        self.vocab_start = tp.rank * self.vocab_per_rank
        mp = megatron_config(tp.size, dtype, on_cpu=device.type == "cpu")
        kw = dict(dtype=dtype, device=device)
        # The exact reductions outside the row-parallel outputs (embedding rows, Mamba-2's norm across
        # ranks): one-shot over symmetric memory where it can (small CUDA messages), else NCCL/gloo.
        small = OneShotAllReduce()
        self.embeddings = VocabParallelEmbedding(self.padded_vocab, cfg.hidden_size, config=mp, tp=tp, allreduce=small)

        def mixer():
            if cfg.family == ZAMBA:
                return ZambaMambaMixer(cfg, tp, mp, allreduce=allreduce, **kw)
            if cfg.is_mamba2:
                return Mamba2Mixer(cfg, tp, mp, allreduce=allreduce, small_allreduce=small, **kw)
            return Mamba1Mixer(cfg, tp, mp, allreduce=allreduce, **kw)

        def attention():
            return Attention(cfg, tp, mp, allreduce=allreduce, **kw)

        def block(kind: str) -> nn.Module:
            if kind == MAMBA_BLOCK:
                return MambaBlock(cfg, mixer(), **kw)
            if kind == ATTENTION_BLOCK:
                return AttentionBlock(cfg, attention(), **kw)
            if kind == MLP_BLOCK:
                return MLPBlock(cfg, MLP(cfg, tp, mp, allreduce=allreduce, **kw), **kw)
            if kind == PARALLEL_BLOCK:
                return ParallelBlock(cfg, mixer(), attention(), **kw)
            if kind == SHARED_BLOCK:
                shared = self.shared_blocks[next(uses) % len(self.shared_blocks)]
                return SharedHybridBlock(cfg, mixer(), SharedApplication(cfg, tp, mp, **kw), shared, **kw)
            raise ValueError(f"unknown block kind {kind!r}")

        # Zamba's shared attention + MLP blocks: held here once, applied by every S block (ABAB...)
        self.shared_blocks = nn.ModuleList(SharedTransformer(cfg, tp, mp, allreduce=allreduce, **kw)
                                           for _ in range(cfg.shared_blocks if cfg.has_shared_blocks else 0))
        uses = iter(range(cfg.num_layers))
        self.layers = nn.ModuleList(block(kind) for kind in cfg.pattern)
        self.embedding_scale = cfg.multiplier("embedding")
        self.logit_scale = cfg.multiplier("lm_head")
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else \
            ColumnParallelLinear(cfg.hidden_size, self.padded_vocab, config=mp, bias=False)
        self.requires_grad_(False)
        # Rows past the real vocabulary exist only for even sharding: never let them win.
        ids = torch.arange(self.vocab_start, self.vocab_start + self.vocab_per_rank, device=device)
        self.register_buffer("vocab_padding", ids >= cfg.vocab_size, persistent=False)

    @property
    def supports_context_parallel(self) -> bool:
        """Whether every block can run a span of a context-parallel forward (`cp`): all but Zamba's
        (its shared blocks and its split Mamba mixer are not covered yet)."""
        return self.cfg.family != ZAMBA and not self.shared_blocks

    # Kernels here and in mamba-ssm index activations with 32-bit offsets: keep every activation
    # of one forward (batch x tokens x widest row) under this many elements.
    max_activation_elements = 2**31 - 1

    def max_tokens_per_forward(self, all_logits: bool = False) -> int:
        """Most tokens (batch x length) one forward may take: the widest per-token row is a
        column-parallel output on this rank (in_proj, qkv, MLP up), or this rank's logits when every
        position's are kept."""
        columns = [m.weight.shape[0] for part in (self.layers, self.shared_blocks) for m in part.modules()
                   if isinstance(m, ColumnParallelLinear)]
        widest = max(max(columns, default=1), self.cfg.hidden_size, self.vocab_per_rank if all_logits else 1)
        return max(1, self.max_activation_elements // widest)

    def state_shapes(self, max_length: int = 0) -> list[StateShapes]:
        """Per block, its per-sequence state on this rank: name -> (shape, dtype; None: the model's
        dtype). Attention blocks hold keys/values for `max_length` positions."""
        if self.cfg.has_attention and max_length < 1:
            raise ValueError("a model with attention layers needs max_length >= 1 for its KV cache")
        return [layer.state_shapes(max_length) for layer in self.layers]

    @property
    def packs_sequences(self) -> bool:
        """Whether forward takes packed sequences (cu_seqlens): every block kind in the stack restarts
        at packed sequence boundaries (all of ours do: Mamba, attention, MLP, parallel and Zamba's
        shared blocks)."""
        return all(getattr(layer, "packs", False) for layer in self.layers)

    def forward(self, input_ids: torch.Tensor, states: list[LayerState] | None = None,
                last_only: bool = False, cu_seqlens: torch.Tensor | None = None,
                cp: ContextParallelSpans | None = None) -> torch.Tensor:
        """input_ids [b, L] -> this rank's logits [b, L, padded_vocab / tp] in fp32.

        `states` (one per layer, for these b sequences) hold the context before input_ids and are
        advanced in place; None runs the sequences from scratch and keeps nothing. `last_only`
        computes logits for the last position only (prefill needs no others).

        Packed prompts: with cu_seqlens [nseq + 1] (ops/varlen.py), input_ids [1, T] holds nseq
        sequences end to end, each starting from zero states; `states` [nseq rows] receive their
        final states. The logits are then [1, T, V/tp], or [nseq, 1, V/tp] (each sequence's last
        position) with last_only.

        `cp`: input_ids are split along time over the context-parallel group, each rank running its
        own span (every CP rank passes the same input_ids and gets the same logits and states back)."""
        if cu_seqlens is not None and not self.packs_sequences:
            raise ValueError("this model's layers cannot take packed sequences (cu_seqlens)")
        if cu_seqlens is not None and cp is not None:
            raise ValueError("a context-parallel forward takes one range of sequences, not packed ones")
        if cu_seqlens is not None:
            if input_ids.shape[0] != 1:
                raise ValueError(f"packed sequences (cu_seqlens) come as one row of tokens, got {input_ids.shape[0]}")
            rows = next((t.shape[0] for st in (states or []) if st is not None for t in st.tensors().values()), None)
            validate_packed(cu_seqlens, input_ids.shape[1], rows)
        if cp is not None:
            input_ids = cp.local(input_ids)
        stream, delta = self.embeddings(input_ids), None
        if self.embedding_scale != 1.0:
            stream = stream * self.embedding_scale
        # Zamba's shared blocks read the token embeddings beside the hidden state at every use
        embeddings = stream if self.shared_blocks else None
        parts = self._micro_chunks(input_ids.shape[1]) \
            if states is not None and cu_seqlens is None and cp is None and self._overlaps(input_ids) else []
        if parts:
            stream, delta = self._overlapped_layers(stream, states, parts, embeddings)
        else:
            for i, layer in enumerate(self.layers):
                stream, pending = _start(layer, stream, delta, None if states is None else states[i], embeddings,
                                         cu_seqlens, cp)
                # An output left unprojected goes as it is to a consumer that takes it into its
                # entry's projection (a Mamba block, the head): no entry kernel in between.
                following = self.layers[i + 1] if i + 1 < len(self.layers) else None
                delta = pending if isinstance(pending, DeferredOutput) and _takes_deferred(following) else pending.wait()
        if isinstance(delta, DeferredOutput) and (cu_seqlens is not None or (last_only and stream.shape[1] > 1)):
            delta = delta.wait()  # cut to the last positions below
        if last_only and cu_seqlens is not None:
            last = last_positions(cu_seqlens)
            stream = stream[0].index_select(0, last).unsqueeze(1)
            delta = None if delta is None else delta[0].index_select(0, last).unsqueeze(1)
        elif last_only and stream.shape[1] > 1:
            stream, delta = stream[:, -1:], None if delta is None else delta[:, -1:]
        head = self.embeddings.weight if self.lm_head is None else self.lm_head.weight
        # Falcon-H1's lm_head multiplier inside the projection (its kernel's epilogue at decode)
        scale = self.logit_scale if self.logit_scale != 1.0 else None
        if isinstance(delta, DeferredOutput) and self.norm_f.weight.dtype != head.dtype:
            delta = delta.wait()
        entry = (project_entry(stream, delta, self.norm_f, self.residual_dtype, head, scale=scale)
                 if self.norm_f.weight.dtype == head.dtype else None)  # one launch up to entry_rows()
        if entry is not None:
            logits = entry[0]
        else:
            hidden, _ = add_rms_norm(stream, delta, self.norm_f.weight, self.norm_f.eps, self.residual_dtype)
            logits = project(hidden.to(head.dtype), head, scale=scale)
        logits = logits.float()
        logits = logits.masked_fill_(self.vocab_padding, float("-inf"))
        if cp is not None:
            logits = cp.last_logits(logits) if last_only else cp.gather_positions(logits)
        return logits

    def _overlaps(self, input_ids: torch.Tensor) -> bool:
        return (self.tp.size > 1 and 0 < self.overlap_min_tokens <= input_ids.numel()
                and input_ids.shape[1] > 1)

    def _micro_chunks(self, length: int) -> list[int]:
        """Two time spans, the first a whole number of SSD chunks where the length allows, so the
        scan of each half runs on full chunks."""
        unit = self.cfg.chunk_size if self.cfg.is_mamba2 and length >= 2 * self.cfg.chunk_size else 1
        first = -(-length // (2 * unit)) * unit
        return [first, length - first] if 0 < first < length else []

    def _overlapped_layers(self, stream: torch.Tensor, states: list[LayerState], parts: list[int],
                           embeddings: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layers over consecutive time spans of the batch, interleaved so that each span's
        all-reduce runs while the next span computes: span 1 of layer i continues from the state
        span 0 of layer i left, and span 0 of layer i+1 waits only for its own reduction. The states
        advance as in one pass over the whole length. Returns (stream, delta) as the plain loop does."""
        streams = list(stream.split(parts, dim=1))
        spans = list(embeddings.split(parts, dim=1)) if embeddings is not None else [None] * len(streams)
        pending: list[PendingOutput | None] = [None] * len(streams)
        offsets = [sum(parts[:p]) for p in range(len(parts))]
        for i, layer in enumerate(self.layers):
            for p in range(len(streams)):
                delta = pending[p].wait() if pending[p] is not None else None
                state = states[i]
                if state.filled is not None:  # span p starts that many positions later
                    state = replace(state, filled=state.filled + offsets[p])
                streams[p], pending[p] = _start(layer, streams[p], delta, state, spans[p])
        deltas = [p.wait() for p in pending] if self.layers else None
        return torch.cat(streams, dim=1), None if deltas is None else torch.cat(deltas, dim=1)


def _takes_deferred(layer) -> bool:
    """Whether what follows takes a DeferredOutput as its delta: a Mamba block's own start (its
    entry and in_proj through project_entry) or, after the last layer (None), the head."""
    return layer is None or type(layer).start is MambaBlock.start


def _start(layer, stream, delta, state, embeddings, cu_seqlens=None, cp=None):
    """layer.start, handing the token embeddings to the blocks that read them (Zamba's S)."""
    extra = {"embeddings": embeddings} if layer.uses_embeddings else {}
    return layer.start(stream, delta, state, cu_seqlens, cp, **extra)
