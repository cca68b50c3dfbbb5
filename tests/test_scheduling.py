"""The engine's scheduling (admission budget, slots, aborts, stops, prefix reuse) on a stand-in model
whose next token has a closed form, so every request's tokens are known without running a network.

The stand-in is a one-number state machine: each token t moves a sequence's state s to
(7 s + t + 3) mod V, and the logits put their maximum on the new state. So greedy decoding of a
prompt continues with tokens computable in a few lines (`expected`), whatever batch, slot, chunk
or cached prefix the engine ran it in; a scheduling bug that mixes up two sequences' states, skips a
token or replays one changes the tokens. In-process and single-rank: seconds, no gloo pool (the
real model's scheduling at TP 1, 2, 4 is in test_engine.py).

Two variants reach what the plain stand-in cannot: `KVModel` keeps the context in an attention-like
KV cache (a hybrid's KV rows, their copy bounds, the KV-cache budget), and `CPModel` sits behind a
context-parallel group of 2 without a process group, recording the split each forward was asked
for (the long-prompt prefill's scheduling; its numerics are test_context_parallel.py's).
"""
from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch
import torch.nn as nn

from megatron_ssm.inference.engine import Engine, EngineConfig, Request
from megatron_ssm.inference.prefix_cache import PrefixStateCache, prefix_keys
from megatron_ssm.inference.sampling import SamplingParams
from megatron_ssm.model.lm import LayerState
from megatron_ssm.parallel import CPContext, TPContext

V = 61


def step_state(s: int, t: int) -> int:
    return (7 * s + t + 3) % V


def expected(prompt: list[int], n: int, stop: tuple[int, ...] = ()) -> list[int]:
    """Greedy continuation of `prompt` by the stand-in model, n tokens or up to a stop id."""
    s = 0
    for t in prompt:
        s = step_state(s, t)
    out = []
    while len(out) < n:
        out.append(s)  # the logits' maximum is the state after the last token
        if s in stop:
            break
        s = step_state(s, s)
    return out


class CountingModel(nn.Module):
    """The stand-in model, with the interface the engine uses. Records every forward's input shape."""

    def __init__(self):
        super().__init__()
        self.cfg = type("Cfg", (), {"vocab_size": V, "has_attention": False})()
        self.embeddings = nn.Embedding(1, 1)
        self.dtype = torch.float32
        self.vocab_start = 0
        self.tp = TPContext(group=None, rank=0, size=1, device=torch.device("cpu"))
        self.layers = []
        self.calls: list[tuple[int, int]] = []

    def state_shapes(self, max_length: int = 0):
        return [((1, 1), (1,))]  # conv state unused; the SSM state holds s

    def max_tokens_per_forward(self, all_logits: bool = False) -> int:
        return 1 << 20

    def forward(self, input_ids, states=None, last_only=False):
        b, L = input_ids.shape
        self.calls.append((b, L))
        s = states[0].ssm[:, 0].long() if states is not None else torch.zeros(b, dtype=torch.long)
        logits = torch.zeros(b, L, V)
        for t in range(L):
            s = (7 * s + input_ids[:, t] + 3) % V
            logits[torch.arange(b), t, s] = 5.0
        if states is not None:
            states[0].ssm[:, 0] = s.float()
        return logits[:, -1:] if last_only else logits


def _engine(**cfg) -> Engine:
    return Engine(CountingModel(), EngineConfig(**{"max_batch": 4, **cfg}))


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def _run(eng: Engine, log: list | None = None) -> dict[int, list]:
    """Step until idle: {request id: [TokenOutput, ...]}; `log` gets (running, waiting) after each step."""
    outs: dict[int, list] = {}
    while eng.has_work():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
        if log is not None:
            log.append((eng.num_running, eng.num_waiting))
    return outs


def test_the_stand_in_model_is_what_expected_computes(seed):
    """The reference the other tests use, checked once against the stand-in run by hand."""
    model, prompt = CountingModel(), _prompts(seed, (7,))[0]
    ids, toks = list(prompt), []
    for _ in range(5):
        toks.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        ids.append(toks[-1])
    assert toks == expected(prompt, 5), seed


@pytest.mark.parametrize("max_batch,chunk", [(1, 2048), (2, 2048), (3, 3), (8, 1)])
def test_every_request_gets_its_own_continuation(seed, max_batch, chunk):
    prompts = _prompts(seed, (5, 1, 9, 5, 3, 12, 2))
    news = [4, 7, 1, 3, 6, 2, 5]
    eng = _engine(max_batch=max_batch, prefill_chunk=chunk)
    got = eng.generate([Request(p, n) for p, n in zip(prompts, news)])
    assert got == [expected(p, n) for p, n in zip(prompts, news)], f"seed {seed}"
    assert max(b for b, _ in eng.model.calls) <= max_batch
    assert max(L for _, L in eng.model.calls) <= chunk


def test_finish_reasons_and_stop_ids(seed):
    prompt = _prompts(seed, (6,))[0]
    full = expected(prompt, 6)
    stop = full[3]
    first = full.index(stop)  # the stop token may come earlier than the 4th
    eng = _engine()
    a = eng.add_request(Request(prompt, 6, stop_ids=(stop,)))
    b = eng.add_request(Request(prompt, 6))
    outs = _run(eng)
    assert [o.token for o in outs[a]] == full[:first + 1], seed
    assert [o.finished for o in outs[a]] == [False] * first + [True]
    assert outs[a][-1].finish_reason == "stop"
    assert [o.token for o in outs[b]] == full and outs[b][-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outs[b][:-1])


