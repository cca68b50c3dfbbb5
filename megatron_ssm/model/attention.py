"""Causal self-attention split by heads across the TP group, with a per-sequence KV cache.

qkv_proj is column-parallel and packed per rank as [q_r | k_r | v_r] (the checkpoint converter lays
it out so, as for Mamba-2's in_proj). Rank r holds query heads [r*H/tp, (r+1)*H/tp). Key/value
heads are split when tp divides them; when they divide tp each rank holds the one kv head its
query heads use (replicated on tp/kv ranks). o_proj is row-parallel through the model's all-reduce.

The state of a sequence is its keys and values at every position so far plus how many positions
are filled: `k`, `v` [b, T, kv_heads_local, head_dim] and `length` [b]. Everything a step needs
is a tensor (positions, masks, where to write), so a decode step is CUDA-graph capturable: T is
the cache's fixed capacity (or any prefix of it the caller slices), and positions at or past a
sequence's length are masked, not sliced. A prefill whose rows all hold the same number of
positions says so (`LayerState.filled`, known to the engine) and runs causal SDPA (flash kernels)
over the chunk, or lower-right causal over the prefix plus the chunk, instead of a full mask.

Packed prompts (cu_seqlens: several sequences end to end in one row, ops/varlen.py) attend within
their own sequence, from position 0 (ops/attention.py: torch's flash varlen kernel on a GPU), each
sequence's keys/values written to its own row of the state from its start, its `length` set.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from ..config import SSMConfig
from ..ops.dispatch import decode_attention, packed_causal_attention, rotary_embedding
from ..ops.linear import scale_output
from ..ops.rope import rope_frequencies
from ..ops.varlen import seq_index
from ..parallel import TPContext
from .layers import (AllReduceFn, ColumnParallelLinear, Mixer, OutputFactors, PendingOutput, RowParallelLinear,
                     fold_input_scale)


def local_kv_heads(cfg: SSMConfig, tp_size: int) -> int:
    """KV heads each rank holds: kv/tp when split, 1 when replicated."""
    return cfg.num_kv_heads // tp_size if cfg.num_kv_heads % tp_size == 0 else 1


def kv_head_owner(cfg: SSMConfig, tp_size: int, rank: int) -> tuple[int, int]:
    """(first kv head, number of kv heads) that `rank` holds."""
    if cfg.num_kv_heads % tp_size == 0:
        per = cfg.num_kv_heads // tp_size
        return rank * per, per
    return rank // (tp_size // cfg.num_kv_heads), 1


class Attention(Mixer):
    def __init__(self, cfg: SSMConfig, tp: TPContext, mp_config, *, dtype: torch.dtype, device: torch.device,
                 allreduce: AllReduceFn | None = None):
        super().__init__()
        cfg.validate(tp.size)
        self.cfg = cfg
        self.heads = cfg.num_attention_heads // tp.size
        self.kv_heads = local_kv_heads(cfg, tp.size)
        self.head_dim = d = cfg.attention_head_dim
        inv_freq = rope_frequencies(cfg.rope_theta, cfg.rotary_dim or d, device) if cfg.rope_theta is not None else None
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        local_rows = (self.heads + 2 * self.kv_heads) * d
        self.softmax_scale = cfg.attention_softmax_scale
        self.qkv_proj = ColumnParallelLinear(cfg.attention_input_size or cfg.hidden_size, tp.size * local_rows,
                                             config=mp_config,
                                             bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * d, cfg.hidden_size, config=mp_config,
                                        bias=cfg.attention_bias, tp=tp, allreduce=allreduce)
        # Falcon-H1's multipliers on the input (attention_in) and the keys (key) go into qkv_proj as
        # one factor per output row (its kernel's epilogue at decode); the input's only without a
        # bias, where it is the output's.
        self.hidden_scale, folded = fold_input_scale(cfg.multiplier("attention_in"), cfg.attention_bias)
        key = cfg.multiplier("key")
        widths = (self.heads * d, self.kv_heads * d, self.kv_heads * d)
        # (a per-use adapter's delta takes the key factors too)
        self.key_factors = OutputFactors(widths, (1.0, key, 1.0), device)
        self.qkv_factors = OutputFactors(widths, (folded, key * folded, folded), device)

    def state_shapes(self, max_length: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
        """Per-sequence state on this rank: name -> (shape, dtype; None: the model's dtype)."""
        kv = (max_length, self.kv_heads, self.head_dim)
        return {"k": (kv, None), "v": (kv, None), "length": ((), torch.int64)}

    def start(self, hidden: torch.Tensor, state=None, out_scale: float = 1.0,
              qkv_delta: torch.Tensor | None = None, cp=None, cu_seqlens: torch.Tensor | None = None) -> PendingOutput:
        """hidden [b, L, hidden]. `state` (a LayerState with k, v, length) holds the sequences'
        earlier positions: the new keys/values are written after them and `length` advances; None
        attends within `hidden` alone and keeps nothing. cp (a ContextParallelSpans): hidden is this
        rank's span of a range split over the CP group; every span's keys/values are gathered, so
        each rank's queries see the earlier spans and every rank's cache holds the whole range.
        cu_seqlens: hidden [1, T, hidden] packs sequences that each start at position 0; `state`
        (if given) has one row per sequence, whose earlier contents are not read."""
        b, L, _ = hidden.shape
        d = self.head_dim
        if self.hidden_scale != 1.0:
            hidden = hidden * self.hidden_scale
        qkv = self.qkv_proj(hidden, scale=self.qkv_factors.scale)
        if qkv_delta is not None:  # a per-use adapter's addition to this rank's [q_r | k_r | v_r] (Zamba2)
            qkv = qkv + scale_output(qkv_delta, self.key_factors.scale)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(b, L, self.heads, d)
        k = k.view(b, L, self.kv_heads, d)
        v = v.view(b, L, self.kv_heads, d)
        steps = torch.arange(L, device=hidden.device) + (0 if cp is None else cp.start)
        if cu_seqlens is not None:  # each packed token's sequence, and its position in it
            seq = seq_index(cu_seqlens, L).long()
            positions = (steps - cu_seqlens.long()[seq])[None]
        else:
            positions = steps.expand(b, L) if state is None else state.length[:, None] + steps
        if self.inv_freq is not None:
            q = rotary_embedding(q, positions, self.inv_freq)
            k = rotary_embedding(k, positions, self.inv_freq)
        if cp is not None:
            return self.o_proj.start(self._context_parallel(q, k, v, positions, state, cp), out_scale)
        if cu_seqlens is not None:
            return self.o_proj.start(self._packed(q, k, v, seq, positions[0], cu_seqlens, state), out_scale)
        gqa = self.heads != self.kv_heads
        if state is None or state.filled == 0:
            if state is not None:
                state.k[:, :L].copy_(k)
                state.v[:, :L].copy_(v)
                state.length += L
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=True, enable_gqa=gqa, scale=self.softmax_scale)
        elif state.filled is not None:  # every row continues from the same position: lower-right causal
            end = state.filled + L
            state.k[:, state.filled:end].copy_(k)
            state.v[:, state.filled:end].copy_(v)
            state.length += L
            out = F.scaled_dot_product_attention(q.transpose(1, 2), state.k[:, :end].transpose(1, 2),
                                                 state.v[:, :end].transpose(1, 2), attn_mask=causal_lower_right(L, end),
                                                 enable_gqa=gqa, scale=self.softmax_scale)
        else:
            # Rows a CUDA graph runs past the live sequences (free slots) keep advancing their length;
            # clamping keeps their writes inside the cache. A live row never reaches the end: the
            # engine admits prompt + new <= capacity, and the last generated token is never fed.
            last = state.k.shape[1] - 1
            where = positions.clamp(max=last)[:, :, None, None].expand(b, L, self.kv_heads, d)
            state.k.scatter_(1, where, k.to(state.k.dtype))
            state.v.scatter_(1, where, v.to(state.v.dtype))
            state.length += L
            # query at position p sees keys 0..p; positions past a sequence's length are stale
            if L == 1:  # a decode step: each row reads its keys up to its position only
                out = decode_attention(q[:, 0], state.k, state.v, positions[:, 0], self.softmax_scale)[:, :, None]
            else:
                visible = torch.arange(state.k.shape[1], device=hidden.device) <= positions[:, :, None]
                out = F.scaled_dot_product_attention(q.transpose(1, 2), state.k.transpose(1, 2), state.v.transpose(1, 2),
                                                     attn_mask=visible[:, None], enable_gqa=gqa, scale=self.softmax_scale)
        return self.o_proj.start(out.transpose(1, 2).reshape(b, L, self.heads * d), out_scale)

    def _packed(self, q, k, v, seq, positions, cu_seqlens, state) -> torch.Tensor:
        """Attention of packed sequences [1, T, ...], each within itself; returns [1, T, heads * head_dim].
        seq, positions [T]: each token's sequence and position in it."""
        T = q.shape[1]
        if state is not None:
            # A CUDA graph's padding sequence may run past the cache: clamp its writes into the row
            # (a real prompt never does: the engine admits prompt + new within the capacity).
            where = positions.clamp(max=state.k.shape[1] - 1)
            state.k[seq, where] = k[0].to(state.k.dtype)
            state.v[seq, where] = v[0].to(state.v.dtype)
            state.length.copy_(cu_seqlens[1:] - cu_seqlens[:-1])
        out = packed_causal_attention(q[0], k[0], v[0], cu_seqlens, self.softmax_scale)
        return out.reshape(1, T, self.heads * self.head_dim)

    def _context_parallel(self, q, k, v, positions, state, cp) -> torch.Tensor:
        """Attention of this span's queries (at `positions`) over the cached positions and every span
        of the range up to each query; returns [b, L, heads * head_dim]."""
        b, L = q.shape[:2]
        k_all, v_all = cp.gather_positions(k), cp.gather_positions(v)  # [b, n, kv heads, d], the range
        n = k_all.shape[1]
        if state is None:
            keys, values = k_all, v_all
            visible = torch.arange(n, device=q.device) <= positions[:, :, None]
        else:
            where = (state.length[:, None] + torch.arange(n, device=q.device))[:, :, None, None]
            where = where.expand(b, n, self.kv_heads, self.head_dim)
            state.k.scatter_(1, where, k_all.to(state.k.dtype))
            state.v.scatter_(1, where, v_all.to(state.v.dtype))
            state.length += n
            keys, values = state.k, state.v
            visible = torch.arange(keys.shape[1], device=q.device) <= positions[:, :, None]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=visible[:, None], enable_gqa=self.heads != self.kv_heads,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2).reshape(b, L, self.heads * self.head_dim)
