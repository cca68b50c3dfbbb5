"""The engine's scheduling (admission budget, slots, aborts, stops, prefix reuse) on a stand-in model
whose next token has a closed form, so every request's tokens are known without running a network.

The stand-in is a one-number state machine: each token t moves a sequence's state s to
(7 s + t + 3) mod V, and the logits put their maximum on the new state. So greedy decoding of a
prompt continues with tokens computable in a few lines (`expected`), whatever batch, slot, chunk
or cached prefix the engine ran it in; a scheduling bug that mixes up two sequences' states, skips a
token or replays one changes the tokens. In-process and single-rank: seconds, no gloo pool (the
real model's scheduling at TP 1, 2, 4 is in test_engine.py).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from megatron_ssm.inference.engine import Engine, EngineConfig, Request
from megatron_ssm.inference.prefix_cache import PrefixStateCache, prefix_keys
from megatron_ssm.inference.sampling import SamplingParams
from megatron_ssm.model.lm import LayerState
from megatron_ssm.parallel import TPContext

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