def test_logprobs_are_the_chosen_tokens_log_softmax(seed):
    prompt = _prompts(seed, (4,))[0]
    eng = _engine()
    rid = eng.add_request(Request(prompt, 3, logprobs=True))
    plain = eng.add_request(Request(prompt, 3))
    outs = _run(eng)
    # logits: 5 at the chosen token, 0 at the other V - 1
    want = 5.0 - torch.log(torch.exp(torch.tensor(5.0)) + (V - 1)).item()
    assert all(abs(o.logprob - want) < 1e-5 for o in outs[rid]), [o.logprob for o in outs[rid]]
    assert all(o.logprob is None for o in outs[plain])


# ---- admission: the prefill token budget and the slots -------------------------------------------------

def test_max_prefill_tokens_bounds_what_one_step_admits(seed):
    """Budget 10, prompts of 6, 4, 3, 9 and 12 tokens: step 1 admits 6 + 4 (exactly the budget), step 2
    admits 3 (9 more would pass it), step 3 the 9, step 4 the 12, alone, although it is over the budget."""
    lengths = (6, 4, 3, 9, 12)
    prompts = _prompts(seed, lengths)
    eng = _engine(max_batch=8, max_prefill_tokens=10)
    ids = [eng.add_request(Request(p, 30)) for p in prompts]
    admitted = []
    while eng.num_waiting:
        before = eng.num_waiting
        eng.step()
        admitted.append(before - eng.num_waiting)
    # steps that admit nothing are decode steps (one follows each prefill, so decode is not starved)
    assert [a for a in admitted if a] == [2, 1, 1, 1], admitted
    # each prefill ran only the prompts it admitted, grouped by length
    assert [c for c in eng.model.calls if c[1] > 1] == [(1, 6), (1, 4), (1, 3), (1, 9), (1, 12)], eng.model.calls
    outs = _run(eng)
    for rid, p in zip(ids, prompts):
        assert [o.token for o in outs[rid]] == expected(p, 30)[-len(outs[rid]):], f"seed {seed}"


def test_admission_waits_for_a_free_slot(seed):
    prompts = _prompts(seed, (3, 3, 3))
    eng = _engine(max_batch=2)
    for p, n in zip(prompts, (2, 4, 2)):
        eng.add_request(Request(p, n))
    log: list = []
    outs = _run(eng, log)
    # (running, waiting) after each step: two run, the first finishes at step 2, the third starts at 3
    assert log[:3] == [(2, 1), (1, 1), (2, 0)], log
    assert [[o.token for o in outs[i]] for i in range(3)] == [expected(p, n) for p, n in zip(prompts, (2, 4, 2))]


# ---- aborts ------------------------------------------------------------------------------------------

def test_abort_a_waiting_request(seed):
    prompts = _prompts(seed, (4, 5, 6))
    eng = _engine(max_batch=1)
    a = eng.add_request(Request(prompts[0], 3))
    b = eng.add_request(Request(prompts[1], 3))
    c = eng.add_request(Request(prompts[2], 3))
    first = eng.step()  # a runs, b and c wait
    assert (eng.num_running, eng.num_waiting) == (1, 2)
    assert eng.abort(b) and not eng.abort(b) and not eng.abort(12345)
    assert (eng.num_running, eng.num_waiting) == (1, 1)
    outs = _run(eng)
    assert b not in outs
    assert [o.token for o in first + outs[a]] == expected(prompts[0], 3)
    assert [o.token for o in outs[c]] == expected(prompts[2], 3), f"seed {seed}"


def test_abort_a_running_request_keeps_the_others_states(seed):
    """Aborting the first of three running sequences moves the last into its slot: both survivors
    must go on from their own states."""
    prompts = _prompts(seed, (4, 7, 2))
    eng = _engine(max_batch=3)
    ids = [eng.add_request(Request(p, 6)) for p in prompts]
    got = {i: [] for i in ids}
    for _ in range(3):
        for o in eng.step():
            got[o.request_id].append(o.token)
    assert eng.abort(ids[0]) and eng.num_running == 2
    for rid, outs in _run(eng).items():
        got[rid] += [o.token for o in outs]
    assert got[ids[0]] == expected(prompts[0], 6)[:3]
    assert got[ids[1]] == expected(prompts[1], 6) and got[ids[2]] == expected(prompts[2], 6), f"seed {seed}"


# ---- prefix reuse ---------------------------------------------------------------------------------------

def test_prefix_hits_start_from_the_saved_state(seed):
    shared = _prompts(seed, (10,))[0]
    tails = _prompts(seed + 1, (3, 1, 5))
    eng = _engine(prefix_block=4, prefix_cache_bytes=1 << 20, prefill_chunk=64)
    outs = [eng.generate([Request(shared + t, 4)])[0] for t in tails]
    assert outs == [expected(shared + t, 4) for t in tails], f"seed {seed}"
    assert eng.prefix.hits == 2 and eng.prefix.misses == 1
    # the 2nd and 3rd prompts (11 and 15 tokens) ran only their tokens after the 8 cached ones (to the
    # block boundary at 12, then on)
    assert [L for b, L in eng.model.calls if L > 1][-3:] == [3, 4, 3], eng.model.calls


def _state(v: float) -> list[LayerState]:
    return [LayerState(torch.full((1, 2, 3), v), torch.full((1, 4), v))]


ENTRY_BYTES = (2 * 3 + 4) * 4  # one entry of _state: conv [2, 3] and ssm [4], fp32


