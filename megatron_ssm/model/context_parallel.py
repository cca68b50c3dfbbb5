"""Context-parallel prefill: one forward's tokens split along the sequence over the CP group.

Every CP rank receives the same token range and runs its own span of it through every layer. Per
Mamba layer the spans meet twice, each time in one all-gather of a few small tensors whose size does
not depend on the span length (`ops/state_passing.py` has the math):
  1. before conv1d: each span's last K-1 inputs (the next span's halo);
  2. after the scan, which every span but the first runs from a zero state: each span's
     (total decay, final state); each rank folds them into the state entering its span, adds that
     state's contribution to its outputs (y += C . decay . h_in) and the gated norm / out_proj follow.
Every rank folds the same gathered pairs in the same order, so every CP rank ends with the same final
conv and SSM states: decode then runs replicated on every CP rank (see `inference/engine.py`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..ops.state_passing import (conv_tail, conv_window, entry_states, selective_scan_cum_dt,
                                 selective_scan_entry_correction, ssd_entry_correction, ssd_log_decay)
from ..parallel import CPContext


def exchange(tensor: torch.Tensor, cp: CPContext) -> list[torch.Tensor]:
    """Every CP rank's `tensor` (one shape on all ranks), in CP rank order. All of context
    parallelism's communication goes through here, so a wrapper sees every byte of it."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(cp.size)]
    dist.all_gather(parts, tensor, group=cp.group)
    return parts


def split_spans(length: int, size: int, unit: int = 1) -> tuple[int, ...]:
    """Lengths of `size` consecutive spans covering `length` tokens: whole `unit`s (Mamba-2's chunk,
    so that every span but the last scans full chunks) shared out as evenly as they go, the last span
    ending at `length`. Needs length >= size; falls back to single tokens when units are too few."""
    if length < size:
        raise ValueError(f"cannot split {length} tokens over {size} context-parallel ranks")
    units = -(-length // unit)
    if units < size:
        unit, units = 1, length
    per, extra = divmod(units, size)
    counts = [per + (1 if r < extra else 0) for r in range(size)]
    lengths = [c * unit for c in counts[:-1]]
    return tuple(lengths + [length - sum(lengths)])


class ContextParallelSpans:
    """One forward's split of its tokens over the CP group: CP rank r runs tokens
    [start_r, start_r + lengths[r]). Passed explicitly from the LM into every layer's prefill."""

    def __init__(self, cp: CPContext, lengths: tuple[int, ...]):
        if len(lengths) != cp.size or min(lengths) < 1:
            raise ValueError(f"need {cp.size} non-empty spans, got {lengths}")
        self.cp, self.lengths = cp, tuple(lengths)
        self.start = sum(lengths[:cp.rank])
        self.length = lengths[cp.rank]

    @classmethod
    def split(cls, cp: CPContext, length: int, unit: int = 1) -> "ContextParallelSpans":
        return cls(cp, split_spans(length, cp.size, unit))

    @property
    def is_first(self) -> bool:
        return self.cp.rank == 0

    def local(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's span of a tensor that holds the whole token range along `dim`."""
        return t.narrow(dim, self.start, self.length)

    # ---- inside a Mamba layer ------------------------------------------------------------------

    def conv(self, conv1d, x: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        """conv1d (a CausalConv1d) over this span's inputs x [b, L, C], starting from the K-1 inputs
        before the span; `state` [b, C, K-1] (the inputs before the whole range, or None for zeros)
        is left holding the range's last K-1 inputs, as a single-rank forward would leave it."""
        width = conv1d.weight.shape[-1] - 1
        tails = exchange(conv_tail(x, width), self.cp)
        prior = state if state is not None else x.new_zeros(x.shape[0], x.shape[2], width)
        rank = self.cp.rank
        y = conv1d(x, conv_window(prior, tails[:rank], list(self.lengths[:rank])))
        if state is not None:
            state.copy_(conv_window(prior, tails, list(self.lengths)))
        return y

    def join_states(self, decay: torch.Tensor, final: torch.Tensor, state: torch.Tensor | None,
                    to_decay=None) -> torch.Tensor | None:
        """Gather every span's (total decay, final state) in one exchange; write the range's final
        state into `state`; return the state entering this span (None on the first span, which
        scanned from the real initial state). decay broadcasts against final, or `to_decay(decay)`
        does (when a smaller tensor determines the decay: it is what travels)."""
        n = final[0].numel()
        packed = torch.cat([final.float().flatten(1), decay.float().flatten(1)], dim=1)
        parts = exchange(packed, self.cp)
        finals = [p[:, :n].view(final.shape) for p in parts]
        decays = [p[:, n:].view(decay.shape) for p in parts]
        if to_decay is not None:
            decays = [to_decay(d) for d in decays]
        entering, last = entry_states(decays, finals)
        if state is not None:
            state.copy_(last)
        return None if self.is_first else entering[self.cp.rank]

    def join_ssd(self, y: torch.Tensor, final: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor,
                 dt_bias: torch.Tensor | None, dt_limit: tuple[float, float],
                 state: torch.Tensor | None) -> torch.Tensor:
        """Mamba-2: y [b, L, h, p] of this span's scan -> the outputs it has in the whole range."""
        log_decay = ssd_log_decay(dt, A, dt_bias, dt_limit)  # [b, L, h]
        h_in = self.join_states(torch.exp(log_decay[:, -1])[..., None, None], final, state)
        if h_in is None:
            return y
        return (y.float() + ssd_entry_correction(C, log_decay, h_in)).to(y.dtype)

    def join_selective_scan(self, y: torch.Tensor, final: torch.Tensor, z: torch.Tensor | None, dt: torch.Tensor,
                            A: torch.Tensor, C: torch.Tensor, dt_bias: torch.Tensor | None,
                            state: torch.Tensor | None) -> torch.Tensor:
        """Mamba-1: gated y [b, L, d] of this span's scan -> the outputs it has in the whole range.
        The scan's output is (C.h + D u) * silu(z), so the entering state's term is gated the same."""
        cum_dt = selective_scan_cum_dt(dt, dt_bias)  # [b, L, d]
        # The decay over the span is exp(A * sum of dt) [b, d, n]; A is the same on every CP rank,
        # so only the sum [b, d] travels.
        h_in = self.join_states(cum_dt[:, -1], final, state, lambda total: torch.exp(total.unsqueeze(-1) * A.float()))
        if h_in is None:
            return y
        extra = selective_scan_entry_correction(C, cum_dt, A, h_in)
        if z is not None:
            extra = extra * F.silu(z.float())
        return (y.float() + extra).to(y.dtype)

    # ---- logits --------------------------------------------------------------------------------

    def last_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The range's last position's logits (computed on the last span) on every CP rank. An
        all-gather rather than a broadcast so that it too goes through `exchange`: [b, 1, V/tp] once
        per forward."""
        return exchange(logits, self.cp)[-1]

    def gather_positions(self, t: torch.Tensor) -> torch.Tensor:
        """Every span's t [b, L_r, ...] joined along time on every CP rank (spans padded to one length
        for the exchange)."""
        longest = max(self.lengths)
        padded = F.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1]))
        parts = exchange(padded, self.cp)
        return torch.cat([p[:, :n] for p, n in zip(parts, self.lengths)], dim=1)
