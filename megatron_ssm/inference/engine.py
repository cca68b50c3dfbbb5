"""The inference engine: requests in, tokens out, one step at a time.

A step either admits waiting requests into free state-cache slots and prefills them, or advances
every running sequence by one token (replayed from a CUDA graph on GPU). Fresh prompts of any
lengths are packed end to end into few forwards (replayed from CUDA graphs on GPU); prompts that
continue a cached prefix state, are scored, or are too long for one pack run in chunks, same-length
prompts together. Prefill can
also score prompts (`Request.prompt_logprobs`), vocab-parallel, in the same forwards. Running
sequences always occupy slots [0, n_running): a sequence that finishes hands its slot to the last
one, so decode works on a view of the cache and never copies states.

With `EngineConfig.decode_ahead`, a decode step is launched before the step before it is
delivered: its input tokens are that step's choice (argmax or draw), still on the device, so the GPU
computes step t+1 while the host reads step t's tokens and does its bookkeeping, where it would
otherwise wait on the host between replays. It is launched only when step t+1 would be the next step
anyway (no request waiting, no context-parallel prefill) and no sequence can finish by length at t; a
sequence that stops on a stop token or is aborted meanwhile has its step-t+1 token dropped (its
slot, given away, held its advanced state only until the copy that frees it).

Every TP rank runs an engine and must see the same calls in the same order (the server broadcasts
them); all its decisions are functions of those calls, so the ranks stay in step.

With a context-parallel group (cp.size > 1), a prompt of at least `context_parallel_min_tokens`
tokens is prefilled split along the sequence over the CP ranks (`long_prefill.py`), one step of
cp x prefill_chunk tokens at a time, alternating with the engine's other steps so that running
requests keep decoding; every CP rank runs the same engine, and decode runs replicated on all.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch

from ..model.lm import LayerState, MambaLM
from ..parallel import NO_CP, CPContext
from .cache import StateCache
from .long_prefill import LongPrefill
from .prefix_cache import PrefixStateCache, prefix_keys
from .sampling import SamplingParams, VocabShard, choose_tokens, vocab_parallel_logprob, vocab_parallel_topk

log = logging.getLogger(__name__)


HYBRID_DEFAULT_LENGTH = 1 << 16  # a hybrid's KV cache positions when max_sequence_length is None


def plan_packs(lengths: list[int], max_tokens: int, max_seqs: int, fits=lambda lengths: True) -> list[list[int]]:
    """Cut prompts (by length, in admission order) into packs: each pack takes the next prompt while
    it stays within max_tokens and max_seqs and `fits` (a graphed pack: a bucket holds it). A prompt
    alone always makes a pack. Returns each pack's indices into `lengths`."""
    packs: list[list[int]] = []
    for i, n in enumerate(lengths):
        if packs:
            grown = [lengths[j] for j in packs[-1]] + [n]
            if len(grown) <= max_seqs and sum(grown) <= max_tokens and fits(grown):
                packs[-1].append(i)
                continue
        packs.append([i])
    return packs


@dataclass
class EngineConfig:
    max_batch: int | None = None  # concurrent sequences; None: as many as state_memory_bytes allows
    state_memory_bytes: int = 1 << 30  # budget for the state cache when max_batch is None
    prefill_chunk: int = 2048  # tokens per prefill forward (bounds activation memory)
    max_prefill_tokens: int = 8192  # prompt tokens admitted per step, so decode is not starved
    # prompt + generated tokens. None: unbounded for a pure SSM (its state does not grow with the
    # context); a hybrid's attention layers then get a KV cache of HYBRID_DEFAULT_LENGTH positions.
    max_sequence_length: int | None = None
    pack_tokens: int = 8192  # most prompt tokens one packed prefill forward takes (0: never pack)
    # Most sequences in one graphed packed prefill (0: packs run eagerly). A graph holds the states of
    # that many sequences in its memory pool (mamba2-2.7b: 170 MB each).
    graph_prefill_seqs: int = 16
    prefix_block: int = 256  # prefix states are saved every this many tokens
    prefix_cache_bytes: int = 0  # 0 disables prefix state reuse
    cuda_graphs: bool = True  # replay decode steps and packed prefills from CUDA graphs (GPU only)
    # Capture every packed-prefill graph at start (~0.5 s each on an H200 for mamba2-2.7b, 75 of
    # them) rather than when a pack first needs one: a capture stalls every running request, so the
    # lazy default suits tests and one-off runs, and a server takes them up front.
    prefill_graphs_at_start: bool = False
    # With a context-parallel group: prompts from this many tokens are prefilled split over it. A
    # default, not a measurement: where the split starts to pay must be measured on multi-GPU
    # machines (issue #16; tools/gpu_sweep.sh SWEEP=cp).
    context_parallel_min_tokens: int = 8192
    # Launch each decode step before delivering the one before (see the module's docstring). With
    # CUDA graphs it hides the host's time between replays: -8% a step for mamba2-2.7b at batch 1,
    # -6% for falcon-mamba-7b at batch 32, -6% for nemotron-h-8b on an H200 (docs/benchmarks.md,
    # session 8). Eagerly (CPU) it gives the same tokens, which the tests check, and gains nothing.
    decode_ahead: bool = True


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int = 16
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False
    # log p(prompt[i] | prompt[:i]) for i >= 1, on the request's first TokenOutput. With it,
    # max_new_tokens may be 0: score the prompt only (one finished output, token -1).
    prompt_logprobs: bool = False
    # the k most likely tokens and their log-probs at every position that gets a log-prob above
    top_logprobs: int = 0
    # n sequences from one prompt: prefilled once, its state then copied into n - 1 more slots;
    # fork i has request id add_request(...) + i and samples with seed + i
    n: int = 1