def test_prefix_cache_evicts_the_least_recently_used():
    cache = PrefixStateCache(block=2, capacity_bytes=2 * ENTRY_BYTES)
    prompts = {name: [i, i + 1, 99] for i, name in enumerate("abcd")}  # each: one 2-token prefix
    key = {name: prefix_keys(p, 2)[0][1] for name, p in prompts.items()}
    cache.save(key["a"], _state(1.0), 0)
    cache.save(key["b"], _state(2.0), 0)
    assert cache.used == 2 * ENTRY_BYTES
    length, state = cache.lookup(prompts["a"])  # a is now the most recently used
    assert length == 2 and state[0].ssm.eq(1.0).all()
    cache.save(key["c"], _state(3.0), 0)  # evicts b, not a
    assert cache.used == 2 * ENTRY_BYTES
    assert cache.lookup(prompts["b"]) == (0, None)
    assert cache.lookup(prompts["a"])[1][0].conv.eq(1.0).all()
    assert cache.lookup(prompts["c"])[1][0].conv.eq(3.0).all()
    cache.save(key["c"], _state(9.0), 0)  # already there: kept as it was
    assert cache.lookup(prompts["c"])[1][0].conv.eq(3.0).all()
    assert (cache.hits, cache.misses) == (4, 1)


def test_prefix_cache_limits():
    small = PrefixStateCache(block=2, capacity_bytes=ENTRY_BYTES - 1)
    key = prefix_keys([1, 2], 2)[0][1]
    small.save(key, _state(1.0), 0)  # larger than the whole cache: not kept
    assert small.used == 0 and small.lookup([1, 2, 3]) == (0, None)
    off = PrefixStateCache(block=2, capacity_bytes=0)
    off.save(key, _state(1.0), 0)
    assert not off.enabled and off.lookup([1, 2, 3]) == (0, None)
    cache = PrefixStateCache(block=2, capacity_bytes=10 * ENTRY_BYTES)
    cache.save(key, _state(1.0), 0)
    assert cache.lookup([1, 2]) == (0, None)  # the whole prompt: its last token must still run
    assert cache.lookup([1, 2, 5])[0] == 2
    saved = _state(4.0)
    cache.save(prefix_keys([7, 7], 2)[0][1], [LayerState(torch.cat([saved[0].conv, -saved[0].conv]),
                                                         torch.cat([saved[0].ssm, -saved[0].ssm]))], 1)
    assert cache.lookup([7, 7, 1])[1][0].ssm.eq(-4.0).all()  # row 1 of the batch was kept
    with pytest.raises(ValueError, match="block"):
        PrefixStateCache(block=0, capacity_bytes=1)


def test_prefix_keys_are_cumulative_digests():
    keys = prefix_keys([1, 2, 3, 4, 5], 2)
    assert [n for n, _ in keys] == [2, 4]
    assert keys[0][1] == prefix_keys([1, 2, 9], 2)[0][1]
    assert keys[1][1] != prefix_keys([9, 9, 3, 4], 2)[1][1]  # the digest covers the whole prefix
    assert prefix_keys([1], 2) == []


def test_prefix_keys_are_digests_of_the_whole_prefix(seed):
    """Each key is BLAKE2b-128 of the prefix's tokens as int64 bytes, from the first token (hashed
    here in one go, where prefix_keys streams it block by block)."""
    tokens = _prompts(seed, (11,))[0]
    want = [(end, hashlib.blake2b(struct.pack(f"={end}q", *tokens[:end]), digest_size=16).digest())
            for end in (3, 6, 9)]
    assert prefix_keys(tokens, 3) == want, seed
    assert prefix_keys(tokens[:9], 3) == want and prefix_keys(tokens[:8], 3) == want[:2]
    assert prefix_keys(tokens, 1)[-1] == (11, hashlib.blake2b(struct.pack("=11q", *tokens), digest_size=16).digest())


def test_prefix_lookup_takes_the_longest_saved_prefix_short_of_the_prompt(seed):
    """Entries at 2 and 4 tokens: a 6- or 5-token prompt starts from 4, a 4-token one from 2 (its last
    token must run), a 2-token one from nothing; every lookup counts as one hit or one miss."""
    tokens = _prompts(seed, (6,))[0]
    cache = PrefixStateCache(block=2, capacity_bytes=10 * ENTRY_BYTES)
    for (end, key), v in zip(prefix_keys(tokens, 2)[:2], (2.0, 4.0)):
        cache.save(key, _state(v), 0)
    for prompt, want in ((tokens, 4), (tokens[:5], 4), (tokens[:4], 2), (tokens[:3], 2), (tokens[:2], 0)):
        length, state = cache.lookup(prompt)
        assert length == want, (len(prompt), length, seed)
        assert (state is None) if want == 0 else state[0].ssm.eq(float(want)).all()
    assert cache.lookup([t + 1 for t in tokens]) == (0, None)
    assert (cache.hits, cache.misses) == (4, 2)


def test_prefix_cache_keeps_one_row_with_its_keys_values_cut_to_the_prefix():
    """A hybrid's entry: row `row` of a batch of 2, conv/ssm whole, keys/values cut to the prefix's
    length; a copy (the batch may change afterwards); its bytes counted exactly."""
    mamba = LayerState(torch.arange(12.0).view(2, 2, 3), torch.arange(8.0).view(2, 4))
    attn = LayerState(k=torch.arange(40.0).view(2, 10, 1, 2), v=-torch.arange(40.0).view(2, 10, 1, 2),
                      length=torch.tensor([6, 6]))
    want_bytes = (2 * 3 + 4) * 4 + 2 * (6 * 2) * 4 + 8
    cache = PrefixStateCache(block=2, capacity_bytes=want_bytes)  # exactly one entry fits
    key = prefix_keys([5, 6], 2)[0][1]
    cache.save(key, [mamba, attn], 0, 6)
    assert cache.used == want_bytes
    mamba.ssm += 100
    attn.k += 100
    _, (m, a) = cache.lookup([5, 6, 7])
    assert m.conv.tolist() == [[[0, 1, 2], [3, 4, 5]]] and m.ssm.tolist() == [[0, 1, 2, 3]]
    assert a.k.shape == (1, 6, 1, 2) and a.k.flatten().tolist() == list(range(12))
    assert a.v.flatten().tolist() == [-float(i) for i in range(12)] and a.length.tolist() == [6]
    cache.save(prefix_keys([9, 9], 2)[0][1], [mamba, attn], 1, 6)  # evicts the first
    assert cache.used == want_bytes and cache.lookup([5, 6, 7]) == (0, None)
    _, (m, a) = cache.lookup([9, 9, 7])
    assert m.ssm.tolist() == [[104, 105, 106, 107]] and a.k.flatten().tolist() == [100.0 + i for i in range(20, 32)]


