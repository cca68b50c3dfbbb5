"""Prefix state reuse: the SSM counterpart of prefix caching.

A prompt's state after its first k tokens is the whole of its context, so two prompts that share
their first k tokens can share that state (for a hybrid: every Mamba block's state plus every
attention block's first k keys and values). Prefill saves the state reached at every multiple of
`block` tokens; a new prompt starts from the longest saved prefix it begins with. Entries live in
a least-recently-used map capped in bytes. Every TP rank holds its own shard of each entry and
makes the same decisions, since keys and sizes are the same on every rank.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from ..model.lm import LayerState


def prefix_keys(tokens: list[int], block: int) -> list[tuple[int, bytes]]:
    """(length, digest of tokens[:length]) for every multiple of `block`, shortest first."""
    h = hashlib.blake2b(digest_size=16)
    keys = []
    for end in range(block, len(tokens) + 1, block):
        h.update(torch.tensor(tokens[end - block:end], dtype=torch.int64).numpy().tobytes())
        keys.append((end, h.copy().digest()))
    return keys


class PrefixStateCache:
    def __init__(self, block: int, capacity_bytes: int):
        if block < 1:
            raise ValueError(f"prefix block must be >= 1 token, got {block}")
        self.block = block
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[bytes, list[LayerState]] = OrderedDict()
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def lookup(self, tokens: list[int]) -> tuple[int, list[LayerState] | None]:
        """Longest saved prefix of `tokens` shorter than the whole prompt (the last token must
        still run through the model to give logits): (its length, its state) or (0, None)."""
        if self.enabled:
            for length, key in reversed(prefix_keys(tokens[:-1], self.block)):
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return length, self._entries[key]
        self.misses += 1
        return 0, None

    def save(self, key: bytes, states: list[LayerState], row: int, length: int | None = None) -> None:
        """Keep a copy of row `row` of `states` under `key`, evicting the least recently used.
        `length`: the prefix's token count, to which keys/values are cut (hybrids)."""
        if not self.enabled or key in self._entries:
            return
        entry = [LayerState(**{n: t[row:row + 1, :length].clone() if n in ("k", "v") else t[row:row + 1].clone()
                               for n, t in s.tensors().items()}) for s in states]
        size = _nbytes(entry)
        if size > self.capacity:
            return
        while self.used + size > self.capacity:
            _, old = self._entries.popitem(last=False)
            self.used -= _nbytes(old)
        self._entries[key] = entry
        self.used += size


def _nbytes(entry: list[LayerState]) -> int:
    return sum(t.nbytes for s in entry for t in s.tensors().values())
