"""Choosing tokens from vocab-parallel logits.

Greedy needs only each rank's best (value, index): one tiny all-gather, never the full vocabulary.
Sampling gathers the full logits; every rank then draws with the request's identically seeded
generator, so all ranks pick the same token without a broadcast. One uniform number is drawn per
token (inverse CDF), so a seed gives the same tokens at every TP degree.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..ops.dispatch import row_max
from ..parallel import TPContext


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class VocabShard:
    """Which slice of the vocabulary this rank's logits hold."""

    start: int
    vocab_size: int  # real (unpadded) vocabulary
    tp: TPContext


def _all_gather(t: torch.Tensor, tp: TPContext) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(tp.size)]
    dist.all_gather(parts, t.contiguous(), group=tp.group)
    return torch.stack(parts, dim=1)  # [b, tp, ...]


def vocab_parallel_argmax(local: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """local [b, V/tp] -> global argmax [b] (ties go to the lowest token id, as torch.argmax does)."""
    val, idx = row_max(local)
    if shard.tp.size == 1:
        return idx
    # value and index travel together as fp32 (indices are exact below 2**24)
    both = _all_gather(torch.stack([val.float(), (idx + shard.start).float()], dim=-1), shard.tp)
    best = both[..., 0].argmax(dim=1, keepdim=True)  # the first max is the lowest rank's
    return both[..., 1].gather(1, best).squeeze(1).long()


def _log_normalizer(local: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """log sum exp over the whole vocabulary per row, from each rank's (max, sum exp)."""
    m = local.max(dim=-1).values
    # a rank may hold only vocabulary padding (all -inf): its sum is then 0, not NaN
    s = torch.exp(local - torch.where(torch.isfinite(m), m, 0.0).unsqueeze(-1)).sum(-1)
    if shard.tp.size > 1:
        ms = _all_gather(torch.stack([m, s], dim=-1), shard.tp)  # [b, tp, 2]
        m = ms[..., 0].max(dim=1).values
        s = (ms[..., 1] * torch.exp(ms[..., 0] - m[:, None])).sum(1)
    return m + torch.log(s)


def vocab_parallel_logprob(local: torch.Tensor, tokens: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """log softmax(logits)[token] per row, from vocab-parallel logits: each rank's (max, sum exp)
    and the chosen logit from the rank that owns it."""
    owned = (tokens >= shard.start) & (tokens < shard.start + local.shape[-1])
    chosen = torch.where(owned, local.gather(1, (tokens - shard.start).clamp(0, local.shape[-1] - 1)[:, None])[:, 0],
                         torch.zeros(local.shape[0], dtype=local.dtype, device=local.device))
    if shard.tp.size > 1:
        dist.all_reduce(chosen, group=shard.tp.group)
    return chosen - _log_normalizer(local, shard)


def vocab_parallel_topk(local: torch.Tensor, k: int, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens per row and their log-probs ([b, k] each, best first; a tie across
    ranks goes to the lower id), from vocab-parallel logits: each rank's own top k, all-gathered (tp * k values and
    ids per row, never the vocabulary) and merged."""
    k = max(1, min(k, shard.vocab_size))
    log_z = _log_normalizer(local, shard)
    vals, idx = local.topk(min(k, local.shape[-1]), dim=-1)  # sorted; padding is -inf, so it comes last
    idx = idx + shard.start
    if shard.tp.size > 1:
        both = _all_gather(torch.stack([vals.float(), idx.float()], dim=-1), shard.tp)  # [b, tp, k, 2]
        both = both.flatten(1, 2)  # ranks in order: equal values keep the lower id first
        vals, idx = both[..., 0], both[..., 1].long()
        order = torch.sort(vals, dim=-1, descending=True, stable=True).indices[:, :k]
        vals, idx = vals.gather(1, order), idx.gather(1, order)
    return vals - log_z[:, None], idx


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


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - max) / temperature in fp32: the best token sits at 0 and the rest at or below it, so
    a tiny temperature (1e-40) sends the others to -inf instead of overflowing everything to inf
    (inf - inf is NaN)."""
    logits = logits.float()
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    return shifted / max(temperature, torch.finfo(torch.float32).tiny)


def draw_on_device(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """One token from full logits [V] by inverse CDF on one uniform draw, as a 0-d tensor on the
    logits' device: nothing waits for the device, so a decode step can be queued behind it."""
    probs = torch.softmax(filter_logits(scale_logits(logits, params.temperature), params.top_k, params.top_p), dim=-1)
    u = torch.rand((), generator=generator, device=probs.device)
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, (u * cdf[-1]).unsqueeze(0)).clamp(max=probs.shape[-1] - 1)[0]


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """draw_on_device's token as an int."""
    return int(draw_on_device(logits, params, generator))


def choose_tokens(local: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                  want_logprobs: list[bool], shard: VocabShard,
                  greedy: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """local [b, V/tp] -> (tokens [b], log-probs [b] or None) on local's device, without waiting
    for it. Row i follows params[i]. greedy: each row's argmax when already computed (a decode
    graph's); returned as it is when every row is greedy, never written.

    Every rank must call this with the same params: the collectives it issues depend on them."""
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if len(sampled) < len(params):
        tokens = vocab_parallel_argmax(local, shard) if greedy is None else greedy
        if sampled and greedy is not None:
            tokens = tokens.clone()
    else:
        tokens = torch.empty(local.shape[0], dtype=torch.long, device=local.device)
    if sampled:
        full = gather_logits(local[sampled], shard.vocab_size, shard.tp)
        picks = torch.stack([draw_on_device(full[j], params[i], generators[i]) for j, i in enumerate(sampled)])
        if len(sampled) == len(params):
            tokens = picks
        else:
            tokens[sampled] = picks
    logprobs = vocab_parallel_logprob(local, tokens, shard) if any(want_logprobs) else None
    return tokens, logprobs