def test_state_cache_gathers_keys_values_up_to_a_length_and_scatters_them_back():
    """A packed prefill of scattered slots copies only the positions it can write: keys/values cut to
    kv_length, the other states whole; scatter writes that prefix back and leaves the rest."""
    from megatron_ssm.inference.cache import StateCache

    shapes = [{"conv": ((2, 3), None), "ssm": ((4,), torch.float32)},
              {"k": ((10, 1, 2), None), "v": ((10, 1, 2), None), "length": ((), torch.int64)}]
    cache = StateCache(shapes, 4, dtype=torch.float32, device=torch.device("cpu"))
    for layer in cache.layers:
        for t in layer.values():
            t.copy_(torch.arange(t.numel()).view_as(t))
    before = [{n: t.clone() for n, t in layer.items()} for layer in cache.layers]
    slots = torch.tensor([3, 1])
    mamba, attn = cache.gather(slots, kv_length=4)
    assert mamba.conv.shape == (2, 2, 3) and mamba.ssm.shape == (2, 4) and attn.length.shape == (2,)
    assert attn.k.shape == (2, 4, 1, 2) and torch.equal(attn.k, before[1]["k"][[3, 1], :4])
    assert torch.equal(mamba.ssm, before[0]["ssm"][[3, 1]])
    assert cache.gather(slots)[1].k.shape == (2, 10, 1, 2)  # no length: every position
    for st in (mamba, attn):
        for t in st.tensors().values():
            t.neg_()
    cache.scatter(slots, [mamba, attn])
    k = cache.layers[1]["k"]
    assert torch.equal(k[[3, 1], :4], -before[1]["k"][[3, 1], :4])
    assert torch.equal(k[[3, 1], 4:], before[1]["k"][[3, 1], 4:]) and torch.equal(k[[0, 2]], before[1]["k"][[0, 2]])
    assert torch.equal(cache.layers[0]["ssm"][[3, 1]], -before[0]["ssm"][[3, 1]])


def test_prefix_cache_sizes_at_their_bounds():
    one = PrefixStateCache(block=1, capacity_bytes=1)
    assert one.enabled and one.block == 1
    with pytest.raises(ValueError, match=r"^prefix block must be >= 1 token, got 0$"):
        PrefixStateCache(block=0, capacity_bytes=1)
    exact = PrefixStateCache(block=2, capacity_bytes=ENTRY_BYTES)
    exact.save(prefix_keys([1, 2], 2)[0][1], _state(1.0), 0)
    assert exact.used == ENTRY_BYTES and exact.lookup([1, 2, 3])[0] == 2


def test_sampled_requests_are_reproducible_per_seed(seed):
    """The stand-in's logits leave one token at 5 and the rest at 0: at T = 2 other tokens are drawn
    too, the same ones for the same seed, whatever else is in the batch."""
    prompt = _prompts(seed, (5,))[0]
    params = SamplingParams(temperature=2.0, seed=seed)
    alone = _engine().generate([Request(prompt, 8, params)])[0]
    eng = _engine()
    mixed = eng.generate([Request(prompt, 8), Request(prompt, 8, params), Request(prompt, 3, SamplingParams(2.0, seed=seed + 1))])
    assert mixed[1] == alone and mixed[0] == expected(prompt, 8), f"seed {seed}"


# ---- what the engine refuses, and how it cuts prompts into packs -----------------------------------

def test_check_request_refuses_each_bad_field_by_name():
    """Each rule at its boundary: the last valid value passes, the first invalid one is refused with
    its message (vocabulary V = 61, 4 slots, a context budget of 32 tokens)."""
    eng = _engine(max_batch=4, max_sequence_length=32)
    ok = dict(prompt=[0, V - 1], max_new_tokens=1)
    eng.check_request(Request(**ok))
    eng.check_request(Request([1] * 16, 16))  # exactly the budget
    eng.check_request(Request([1, 2], 0, prompt_logprobs=True))  # scoring only
    eng.check_request(Request([1, 2], 3, n=4))
    bad = [(dict(ok, prompt=[]), "^prompt is empty$"),
           (dict(ok, prompt=[0, V]), rf"^prompt holds token ids outside \[0, {V}\)$"),
           (dict(ok, prompt=[-1]), rf"^prompt holds token ids outside \[0, {V}\)$"),
           (dict(ok, max_new_tokens=0), "^max_new_tokens must be >= 1, got 0$"),
           (dict(ok, max_new_tokens=-1, prompt_logprobs=True), "^max_new_tokens must be >= 0, got -1$"),
           (dict(ok, n=5), r"^n must be in \[1, 4\] \(the sequence slots\), got 5$"),
           (dict(ok, n=0), r"^n must be in \[1, 4\] \(the sequence slots\), got 0$"),
           (dict(ok, n=2, max_new_tokens=0, prompt_logprobs=True), r"^n > 1 needs new tokens \(max_new_tokens >= 1\)$"),
           (dict(ok, top_logprobs=-1), "^top_logprobs must be >= 0, got -1$"),
           (dict(prompt=[1] * 16, max_new_tokens=17),
            r"^prompt \(16 tokens\) \+ max_new_tokens \(17\) exceeds the context budget of 32 tokens$")]
    for fields, message in bad:
        with pytest.raises(ValueError, match=message):
            eng.check_request(Request(**fields))
        with pytest.raises(ValueError, match=message):
            eng.add_request(Request(**fields))
    assert not eng.has_work()


