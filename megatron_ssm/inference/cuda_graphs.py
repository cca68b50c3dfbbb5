"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step is hundreds of small kernels and, under TP, one or two all-reduces per layer; launched
one by one from Python they cost more than the math at small batch. Each bucket's graph is captured
once, at engine start while no sequence runs, over cache rows [0, bucket): running sequences always
sit in rows [0, n), so a step with n sequences replays the smallest bucket >= n (rows past n are
free slots whose states are reset when a request takes them).

Hybrids' attention blocks are captured over the whole KV cache (EngineConfig.max_sequence_length
positions, masked by each row's length tensor), so a graphed step reads all of it where an eager
step reads only the positions in use: size max_sequence_length to the workload.
"""
from __future__ import annotations

import bisect

import torch

from ..model.lm import MambaLM
from .cache import StateCache

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphedDecode:
    def __init__(self, model: MambaLM, cache: StateCache, buckets=DEFAULT_BUCKETS):
        # every bucket that fits the cache, plus the cache size itself so a full batch is graphed
        self.buckets = sorted({b for b in buckets if b < cache.slots} | {min(cache.slots, max(buckets))})
        self.tokens: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        device = model.embeddings.weight.device
        pool = None
        side = torch.cuda.Stream(device)
        for b in sorted(self.buckets, reverse=True):  # largest first: later graphs reuse its memory pool
            tokens = torch.zeros(b, 1, dtype=torch.long, device=device)
            states = cache.rows(0, b)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up: compiles kernels, creates communicators and handles
                for _ in range(2):
                    model(tokens, states)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = model(tokens, states)[:, -1]
            pool = graph.pool()
            self.tokens[b], self.graphs[b] = tokens, graph
        cache.reset(0, cache.slots)

    def bucket(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def __call__(self, tokens: torch.Tensor, n: int) -> torch.Tensor | None:
        """tokens [n, 1] -> this rank's logits [n, V/tp], or None when n exceeds every bucket."""
        b = self.bucket(n)
        if b is None:
            return None
        self.tokens[b][:n].copy_(tokens)
        self.tokens[b][n:].zero_()
        self.graphs[b].replay()
        return self.logits[b][:n]