@dataclass
class TokenOutput:
    request_id: int
    token: int  # -1 on the single output of a score-only request (max_new_tokens 0)
    logprob: float | None
    finished: bool
    finish_reason: str | None = None  # "length" | "stop" | "abort"
    prompt_logprobs: list[float] | None = None  # first output only, when the request asked for them
    top_logprobs: list[tuple[int, float]] | None = None  # (token, log-prob), best first
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None  # per prompt token 1.., with prompt_logprobs


@dataclass
class _Ahead:
    """A decode step launched before the one before it was delivered: its rows are `seqs` (the
    running sequences at launch) and its logits stay valid until the next forward."""

    seqs: list[_Sequence]
    logits: torch.Tensor
    greedy: torch.Tensor | None  # each row's argmax, when the step's graph computed it


def _to_host(*tensors: torch.Tensor | None, overlap: bool = True):
    """A function that returns the tensors as lists (None for None). overlap: device work queued
    after this call (a step launched ahead) must not delay them, so their copies start now, to pinned
    memory behind an event; otherwise the lists are read when asked for."""
    if not overlap or not any(t is not None and t.is_cuda for t in tensors):
        return lambda: [None if t is None else t.tolist() for t in tensors]
    copies = []
    for t in tensors:
        if t is not None:
            t = torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        copies.append(t)
    done = torch.cuda.Event()
    done.record()

    def wait():
        done.synchronize()
        return [None if t is None else t.tolist() for t in copies]
    return wait


@dataclass
class _Sequence:
    id: int
    req: Request
    generator: torch.Generator | None
    slot: int = -1
    generated: int = 0
    last_token: int = -1