def _packs_by_hand(lengths, max_tokens, max_seqs, fits=lambda p: True):
    """Greedy in order: a pack grows while its count, its token sum and `fits` allow the next prompt."""
    packs = []
    for i, n in enumerate(lengths):
        last = packs[-1] if packs else None
        if last is not None and len(last) + 1 <= max_seqs and sum(lengths[j] for j in last) + n <= max_tokens \
                and fits([lengths[j] for j in last] + [n]):
            last.append(i)
        else:
            packs.append([i])
    return packs


def test_plan_packs_at_each_limit(seed):
    from megatron_ssm.inference.engine import plan_packs

    assert plan_packs([5, 7, 9], 100, 2) == [[0, 1], [2]]  # the count limit, reached exactly
    assert plan_packs([5, 7, 9], 12, 8) == [[0, 1], [2]]  # the token limit, reached exactly
    assert plan_packs([5, 7, 9], 11, 8) == [[0], [1], [2]]
    assert plan_packs([20, 1, 1], 10, 8) == [[0], [1, 2]]  # a prompt alone always makes a pack
    assert plan_packs([3, 3, 3, 3], 100, 8, lambda p: len(p) != 3) == [[0, 1], [2, 3]]  # fits sees the grown pack
    assert plan_packs([], 10, 2) == []
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        lengths = torch.randint(1, 12, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        tokens, seqs = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        assert plan_packs(lengths, tokens, seqs) == _packs_by_hand(lengths, tokens, seqs), (seed, lengths, tokens, seqs)


def test_forks_equal_separately_seeded_requests_and_take_their_slots(seed):
    """n = 3 at T = 2: fork i has id + i and draws what a request of its own with seed + i draws; the
    forks hold slots (a waiting n = 2 request needs 2 free ones: it waits while the forks run);
    abort() of a waiting request's ids past its last does nothing."""
    prompt = _prompts(seed, (6,))[0]
    params = SamplingParams(temperature=2.0, seed=seed)
    alone = [_engine().generate([Request(prompt, 5, SamplingParams(2.0, seed=seed + i))])[0] for i in range(3)]
    eng = _engine(max_batch=4)
    first = eng.add_request(Request(prompt, 5, params, n=3))
    second = eng.add_request(Request(prompt, 2, n=2))
    assert second == first + 3
    assert not eng.abort(second + 2) and eng.num_waiting == 2
    log = []
    outs = _run(eng, log)
    assert [[o.token for o in outs[first + i]] for i in range(3)] == alone, f"seed {seed}"
    assert [[o.token for o in outs[second + i]] for i in range(2)] == [expected(prompt, 2)] * 2, f"seed {seed}"
    assert log[0] == (3, 1), log  # 3 forks running, the n = 2 request waiting for 2 slots
    third = eng.add_request(Request(prompt, 2, n=2))
    assert eng.abort(third + 1) and not eng.has_work()  # any id of a waiting request removes it


def test_top_logprobs_and_score_only_requests_in_closed_form(seed):
    """The stand-in's logits are 5 at the next state and 0 elsewhere, so every log-prob is closed form:
    5 - Z for the state, -Z for any other token, Z = log(e^5 + V - 1). A request with top_logprobs = 3
    gets the state first then two others at -Z; a score-only request (max_new_tokens 0) gets one
    finished output (token -1, "length") with each prompt token's log-prob and its top 2; a batch
    neighbour without logprobs gets none."""
    Z = math.log(math.exp(5.0) + V - 1)
    prompt = _prompts(seed, (7,))[0]
    eng = _engine()
    gen = eng.add_request(Request(prompt, 4, logprobs=True, top_logprobs=3))
    score = eng.add_request(Request(prompt, 0, prompt_logprobs=True, top_logprobs=2, logprobs=True))
    plain = eng.add_request(Request(prompt, 2))
    outs = _run(eng)
    for o, want in zip(outs[gen], expected(prompt, 4)):
        assert o.token == want and o.logprob == pytest.approx(5.0 - Z, abs=1e-5), f"seed {seed}"
        assert len(o.top_logprobs) == 3 and o.top_logprobs[0][0] == want, o.top_logprobs
        assert [v for _, v in o.top_logprobs] == pytest.approx([5.0 - Z, -Z, -Z], abs=1e-5)
        assert len({t for t, _ in o.top_logprobs}) == 3
    (only,) = outs[score]
    assert (only.token, only.finished, only.finish_reason, only.top_logprobs) == (-1, True, "length", None)
    states = [0]
    for t in prompt:
        states.append(step_state(states[-1], t))
    want_lps = [5.0 - Z if prompt[i] == states[i] else -Z for i in range(1, len(prompt))]
    assert only.prompt_logprobs == pytest.approx(want_lps, abs=1e-5), f"seed {seed}"
    assert [top[0][0] for top in only.prompt_top_logprobs] == states[1:-1] and \
        all(len(top) == 2 for top in only.prompt_top_logprobs), f"seed {seed}"
    assert all(o.logprob is None and o.top_logprobs is None and o.prompt_logprobs is None for o in outs[plain])


# ---- a model with attention-like KV state: KV rows, their copy bounds, the KV-cache budget ---------

class KVModel(CountingModel):
    """The stand-in with its whole context in an attention-like KV cache instead of the one-number state:
    k[b, p] holds the token fed at position p (v a copy), `length` the positions filled, and every
    step recomputes the state from all of a row's cached keys. So a copy that drops a key, a slot that
    keeps a stale `length`, or a view too short for a step's writes changes or breaks the tokens,
    while `expected` still gives them."""

    def __init__(self):
        super().__init__()
        self.cfg.has_attention = True

    def state_shapes(self, max_length: int = 0):
        assert max_length >= 1, "the engine must size the KV cache"
        kv = ((max_length, 1), None)
        return [{"k": kv, "v": kv, "length": ((), torch.int64)}]

    def forward(self, input_ids, states=None, last_only=False):
        b, L = input_ids.shape
        self.calls.append((b, L))
        st = states[0]
        logits = torch.zeros(b, L, V)
        for row in range(b):
            n = int(st.length[row])
            assert n + L <= st.k.shape[1], f"a view of {st.k.shape[1]} positions for a write up to {n + L}"
            st.k[row, n:n + L, 0] = input_ids[row].float()
            st.v[row, n:n + L, 0] = input_ids[row].float()
            s = 0
            for p in range(n + L):
                s = step_state(s, int(st.k[row, p, 0]))
                if p >= n:
                    logits[row, p - n, s] = 5.0
        st.length += L
        return logits[:, -1:] if last_only else logits


def _recording_copies(eng: Engine) -> list[tuple[int, int, int | None, int]]:
    """Wrap eng.cache.copy_slot: each call's (src, dst, kv_length, positions src held)."""
    copies, real = [], eng.cache.copy_slot

    def copy_slot(src, dst, kv_length=None):
        copies.append((src, dst, kv_length, int(eng.cache.layers[0]["length"][src])))
        real(src, dst, kv_length)

    eng.cache.copy_slot = copy_slot
    return copies


def test_kv_rows_follow_their_sequences_through_forks_releases_and_prefix_hits(seed):
    """Through a KV-cache model: forks (n = 3) copy their parent's keys, finished sequences hand their
    slot to the last one (whose keys move with it), a prefix hit starts from the saved keys; every
    request gets `expected`'s tokens. Each copy takes at least the positions its source holds and at
    most one more (the one the next step writes), never the whole cache."""
    eng = Engine(KVModel(), EngineConfig(max_batch=4, max_sequence_length=40, prefix_block=4,
                                         prefix_cache_bytes=1 << 20, prefill_chunk=64))
    copies = _recording_copies(eng)
    shared = _prompts(seed, (9,))[0]
    prompts = [shared + t for t in _prompts(seed + 1, (3, 1, 2))]
    news = [6, 2, 9]
    first = eng.add_request(Request(prompts[0], news[0], n=3))
    rest = [eng.add_request(Request(p, n)) for p, n in zip(prompts[1:], news[1:])]
    outs = _run(eng)
    assert [[o.token for o in outs[first + i]] for i in range(3)] == [expected(prompts[0], 6)] * 3, f"seed {seed}"
    for rid, p, n in zip(rest, prompts[1:], news[1:]):
        assert [o.token for o in outs[rid]] == expected(p, n), f"seed {seed}"
    assert (eng.prefix.hits, eng.prefix.misses) == (1, 2)  # the third request starts from 8 saved tokens
    # admitted with the second request (slot 1), the forks take slots 2 and 3: the 12-token prompt's
    # keys and the position of its first token
    assert copies[:2] == [(0, 2, 13, 12), (0, 3, 13, 12)], copies
    assert len(copies) > 2, copies  # releases moved sequences too
    for src, dst, kv_length, held in copies:
        assert kv_length is not None and held <= kv_length <= held + 1, (copies, seed)


def test_kv_cache_budget_is_refused_by_name():
    """A model with attention layers: the refusal names the KV cache; without max_sequence_length its
    cache holds 65536 positions, the budget then."""
    eng = Engine(KVModel(), EngineConfig(max_batch=2, max_sequence_length=32))
    eng.check_request(Request([1] * 16, 16))
    with pytest.raises(ValueError, match=r"^prompt \(16 tokens\) \+ max_new_tokens \(17\) exceeds the context "
                                         r"budget of 32 tokens \(the length of the attention layers' KV cache\)$"):
        eng.add_request(Request([1] * 16, 17))
    default = Engine(KVModel(), EngineConfig(max_batch=1))
    default.check_request(Request([1], 65535))
    with pytest.raises(ValueError, match=r"\(1 tokens\) \+ max_new_tokens \(65536\) exceeds the context budget "
                                         r"of 65536 tokens \(the length of the attention layers' KV cache\)$"):
        default.check_request(Request([1], 65536))
    assert not eng.has_work() and not default.has_work()


# ---- the context-parallel long prefill's scheduling, in one process -------------------------------

class SplitRecording:
    """Puts a stand-in behind a context-parallel group: a forward given `cp` spans runs the whole
    range (what every CP rank holds after the state passing) and records the split it was asked for,
    so the engine's scheduling of long prompts is seen without a process group (the split numerics
    are test_context_parallel.py's, on gloo ranks)."""

    supports_context_parallel = True

    def __init__(self):
        super().__init__()
        self.cfg.chunk_size, self.cfg.is_mamba2 = 8, False
        self.spans: list[tuple[int, ...] | None] = []  # per forward: the CP split, None when not split

    def forward(self, input_ids, states=None, last_only=False, cp=None):
        self.spans.append(None if cp is None else cp.lengths)
        return super().forward(input_ids, states, last_only)


class CPModel(SplitRecording, CountingModel):
    pass


class KVCPModel(SplitRecording, KVModel):
    pass


CP2 = CPContext(group=None, rank=0, size=2)


def _cp_engine(**cfg) -> Engine:
    # steps of 2 x 16 prompt tokens (16 a rank: the least a split span takes); prompts from 40 tokens split
    return Engine(CPModel(), EngineConfig(**{"max_batch": 3, "prefill_chunk": 16, "context_parallel_min_tokens": 40,
                                             **cfg}), cp=CP2)


def test_a_long_prompt_is_prefilled_split_between_the_other_steps(seed):
    """max_batch 3; a short request, a 70-token one (over the CP threshold of 40) and another short
    one arrive together. The shorts are admitted at once, the long one starts its split prefill in
    the last slot, held for it, and takes every other step: 32 tokens split 16 + 16, 32 more, then
    its 6-token tail whole (too short to split); it then joins the batch and decodes with the others.
    Every request gets `expected`'s tokens."""
    short, long_, other, late = _prompts(seed, (4, 70, 5, 3))
    eng = _cp_engine()
    a = eng.add_request(Request(short, 6))
    b = eng.add_request(Request(long_, 3))
    c = eng.add_request(Request(other, 2))
    per_step, log = [], []
    outs: dict[int, list[int]] = {}

    def step():
        got = eng.step()
        per_step.append(sorted(o.request_id for o in got))
        log.append((eng.num_running, eng.num_waiting))
        for o in got:
            outs.setdefault(o.request_id, []).append(o.token)

    step()
    assert (eng.long.seq.id, eng.long.slot, [s.id for s in eng.running]) == (b, 2, [a, c])
    d = eng.add_request(Request(late, 2))
    while eng.has_work():
        step()
    # prefill a, c | b 0:32 | decode (c done) | b 32:64 | prefill d | b 64:70, done | decode a, b, d
    assert per_step[:7] == [[a, c], [], [a, c], [], [d], [b], [a, b, d]], per_step
    assert log[:6] == [(3, 0), (3, 1), (2, 1), (2, 1), (3, 0), (3, 0)], log
    assert [s for s in eng.model.spans if s is not None] == [(16, 16), (16, 16)], eng.model.spans
    assert [L for _, L in eng.model.calls if L > 1] == [4, 5, 32, 32, 3, 6], eng.model.calls
    want = {a: expected(short, 6), b: expected(long_, 3), c: expected(other, 2), d: expected(late, 2)}
    assert outs == want, f"seed {seed}"


def test_one_split_prefill_at_a_time_and_its_forks_hold_their_slots(seed):
    """max_batch 4: a long prompt x asking for n = 2 (its fork needs a second slot), a second long one
    y and a short one z. x starts; y waits its turn (one split prefill at a time) while z goes past it.
    When x is done it moves into the slot after z, forks into the next, and y starts; a short request
    that arrived meanwhile waits for a free slot (three running, one held for y)."""
    first, second, short = _prompts(seed, (45, 40, 6))
    eng = _cp_engine(max_batch=4)
    x = eng.add_request(Request(first, 3, SamplingParams(temperature=2.0, seed=seed), n=2))
    y = eng.add_request(Request(second, 2))
    z = eng.add_request(Request(short, 4))
    trace, outs = [], {}

    def step():
        got = eng.step()
        for o in got:
            outs.setdefault(o.request_id, []).append(o.token)
        trace.append((sorted(o.request_id for o in got), [s.id for s in eng.running], [s.id for s in eng.waiting],
                      eng.long.seq.id if eng.long is not None else None))

    step()
    w = eng.add_request(Request(short, 9))
    v = eng.add_request(Request(short, 1))
    for _ in range(8):
        step()
    assert trace == [([z], [z], [y], x),  # x starts, y waits behind it, z is admitted past y
                     ([], [z], [y, w, v], x),  # x 0:32, split
                     ([z], [z], [y, w, v], x),  # decode
                     ([x, x + 1], [z, x, x + 1], [y, w, v], None),  # x 32:45 whole: done, forked
                     ([x, x + 1, z], [z, x, x + 1], [w, v], y),  # y starts; w has no slot: decode
                     ([], [z, x, x + 1], [w, v], y),  # y 0:32, split
                     ([x, x + 1, z], [], [w, v], y),  # decode: z, x and its fork finish
                     ([y], [y], [w, v], None),  # y 32:40 whole: done, into slot 0
                     ([w, v], [y, w], [], None)], trace  # w and v admitted (v done at once)
    for rid, got in _run(eng).items():
        outs.setdefault(rid, []).extend(o.token for o in got)
    alone = [_engine().generate([Request(first, 3, SamplingParams(2.0, seed=seed + i))])[0] for i in range(2)]
    assert [outs[x], outs[x + 1]] == alone, f"seed {seed}"
    for rid, p, n in ((y, second, 2), (z, short, 4), (w, short, 9), (v, short, 1)):
        assert outs[rid] == expected(p, n), f"seed {seed}"
    assert [s for s in eng.model.spans if s is not None] == [(16, 16), (16, 16)], eng.model.spans


def test_long_prompts_take_their_split_prefills_in_arrival_order(seed):
    """Three long prompts and a short one behind them: the first starts, the other two keep their
    order in the queue while the short one is admitted past both."""
    prompts = _prompts(seed, (45, 40, 41, 3))
    eng = _cp_engine(max_batch=4)
    ids = [eng.add_request(Request(p, 2)) for p in prompts]
    first = eng.step()
    assert [o.request_id for o in first] == [ids[3]] and [s.id for s in eng.waiting] == ids[1:3]
    order, outs = [], {ids[3]: [o.token for o in first]}
    while eng.has_work():
        if eng.long is not None and eng.long.seq.id not in order:
            order.append(eng.long.seq.id)
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o.token)
    assert order == ids[:3], order
    assert [outs[i] for i in ids] == [expected(p, 2) for p in prompts], f"seed {seed}"
    assert [s for s in eng.model.spans if s is not None] == [(16, 16)] * 3, eng.model.spans


