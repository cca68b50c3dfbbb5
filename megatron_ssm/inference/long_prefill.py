"""A long prompt's prefill split along the sequence over the context-parallel group, a step at a time.

The engine runs one such prefill beside its ordinary work: each of its steps takes up to
cp x prefill_chunk tokens of the prompt (every CP rank a span of up to prefill_chunk), and the
engine's other steps (admissions, decode) run in between, so running requests keep getting tokens.
The prefill keeps its states in the cache's last slot, which running sequences (slots
[0, n_running)) never reach while it is reserved; when the prompt is done the sequence moves to
slot n_running, joins the running batch like any other, and decodes replicated on every CP rank.

Why replicated decode: the state passing leaves the same final states on every CP rank (every rank
folds the same gathered pairs), and one-token decode steps have nothing to split along the sequence.
Running them everywhere keeps every rank's engine identical (the same requests in the same slots,
the same sampling), so nothing else needs to know about CP; decoding on one CP rank only would free
the others for nothing, since they hold the same weights and would wait for its tokens anyway.

Prefix reuse: a long prompt starts from the longest cached prefix state, like any other, and saves
the states reached at the end of each step that ends on a prefix-block boundary (steps are cut there
when the cache is on), so later prompts sharing a prefix find it at that step granularity.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.context_parallel import ContextParallelSpans
from ..model.lm import MambaLM
from ..parallel import CPContext
from .cache import StateCache
from .prefix_cache import PrefixStateCache, prefix_keys

# A step's range is split only when each CP rank gets at least this many tokens; a shorter remainder
# (the prompt's tail after the last full step) runs whole on every CP rank.
MIN_SPAN_TOKENS = 16


@dataclass
class LongPrefill:
    seq: object  # the engine's _Sequence
    cache: StateCache
    slot: int  # the cache slot holding this prompt's states while it is prefilled
    pos: int  # prompt tokens already in the slot's states
    keys: dict[int, bytes] | None  # prefix-block boundary -> prefix key, when the prefix cache is on

    @classmethod
    def start(cls, seq, cache: StateCache, prefix: PrefixStateCache) -> "LongPrefill":
        prompt = seq.req.prompt
        slot = cache.slots - 1
        pos, saved = prefix.lookup(prompt)
        cache.reset(slot, slot + 1)
        if saved is not None:
            cache.load(slot, saved)
        keys = dict(prefix_keys(prompt[:-1], prefix.block)) if prefix.enabled else None
        return cls(seq, cache, slot, pos, keys)

    @property
    def done(self) -> bool:
        return self.pos == len(self.seq.req.prompt)

    def advance(self, model: MambaLM, cp: CPContext, chunk: int, prefix: PrefixStateCache) -> torch.Tensor:
        """Prefill the next up to cp.size x chunk prompt tokens. Returns the last position's local
        logits [1, V/tp] (the same on every CP rank)."""
        prompt = self.seq.req.prompt
        unit = model.cfg.chunk_size if model.cfg.is_mamba2 and chunk >= model.cfg.chunk_size else 1
        per_rank = max(unit, chunk // unit * unit)  # whole SSD chunks per span where possible
        end = min(len(prompt), self.pos + cp.size * per_rank)
        if self.keys is not None and end < len(prompt) and end // prefix.block * prefix.block > self.pos:
            end = end // prefix.block * prefix.block  # end on a block boundary, to save the state there
        tokens = torch.tensor([prompt[self.pos:end]], device=model.embeddings.weight.device)
        states = self.cache.rows(self.slot, self.slot + 1, end)  # keys/values past `end` are not touched
        n = end - self.pos
        spans = ContextParallelSpans.split(cp, n, unit) if n >= cp.size * MIN_SPAN_TOKENS else None
        logits = model(tokens, states, last_only=True, cp=spans)
        self.pos = end
        if self.keys is not None and end in self.keys:
            prefix.save(self.keys[end], states, 0, end)
        return logits[:, -1]