class Engine:
    def __init__(self, model: MambaLM, config: EngineConfig | None = None, cp: CPContext | None = None):
        """cp: the context-parallel group long prompts are prefilled over (None: no CP)."""
        self.model = model
        self.cp = cp or NO_CP
        self.long: LongPrefill | None = None  # the context-parallel prefill under way, if any
        self._long_turn = False  # whether the next step is the long prefill's
        self.config = cfg = config or EngineConfig()
        self.device = model.embeddings.weight.device
        self.has_kv = getattr(model.cfg, "has_attention", False)
        # the context bound: the configured one; a hybrid's KV cache needs one even when none is set
        self.max_length = cfg.max_sequence_length
        if self.max_length is None and self.has_kv:
            self.max_length = HYBRID_DEFAULT_LENGTH
        shapes = model.state_shapes(self.max_length) if self.has_kv else model.state_shapes()
        self.bytes_per_sequence = StateCache.bytes_per_sequence(shapes, model.dtype)
        slots = cfg.max_batch or max(1, cfg.state_memory_bytes // self.bytes_per_sequence)
        graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.cache = StateCache(shapes, slots, dtype=model.dtype, device=self.device, scratch=graphs and self.packs)
        self.prefix = PrefixStateCache(cfg.prefix_block, cfg.prefix_cache_bytes)
        self.shard = VocabShard(model.vocab_start, model.cfg.vocab_size, model.tp)
        self.graphed = self.graphed_prefill = None
        if graphs:
            from .cuda_graphs import PREFILL_SEQ_BUCKETS, PREFILL_TOKEN_BUCKETS, GraphedDecode, GraphedPrefill

            self.graphed = GraphedDecode(model, self.cache, shard=self.shard)
            tokens = [t for t in PREFILL_TOKEN_BUCKETS if t <= self._pack_limit()]
            seqs = [s for s in PREFILL_SEQ_BUCKETS if s < cfg.graph_prefill_seqs] + [cfg.graph_prefill_seqs]
            if self.packs and tokens and cfg.graph_prefill_seqs > 0:
                self.graphed_prefill = GraphedPrefill(model, self.cache, tokens, seqs)
                if cfg.prefill_graphs_at_start:
                    self.graphed_prefill.capture_all()
        self.waiting: deque[_Sequence] = deque()
        self.running: list[_Sequence] = []  # running[i] occupies slot i
        self._next_id = 0
        self._prefilled_last = False
        self._ahead: _Ahead | None = None
        self._ahead_error: BaseException | None = None  # raised by a step launched ahead; step() re-raises it
        self.steps_ahead = 0  # decode steps launched ahead so far (a statistic)
        log.info("state cache: %.2f MiB per sequence on this rank, %d sequence slots",
                 self.bytes_per_sequence / 2**20, slots)

    # ---- requests ------------------------------------------------------------------------------

    def check_request(self, req: Request) -> None:
        """Raise ValueError naming what is wrong with req, if anything (what add_request refuses).
        Reads only the configuration, so any thread may call it."""
        if not req.prompt:
            raise ValueError("prompt is empty")
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt):
            raise ValueError(f"prompt holds token ids outside [0, {vocab})")
        least = 0 if req.prompt_logprobs else 1  # 0: score the prompt only
        if req.max_new_tokens < least:
            raise ValueError(f"max_new_tokens must be >= {least}, got {req.max_new_tokens}")
        if not 1 <= req.n <= self.cache.slots:
            raise ValueError(f"n must be in [1, {self.cache.slots}] (the sequence slots), got {req.n}")
        if req.n > 1 and req.max_new_tokens == 0:
            raise ValueError("n > 1 needs new tokens (max_new_tokens >= 1)")
        if req.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {req.top_logprobs}")
        limit = self.max_length
        if limit is not None and len(req.prompt) + req.max_new_tokens > limit:
            kv = " (the length of the attention layers' KV cache)" if self.has_kv else ""
            raise ValueError(f"prompt ({len(req.prompt)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds "
                             f"the context budget of {limit} tokens{kv}")
        req.sampling.validate()

    def add_request(self, req: Request) -> int:
        """Queue a request; returns its id. Raises ValueError naming what is wrong with it."""
        self.check_request(req)
        gen = None
        if not req.sampling.greedy:
            gen = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        seq = _Sequence(self._next_id, req, gen)
        self._next_id += req.n  # forks take the ids after it
        self.waiting.append(seq)
        return seq.id

    def abort(self, request_id: int) -> bool:
        """Drop a request wherever it is; True if it was found. A waiting request with n > 1 goes
        when any of its ids is aborted (it has not forked yet)."""
        for seq in self.waiting:
            if seq.id <= request_id < seq.id + seq.req.n:
                self.waiting.remove(seq)
                return True
        for seq in self.running:
            if seq.id == request_id:
                self._release(seq)
                return True
        if self.long is not None and self.long.seq.id <= request_id < self.long.seq.id + self.long.seq.req.n:
            self.long = None
            return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.long)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.long is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[TokenOutput]:
        """Prefill newly admitted requests (giving their first tokens) if any were admitted;
        otherwise advance every running sequence by one token. A context-parallel prefill under
        way takes every other step (every step when nothing else runs). A decode step launched ahead
        is delivered first."""
        if self._ahead_error is not None:
            error, self._ahead_error = self._ahead_error, None
            raise error
        if self._ahead is not None:
            return self._decode(len(self.running))
        if self.long is not None and (self._long_turn or not self.running):
            self._long_turn = False
            return self._advance_long()
        self._long_turn = True
        # After a prefill, sequences that are already generating get a decode step before the next
        # admission, so a queue of long prompts cannot hold them back for good.
        if self._prefilled_last and self.running:
            self._prefilled_last = False
            return self._decode(len(self.running))
        admitted = self._admit()
        if admitted:
            self._prefilled_last = True
            return self._prefill(admitted)
        if self.running:
            return self._decode(len(self.running))
        return []

    def _admit(self) -> list[_Sequence]:
        budget = self.config.max_prefill_tokens
        admitted = []
        forks = 0  # slots that admitted requests' forks will take once prefilled
        # slots held for the context-parallel prefill under way (its sequence and its forks)
        reserved = self.long.seq.req.n if self.long is not None else 0
        i = 0  # waiting[:i]: long prompts waiting for the context-parallel prefill under way
        while i < len(self.waiting) and len(self.running) + reserved + forks + self.waiting[i].req.n <= self.cache.slots:
            seq = self.waiting[i]
            if self._context_parallel(seq):
                if self.long is None:  # its slot (the cache's last) stays reserved until it joins `running`
                    del self.waiting[i]
                    self.long = LongPrefill.start(seq, self.cache, self.prefix)
                    reserved = seq.req.n
                else:  # one at a time; shorter prompts behind it go ahead
                    i += 1
                continue
            n = len(seq.req.prompt)
            if admitted and n > budget:
                break
            del self.waiting[i]
            seq.slot = len(self.running)
            self.running.append(seq)
            admitted.append(seq)
            forks += seq.req.n - 1
            budget -= n
        return admitted

    def _context_parallel(self, seq: _Sequence) -> bool:
        """Whether seq's prompt is prefilled split over the CP group. Prompt scoring needs every
        position's logits, which the split path does not gather: such requests take the plain one."""
        return (self.cp.size > 1 and self.model.supports_context_parallel and not seq.req.prompt_logprobs
                and len(seq.req.prompt) >= max(self.config.context_parallel_min_tokens, 1))

    def _advance_long(self) -> list[TokenOutput]:
        """One step of the context-parallel prefill; when the prompt is done, its sequence joins
        the running batch (in the slot after the running ones), forks if it asked for n > 1, and
        gets its first token(s)."""
        job = self.long
        chunk = max(1, min(self.config.prefill_chunk, self.model.max_tokens_per_forward()))
        logits = job.advance(self.model, self.cp, chunk, self.prefix)
        if not job.done:
            return []
        self.long = None
        seq = job.seq
        seq.slot = len(self.running)
        self.running.append(seq)
        if seq.slot != job.slot:
            self.cache.copy_slot(job.slot, seq.slot, len(seq.req.prompt))
        forks, rows = self._fork([seq])
        if forks:
            logits = logits[[0] + rows]
        return self._emit([seq] + forks, logits)

    @property
    def packs(self) -> bool:
        """Whether fresh prompts are prefilled packed (every layer kind of the model restarts at
        packed sequence boundaries)."""
        return getattr(self.model, "packs_sequences", False) and self.config.pack_tokens > 0

    def _packable(self, seq: _Sequence) -> bool:
        """A prompt prefilled in a pack: from a zero state, in one forward, with only its last
        logits needed and no prefix state to save on the way."""
        n = len(seq.req.prompt)
        return (self.packs and not seq.req.prompt_logprobs and n <= self._pack_limit()
                and (not self.prefix.enabled or n - 1 < self.config.prefix_block))

    def _pack_limit(self) -> int:
        """Most tokens in one packed forward: the configured pack size, within the kernels' 32-bit
        activation offsets."""
        return min(self.config.pack_tokens, self.model.max_tokens_per_forward())

    def _fork(self, group: list[_Sequence]) -> tuple[list[_Sequence], list[int]]:
        """Copy each prefilled sequence's state into a new slot per extra fork (request n > 1).
        Returns the forks and, for each, the row of its parent in group."""
        forks, rows = [], []
        for row, seq in enumerate(group):
            for i in range(1, seq.req.n):
                gen = None
                if seq.generator is not None:
                    gen = torch.Generator(device=self.device).manual_seed(seq.req.sampling.seed + i)
                child = _Sequence(seq.id + i, seq.req, gen, slot=len(self.running))
                self.cache.copy_slot(seq.slot, child.slot, self._kv_bound([seq]))  # SSM states and KV rows
                self.running.append(child)
                forks.append(child)
                rows.append(row)
        return forks, rows

    def _prefill(self, seqs: list[_Sequence]) -> list[TokenOutput]:
        """Prefill admitted sequences: fresh prompts packed, the rest grouped so each forward runs
        equal-length token blocks."""
        packed = [s for s in seqs if self._packable(s)]
        outputs = self._prefill_packed(packed) if packed else []
        groups: dict[tuple[int, int], list[_Sequence]] = {}
        for seq in seqs:
            if packed and seq in packed:
                continue
            # Prompt log-probs need the logits of every prompt position, which a cached prefix state
            # skips: such requests never start from one (they still save the states they pass).
            start, saved = (0, None) if seq.req.prompt_logprobs else self.prefix.lookup(seq.req.prompt)
            self.cache.reset(seq.slot, seq.slot + 1)
            if saved is not None:
                self.cache.load(seq.slot, saved)
            groups.setdefault((len(seq.req.prompt), start), []).append(seq)
        for (length, start), group in groups.items():
            # Requests admitted together sit in consecutive slots: prefill those in place (a view of
            # the cache); only a group scattered over the cache is gathered and written back.
            first = group[0].slot
            contiguous = [s.slot for s in group] == list(range(first, first + len(group)))
            slots = None if contiguous else torch.tensor([s.slot for s in group], device=self.device)
            states = self.cache.rows(first, first + len(group)) if contiguous else self.cache.gather(slots)
            tokens = torch.tensor([s.req.prompt for s in group], device=self.device)
            score = [row for row, s in enumerate(group) if s.req.prompt_logprobs]
            top = max((group[row].req.top_logprobs for row in score), default=0)
            logits, scored, scored_top = self._prefill_tokens(tokens, start, states, [s.req.prompt for s in group],
                                                              score, top)
            if not contiguous:
                self.cache.scatter(slots, states)
            forks, rows = self._fork(group)
            if forks:
                logits = logits[list(range(len(group))) + rows]
            outputs += self._emit(group + forks, logits, dict(zip(score, scored)), dict(zip(score, scored_top)))
        return outputs

    def _prefill_packed(self, seqs: list[_Sequence]) -> list[TokenOutput]:
        """Fresh prompts end to end in as few forwards as the pack limits allow, each replayed from a
        CUDA graph where one fits (else eager). Their states are written whole: no reset needed."""
        graphed = self.graphed_prefill
        lengths = [len(s.req.prompt) for s in seqs]
        if graphed:
            groups = plan_packs(lengths, graphed.max_tokens, graphed.max_seqs, lambda p: graphed.shape_for(p) is not None)
        else:
            groups = plan_packs(lengths, self._pack_limit(), len(seqs))
        logits = []
        for pack in ([seqs[i] for i in group] for group in groups):
            lengths = [len(s.req.prompt) for s in pack]
            tokens = [t for s in pack for t in s.req.prompt]
            out = graphed(tokens, lengths, [s.slot for s in pack]) if graphed else None
            if out is None:
                out = self._prefill_pack_eager(pack, tokens, lengths)
            logits.append(out)
        logits = torch.cat(logits) if len(logits) > 1 else logits[0]
        forks, rows = self._fork(seqs)
        if forks:
            logits = logits[list(range(len(seqs))) + rows]
        return self._emit(seqs + forks, logits)

    def _prefill_pack_eager(self, pack: list[_Sequence], tokens: list[int], lengths: list[int]) -> torch.Tensor:
        from ..ops.varlen import cu_seqlens_of

        first = pack[0].slot
        contiguous = [s.slot for s in pack] == list(range(first, first + len(pack)))
        slots = None if contiguous else torch.tensor([s.slot for s in pack], device=self.device)
        longest = max(lengths)  # the keys/values a pack writes: none past its longest prompt
        states = (self.cache.rows(first, first + len(pack), longest) if contiguous
                  else self.cache.gather(slots, longest))
        ids = torch.tensor(tokens, device=self.device).view(1, -1)
        logits = self.model(ids, states, last_only=True, cu_seqlens=cu_seqlens_of(lengths, self.device))[:, -1]
        if not contiguous:
            self.cache.scatter(slots, states)
        return logits

    def _prefill_tokens(self, tokens: torch.Tensor, start: int, states: list[LayerState], prompts: list[list[int]],
                        score: list[int], top: int = 0) -> tuple[torch.Tensor, list[list[float]], list[list]]:
        """Run tokens[:, start:] through the model in chunks that end on prefix-block boundaries,
        saving the states reached there. Returns the last position's local logits [b, V/tp] and,
        for each row in `score`, the prompt's log-probs (tokens 1..L-1).

        Rows to score need every position's logits, so a group holding one computes them all
        (start is then 0: such rows skip the prefix cache). A chunk's position p predicts token
        p+1, so its last position predicts the next chunk's first token: each chunk scores the
        tokens after its own positions, up to the prompt's last. With top > 0, also each scored
        position's `top` most likely tokens as (id, log-prob) pairs."""
        L = tokens.shape[1]
        block = self.config.prefix_block
        # A long chunk of a large batch can pass the kernels' 32-bit indexing (an illegal memory
        # access in mamba-ssm's SSD scan at 32 x 4096 tokens of a 7B model): shorten it then.
        fits = max(1, self.model.max_tokens_per_forward(bool(score)) // tokens.shape[0])
        chunk = min(self.config.prefill_chunk, fits)
        keys = [dict(prefix_keys(p[:-1], block)) for p in prompts] if self.prefix.enabled else None
        assert not score or start == 0
        parts, top_parts = [], []
        pos = start
        while pos < L:
            end = min(L, pos + chunk)
            if keys is not None:
                end = min(end, (pos // block + 1) * block)  # stop on each block boundary to save it
            # keys/values beyond `end` are neither read nor written by this chunk; every row of the
            # group holds `pos` positions before it
            logits = self.model(tokens[:, pos:end], [s.upto(end, pos) for s in states], last_only=not score)
            n = min(end, L - 1) - pos  # positions pos..pos+n-1 predict prompt tokens pos+1..pos+n
            if score and n > 0:
                local = logits[score, :n].reshape(len(score) * n, -1)
                parts.append(vocab_parallel_logprob(local, tokens[score, pos + 1:pos + 1 + n].reshape(-1),
                                                    self.shard).view(len(score), n))
                if top:
                    vals, ids = vocab_parallel_topk(local, top, self.shard)
                    top_parts.append((vals.view(len(score), n, -1), ids.view(len(score), n, -1)))
            pos = end
            if keys is not None and pos in keys[0]:
                for row, k in enumerate(keys):
                    self.prefix.save(k[pos], states, row, pos)
        scored = torch.cat(parts, 1).tolist() if parts else [[] for _ in score]
        scored_top = [[] for _ in score]
        if top_parts:
            vals = torch.cat([v for v, _ in top_parts], 1).tolist()
            ids = torch.cat([i for _, i in top_parts], 1).tolist()
            scored_top = [[list(zip(i, v)) for i, v in zip(ri, rv)] for ri, rv in zip(ids, vals)]
        return logits[:, -1], scored, scored_top

    def _decode(self, n: int) -> list[TokenOutput]:
        if self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            rows = [i for i, s in enumerate(ahead.seqs) if s.slot >= 0]  # not stopped or aborted since
            if not rows:
                return []
            logits, greedy = ahead.logits, ahead.greedy
            if len(rows) < len(ahead.seqs):
                logits, greedy = logits[rows], (greedy[rows] if greedy is not None else None)
            return self._emit([ahead.seqs[i] for i in rows], logits, decode=True, greedy=greedy)
        tokens = torch.tensor([s.last_token for s in self.running], device=self.device).view(n, 1)
        logits, greedy = self._decode_logits(tokens, n)
        return self._emit(list(self.running), logits, decode=True, greedy=greedy)

    def _decode_logits(self, tokens: torch.Tensor, n: int, ahead: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One decode step of running[:n] fed tokens [n, 1] -> (local logits, each row's greedy
        token where the step's graph computed it, else None); ahead: 1 when the step before it is
        not yet delivered (the sequences' counts are one token behind)."""
        # A graph steps every row of its bucket, [0, bucket): one reaching the slot of a context-parallel
        # prefill under way would advance that prompt's half-built states, so such steps run eagerly.
        graphed = self.graphed is not None and (self.long is None or (self.graphed.bucket(n) or 0) <= self.long.slot)
        out = self.graphed(tokens, n) if graphed else None
        if out is None:
            out = self.model(tokens, self.cache.rows(0, n, self._kv_bound(self.running, ahead)))[:, -1], None
        return out

    def _can_run_ahead(self, seqs: list[_Sequence]) -> bool:
        """Whether the step after the one being delivered may start now: it would be the engine's
        next step (the same sequences, nothing to admit, no context-parallel prefill) and no row
        finishes by length now. Its tokens, greedy or sampled, are already on the device (a sampled
        row's generator is drawn in step order either way)."""
        return (self.config.decode_ahead and bool(seqs) and len(seqs) == len(self.running)
                and all(s is r for s, r in zip(seqs, self.running)) and self.long is None and not self.waiting
                and all(s.generated + 1 < s.req.max_new_tokens for s in seqs))

    def _emit(self, seqs: list[_Sequence], logits: torch.Tensor, prompt_lps: dict[int, list[float]] | None = None,
              prompt_top: dict[int, list] | None = None, decode: bool = False,
              greedy: torch.Tensor | None = None) -> list[TokenOutput]:
        """One token per sequence from its logits (row i for seqs[i]); prompt_lps (prompt_top): row ->
        the prompt log-probs (top alternatives) to deliver with that row's first output. decode: a
        decode step's, after which the next one may be launched ahead. greedy: the rows' argmax
        when the step computed it."""
        tokens, logprobs = choose_tokens(logits, [s.req.sampling for s in seqs], [s.generator for s in seqs],
                                         [s.req.logprobs for s in seqs], self.shard, greedy)
        k = max((s.req.top_logprobs for s in seqs if s.req.logprobs and s.req.max_new_tokens), default=0)
        vals = ids = None
        if k:
            vals, ids = vocab_parallel_topk(logits, k, self.shard)
        # Everything read from these logits is queued before the next step may overwrite them.
        ahead = decode and self._can_run_ahead(seqs)
        delivered = _to_host(tokens, logprobs, ids, vals, overlap=ahead)
        if ahead:
            try:
                self._ahead = _Ahead(list(seqs), *self._decode_logits(tokens.view(-1, 1), len(seqs), ahead=1))
                self.steps_ahead += 1
            except Exception as e:  # noqa: BLE001 - this step's tokens are computed: deliver them, then raise
                self._ahead_error = e
        tokens, logprobs, ids, vals = delivered()
        logprobs = logprobs if logprobs is not None else [None] * len(seqs)
        tops = [None] * len(seqs)
        if k:
            tops = [list(zip(i, v))[:s.req.top_logprobs] or None for s, i, v in zip(seqs, ids, vals)]
        prompt_lps, prompt_top = prompt_lps or {}, prompt_top or {}
        outputs = []
        for row, (seq, tok, lp) in enumerate(zip(seqs, tokens, logprobs)):
            if seq.req.max_new_tokens == 0:  # score only: the token chosen here is not part of it
                tok, lp, reason = -1, None, "length"
            else:
                seq.generated += 1
                reason = ("stop" if tok in seq.req.stop_ids else
                          "length" if seq.generated >= seq.req.max_new_tokens else None)
            seq.last_token = tok
            top = tops[row] if seq.req.logprobs and tok >= 0 else None
            outputs.append(TokenOutput(seq.id, tok, lp if seq.req.logprobs else None, reason is not None, reason,
                                       prompt_lps.get(row), top,
                                       [t[:seq.req.top_logprobs] for t in prompt_top[row]]
                                       if row in prompt_top and seq.req.top_logprobs else None))
            if reason is not None:
                self._release(seq)
        return outputs

    def _release(self, seq: _Sequence) -> None:
        """Free seq's slot by moving the last running sequence into it (one sequence's state copy,
        queued after any step launched ahead, so the state moved is the advanced one)."""
        last = self.running.pop()
        if last is not seq:
            self.cache.copy_slot(last.slot, seq.slot, self._kv_bound([last], int(self._ahead is not None)))
            last.slot = seq.slot
            self.running[seq.slot] = last
        seq.slot = -1
        if not self.running:
            self._ahead = None

    def _kv_bound(self, seqs: list[_Sequence], ahead: int = 0) -> int | None:
        """Positions the next decode step of `seqs` touches: its cached tokens plus the one it feeds
        (known on the host, so no sync), plus `ahead` steps not yet counted. None for models
        without attention."""
        if not self.has_kv:
            return None
        return min(max(len(s.req.prompt) + max(s.generated, 1) for s in seqs) + ahead, self.max_length)

    # ---- convenience ---------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> list[list[int]]:
        """Run requests to completion; generated token ids per request, in order."""
        ids = [self.add_request(r) for r in requests]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while self.has_work():
            for o in self.step():
                if o.token >= 0:
                    out[o.request_id].append(o.token)
        return [out[i] for i in ids]