def test_abort_a_long_prompt_under_way(seed):
    """Any id of the split prefill's request (n = 2: its own and its fork's) aborts it mid-prompt;
    ids past its last do nothing. The short request running beside it goes on undisturbed."""
    short, long_ = _prompts(seed, (5, 45))
    eng = _cp_engine(max_batch=3)
    s = eng.add_request(Request(short, 4))
    x = eng.add_request(Request(long_, 3, n=2))
    first = eng.step()  # s prefilled; x starts, holding the other two slots
    assert [o.request_id for o in first] == [s] and eng.long.seq.id == x
    assert eng.step() == []  # x 0:32
    assert not eng.abort(x + 2) and eng.long is not None and eng.num_running == 2
    assert eng.abort(x + 1) and eng.long is None and eng.num_running == 1 and eng.has_work()
    outs = _run(eng)
    assert list(outs) == [s] and [o.token for o in first + outs[s]] == expected(short, 4), f"seed {seed}"
    y = eng.add_request(Request(long_, 2))
    eng.step()
    assert eng.long.seq.id == y and eng.has_work() and eng.abort(y) and not eng.has_work()
    assert eng.step() == [] and eng.num_running == 0


def test_a_hybrids_long_prompt_saves_and_reuses_prefixes_and_moves_its_keys(seed):
    """KV stand-in, prefix blocks of 16: a 70-token prompt (n = 2) is prefilled split in steps that end
    on block boundaries (32, 64: both saved), then its 6-token tail; it moves from the held slot into
    the one after the running request, keys and all, and forks. A later 74-token prompt sharing its
    first 64 tokens starts from the saved state and runs only its last 10. Copies take the positions
    their source holds (and at most the one the next step writes)."""
    short, long_, tail = _prompts(seed, (5, 70, 10))
    eng = Engine(KVCPModel(), EngineConfig(max_batch=3, prefill_chunk=16, context_parallel_min_tokens=40,
                                           max_sequence_length=128, prefix_block=16, prefix_cache_bytes=1 << 20), cp=CP2)
    copies = _recording_copies(eng)
    a = eng.add_request(Request(short, 6))
    x = eng.add_request(Request(long_, 3, n=2))
    outs = _run(eng)
    assert copies[:2] == [(2, 1, 70, 70), (1, 2, 71, 70)], copies  # into slot 1, then the fork into 2
    assert eng.model.spans.count((16, 16)) == 2 and eng.prefix.hits == 0
    shared = long_[:64] + tail
    y = eng.add_request(Request(shared, 2))
    outs |= _run(eng)
    assert eng.prefix.hits == 1 and [L for _, L in eng.model.calls][-2:] == [10, 1], eng.model.calls
    assert eng.model.spans.count((16, 16)) == 2  # the 10 tokens after the saved 64 run whole
    got = {rid: [o.token for o in outs[rid]] for rid in (a, x, x + 1, y)}
    assert got == {a: expected(short, 6), x: expected(long_, 3), x + 1: expected(long_, 3),
                   y: expected(shared, 2)}, f"seed {seed}"
    for src, dst, kv_length, held in copies:
        assert kv_length is not None and held <= kv_length <= held + 1, (copies, seed)


