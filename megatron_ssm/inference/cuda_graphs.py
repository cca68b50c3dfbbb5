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
import logging
import time

import torch

from ..model.lm import LayerState, MambaLM
from .cache import StateCache, kv_upto
from .sampling import VocabShard, vocab_parallel_argmax

log = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class GraphedDecode:
    def __init__(self, model: MambaLM, cache: StateCache, buckets=DEFAULT_BUCKETS, shard: VocabShard | None = None):
        """shard: also capture each row's greedy token (the argmax over the vocabulary) after the
        logits and feed it back as the graph's next input, so an all-greedy step launched ahead
        needs no kernel of its own between two replays (session 11 measured ~18 us of them a step
        at batch 1: the argmax, the copy into the graph's input, and their launch gaps). Only at
        TP 1: a vocab-parallel argmax would capture an all-gather, not yet run on GPUs."""
        # every bucket that fits the cache, plus the cache size itself so a full batch is graphed
        self.buckets = sorted({b for b in buckets if b < cache.slots} | {min(cache.slots, max(buckets))})
        self.tokens: dict[int, torch.Tensor] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.greedy: dict[int, torch.Tensor] = {}
        shard = shard if shard is not None and shard.tp.size == 1 else None
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
                    logits = model(tokens, states)[:, -1]
                    if shard is not None:
                        vocab_parallel_argmax(logits, shard)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = model(tokens, states)[:, -1]
                if shard is not None:
                    self.greedy[b] = vocab_parallel_argmax(self.logits[b], shard)
                    tokens.copy_(self.greedy[b].view(b, 1))
            pool = graph.pool()
            self.tokens[b], self.graphs[b] = tokens, graph
        cache.reset(0, cache.slots)

    def bucket(self, n: int) -> int | None:
        i = bisect.bisect_left(self.buckets, n)
        return self.buckets[i] if i < len(self.buckets) else None

    def __call__(self, tokens: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """tokens [n, 1] -> (this rank's logits [n, V/tp], the greedy tokens [n] or None when not
        captured), or None when n exceeds every bucket. Tokens that are this bucket's own greedy
        output are already in its input (the graph wrote them there), as is a valid token in
        each padding row."""
        b = self.bucket(n)
        if b is None:
            return None
        greedy = self.greedy.get(b)
        if greedy is None or tokens.data_ptr() != greedy.data_ptr():
            self.tokens[b][:n].copy_(tokens)
            self.tokens[b][n:].zero_()
        self.graphs[b].replay()
        return self.logits[b][:n], (greedy[:n] if greedy is not None else None)


# Packed prefill graphs: total-token and sequence-count buckets. A pack's tokens are padded up to the
# token bucket by padding *sequences* (never by tokens of a real one: padding must not enter a state),
# so every real sequence runs exactly as alone; padding sequences write their states to the cache's
# scratch row. Finer token buckets waste less compute on padding, each costs one capture when first
# used.
PREFILL_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
PREFILL_SEQ_BUCKETS = (1, 2, 4, 8, 16)


class GraphedPrefill:
    """Packed prefills (fresh prompts, several lengths in one forward) replayed from CUDA graphs.

    On an H200 a short prompt's eager prefill is launch-bound: the host needs ~70 ms to launch what
    the GPU runs in ~8 ms (mamba2-2.7b, 512 tokens). A graph per (token bucket, sequence bucket),
    captured the first time a pack needs it, replays the whole forward, and writes each sequence's
    final states straight into its cache slot (an index_copy_ inside the graph)."""

    def __init__(self, model: MambaLM, cache: StateCache, token_buckets=PREFILL_TOKEN_BUCKETS,
                 seq_buckets=PREFILL_SEQ_BUCKETS):
        assert cache.scratch is not None, "graphed prefill writes padding sequences' states to a scratch row"
        self.model, self.cache = model, cache
        self.token_buckets, self.seq_buckets = tuple(sorted(token_buckets)), tuple(sorted(seq_buckets))
        self.device = model.embeddings.weight.device
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.pool = None

    @property
    def max_tokens(self) -> int:
        return self.token_buckets[-1]

    @property
    def max_seqs(self) -> int:
        return self.seq_buckets[-1]

    def shape_for(self, lengths: list[int]) -> tuple[int, int] | None:
        """(token bucket, sequence bucket) for a pack of these lengths, or None when none fits.
        Padding takes the sequence slots past len(lengths), at least one token each."""
        total, n = sum(lengths), len(lengths)
        for S in self.seq_buckets:
            pads = S - n
            if pads < 0:
                continue
            i = bisect.bisect_left(self.token_buckets, total + pads)
            if i == len(self.token_buckets):
                return None
            T = self.token_buckets[i]
            if (pads == 0) == (T == total):  # padding tokens need a padding sequence, and vice versa
                return T, S
        return None

    def __call__(self, tokens: list[int], lengths: list[int], slots: list[int]) -> torch.Tensor | None:
        """Prefill the packed prompts (`tokens` end to end, `lengths` each) from zero states into cache
        rows `slots`. Returns this rank's last-position logits [n, V/tp], or None when no bucket fits
        (the caller runs the pack eagerly)."""
        shape = self.shape_for(lengths)
        if shape is None:
            return None
        T, S = shape
        graph, io = self.graphs.get(shape) or self._capture(T, S)
        n, total = len(lengths), len(tokens)
        pad_lengths = [] if S == n else [1] * (S - n - 1) + [T - total - (S - n - 1)]
        cu = [0]
        for length in list(lengths) + pad_lengths:
            cu.append(cu[-1] + length)
        host = torch.tensor(list(tokens) + [0] * (T - total), dtype=torch.long)
        io["tokens"].copy_(host.view(1, T), non_blocking=True)
        io["cu_seqlens"].copy_(torch.tensor(cu, dtype=torch.int32), non_blocking=True)
        io["slots"].copy_(torch.tensor(list(slots) + [self.cache.scratch] * (S - n)), non_blocking=True)
        graph.replay()
        return io["logits"][:n]

    def capture_all(self) -> None:
        """Capture every (token, sequence) bucket now, largest first so that the first capture
        sizes the shared memory pool."""
        started = time.perf_counter()
        for T in sorted(self.token_buckets, reverse=True):
            for S in sorted(self.seq_buckets, reverse=True):
                if S <= T and (T, S) not in self.graphs:
                    self._capture(T, S)
        log.info("captured %d packed prefill graphs in %.1f s", len(self.graphs), time.perf_counter() - started)

    def _capture(self, T: int, S: int):
        started = time.perf_counter()
        model, cache, device = self.model, self.cache, self.device
        io = dict(tokens=torch.zeros(1, T, dtype=torch.long, device=device),
                  # a valid pack for the warm-up and capture: S sequences, none empty (T >= S)
                  cu_seqlens=torch.tensor(list(range(S)) + [T], dtype=torch.int32, device=device),
                  slots=torch.full((S,), cache.scratch, dtype=torch.long, device=device))
        def forward():
            # The packed forward reads no initial state: its states start out as scratch and are
            # then copied to the slots (padding sequences' to the scratch row). A hybrid's keys and
            # values: only the T positions a pack of T tokens can fill, not the cache's capacity.
            states = [LayerState(**{n: torch.empty(S, *kv_upto(n, t, T).shape[1:], dtype=t.dtype, device=device)
                                    for n, t in layer.items()}) for layer in cache.layers]
            logits = model(io["tokens"], states, last_only=True, cu_seqlens=io["cu_seqlens"])[:, -1]
            for layer, st in zip(cache.layers, states):
                for n, t in st.tensors().items():
                    kv_upto(n, layer[n], T).index_copy_(0, io["slots"], t)
            return logits

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: compiles and autotunes kernels at this shape
            for _ in range(2):
                forward()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            io["logits"] = forward()
        self.pool = graph.pool()
        self.graphs[(T, S)] = graph, io
        # captures happen while requests wait: their count and cost are what a first burst pays
        log.info("captured packed prefill graph %d of %d: %d tokens, %d sequences, in %.2f s",
                 len(self.graphs), len(self.token_buckets) * len(self.seq_buckets), T, S,
                 time.perf_counter() - started)
        return graph, io
