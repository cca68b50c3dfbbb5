"""Choosing tokens from vocab-parallel logits.

Greedy needs only each rank's best (value, index): one tiny all-gather, never the full vocabulary.
Sampling gathers the full logits; every rank then draws with an identically seeded generator, so
all ranks pick the same token without a broadcast, and the pick is the same at every TP degree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel import TPContext


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def vocab_parallel_argmax(local: torch.Tensor, vocab_start: int, tp: TPContext) -> torch.Tensor:
    """local [b, V/tp] -> global argmax [b] (ties go to the lowest token id, as torch.argmax does)."""
    val, idx = local.max(dim=-1)
    if tp.size == 1:
        return idx
    # value and index travel together as fp32 (indices are exact below 2**24)
    packed = torch.stack([val.float(), (idx + vocab_start).float()], dim=-1)
    parts = [torch.empty_like(packed) for _ in range(tp.size)]
    dist.all_gather(parts, packed, group=tp.group)
    both = torch.stack(parts, dim=1)  # [b, tp, 2]; the first max is the lowest rank's
    best = both[..., 0].argmax(dim=1, keepdim=True)
    return both[..., 1].gather(1, best).squeeze(1).long()


def gather_logits(local: torch.Tensor, vocab_size: int, tp: TPContext) -> torch.Tensor:
    """local [..., V/tp] -> full [..., vocab_size] on every rank."""
    if tp.size > 1:
        parts = [torch.empty_like(local) for _ in range(tp.size)]
        dist.all_gather(parts, local.contiguous(), group=tp.group)
        local = torch.cat(parts, dim=-1)
    return local[..., :vocab_size]


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and outside the smallest top-p nucleus."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample(local: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           vocab_start: int, vocab_size: int, tp: TPContext) -> torch.Tensor:
    """local [b, V/tp] -> token ids [b]."""
    if params.greedy:
        return vocab_parallel_argmax(local, vocab_start, tp)
    logits = filter_logits(gather_logits(local, vocab_size, tp).float() / params.temperature,
                           params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