def test_split_prefill_at_the_smallest_settings(seed):
    """context_parallel_min_tokens 0 still means prompts of at least one token; prefill_chunk 1 gives
    steps of one token a CP rank (too few to split: each runs whole)."""
    prompt = _prompts(seed, (5,))[0]
    eng = _cp_engine(prefill_chunk=1, context_parallel_min_tokens=0)
    rid = eng.add_request(Request(prompt[:1], 2))
    assert eng.step() == [] and eng.long.seq.id == rid
    assert [o.token for o in _run(eng)[rid]] == expected(prompt[:1], 2), f"seed {seed}"
    eng = _cp_engine(prefill_chunk=1, context_parallel_min_tokens=5)
    assert eng.generate([Request(prompt, 2)]) == [expected(prompt, 2)], f"seed {seed}"
    assert [L for _, L in eng.model.calls] == [2, 2, 1, 1] and eng.model.spans == [None] * 4, eng.model.calls


def test_which_prompts_are_prefilled_split(seed):
    """From context_parallel_min_tokens (40) on, and not when the prompt is scored (the split does not
    gather every position's logits); without a CP group nothing is split."""
    prompt = _prompts(seed, (40,))[0]
    eng = _cp_engine()
    assert eng.generate([Request(prompt[:39], 2)]) == [expected(prompt[:39], 2)]
    eng.generate([Request(prompt, 0, prompt_logprobs=True)])
    assert eng.model.spans == [None] * len(eng.model.spans), eng.model.spans
    assert eng.generate([Request(prompt, 2)]) == [expected(prompt, 2)]
    assert eng.model.spans[-3:] == [(16, 16), None, None], eng.model.spans  # 32 split, the 8 left, a decode
    solo = Engine(CPModel(), EngineConfig(max_batch=3, prefill_chunk=16, context_parallel_min_tokens=40))
    solo.generate([Request(prompt, 2)])
    assert solo.model.spans == [None] * len(solo.model.spans), solo.model.spans


def test_token_zero_gets_its_log_probs():
    """Token id 0 is a token like any other (the score-only marker is -1): prompt [58] moves the
    stand-in's state to (58 + 3) mod 61 = 0, so 0 is the first token, with its log-prob and top 2."""
    Z = math.log(math.exp(5.0) + V - 1)
    assert expected([58], 1) == [0]
    eng = _engine()
    rid = eng.add_request(Request([58], 2, logprobs=True, top_logprobs=2))
    first, second = _run(eng)[rid]
    assert first.token == 0 and first.logprob == pytest.approx(5.0 - Z, abs=1e-5)
    assert first.top_logprobs[0] == (0, pytest.approx(5.0 - Z, abs=1e-5)) and len(first.top_logprobs) == 2
    assert second.token == expected([58], 2)[1] and second.top_logprobs[0][0] == second.token
