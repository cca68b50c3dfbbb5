"""The inference engine: batching, continuous admission, chunked prefill, prefix reuse, sampling."""
from __future__ import annotations

import math

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, save_hf, scaled_max_diff
from megatron_ssm.checkpoint.convert import convert


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """{family: {tp: checkpoint dir}} for a Mamba-2 (n_groups 1) and a Mamba-1 model."""
    out = {}
    for family, opts in (("mamba2", dict(n_groups=1)), ("mamba", dict())):
        root = tmp_path_factory.mktemp(family)
        hf_dir = save_hf(build_hf_model(hf_config(family, **opts), fresh_seed()), root / "hf")
        out[family] = {}
        for tp in (1, 2, 4):
            out[family][tp] = str(root / f"tp{tp}")
            convert(hf_dir, out[family][tp], tp, progress=False)
    return out


def _prompts(seed: int, lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


# ---- run on every rank -------------------------------------------------------------------------

def _engine(ckpt, **cfg):
    from megatron_ssm.inference.engine import Engine, EngineConfig
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    return Engine(load_model(ckpt, tp_context(torch.device("cpu"))), EngineConfig(**cfg))


def _rank_alone_vs_batched(ckpt, prompts, new):
    from megatron_ssm.inference.engine import Request

    alone = [_engine(ckpt, max_batch=1).generate([Request(p, new)])[0] for p in prompts]
    batched = _engine(ckpt, max_batch=len(prompts)).generate([Request(p, new) for p in prompts])
    small = _engine(ckpt, max_batch=2).generate([Request(p, new) for p in prompts])  # queueing
    return alone, batched, small


def _rank_arrivals(ckpt, prompts, new):
    """Requests added while others are mid-generation, with varying lengths so slots get reshuffled."""
    from megatron_ssm.inference.engine import Request

    eng = _engine(ckpt, max_batch=3)
    out, ids = {}, []
    for i, p in enumerate(prompts):
        ids.append(eng.add_request(Request(p, new + 3 * (i % 3))))
        out[ids[-1]] = []
        for _ in range(i % 4):
            for o in eng.step():
                out[o.request_id].append(o.token)
    while eng.has_work():
        for o in eng.step():
            out[o.request_id].append(o.token)
    return [out[i] for i in ids]


def _rank_decode_ahead(ckpt, prompts, new):
    """The same workload with decode steps launched ahead and without: requests arriving mid-run,
    uneven lengths (slots reshuffled), a stop token met mid-run, log-probs with alternatives, seeded
    sampled requests among greedy ones and an abort. Returns, per side, each request's outputs and
    how many steps ran ahead."""
    from megatron_ssm.inference.engine import Request
    from megatron_ssm.inference.sampling import SamplingParams

    def requests(stop):
        reqs = [Request(p, new + 2 * (i % 3), logprobs=i == 1, top_logprobs=2 if i == 1 else 0)
                for i, p in enumerate(prompts)]
        reqs[2].stop_ids = stop
        reqs[0].sampling = SamplingParams(temperature=0.8, seed=7)
        reqs[0].max_new_tokens = 3
        reqs[-1].sampling = SamplingParams(temperature=1.1, top_k=20, top_p=0.9, seed=11)  # runs to the end
        reqs[-1].logprobs = True
        return reqs

    def run(ahead, stop=()):
        eng = _engine(ckpt, max_batch=3, decode_ahead=ahead)
        can, sampled_ahead = eng._can_run_ahead, []
        eng._can_run_ahead = lambda seqs: can(seqs) and (sampled_ahead.append(any(s.generator for s in seqs)) or True)
        out, ids = {}, []
        for i, r in enumerate(requests(stop)):
            ids.append(eng.add_request(r))
            out[ids[-1]] = []
            for _ in range(i % 4):
                for o in eng.step():
                    out[o.request_id].append((o.token, o.logprob, o.top_logprobs, o.finish_reason))
            if i == 4:
                eng.abort(ids[3])  # running or waiting, by now
        while eng.has_work():
            for o in eng.step():
                out[o.request_id].append((o.token, o.logprob, o.top_logprobs, o.finish_reason))
        return [out[i] for i in ids], (eng.steps_ahead, any(sampled_ahead))

    reference, _ = run(False)
    toks = [o[0] for o in reference[2]]  # request 2 stops at its first new token from the third on
    stop = next(((t,) for j, t in enumerate(toks) if j >= 2 and t not in toks[:j]), ())
    return run(False, stop), run(True, stop), bool(stop)


def _rank_single(ckpt, prompt, new, **cfg):
    from megatron_ssm.inference.engine import Request

    eng = _engine(ckpt, max_batch=2, **cfg)
    return eng.generate([Request(prompt, new)])[0]


def _rank_index_limited(ckpt, prompts, new):
    """Generation with the activation limit set so low that prefill must take a few tokens at a time."""
    from megatron_ssm.inference.engine import Request

    eng = _engine(ckpt, max_batch=4, prefill_chunk=4096)
    widest = eng.model.layers[0].mixer.in_proj.weight.shape[0]
    eng.model.max_activation_elements = 3 * len(prompts) * widest  # 3 tokens per sequence per forward
    calls = []
    forward = eng.model.forward
    eng.model.forward = lambda ids, *a, **k: calls.append(ids.shape) or forward(ids, *a, **k)
    outs = eng.generate([Request(p, new) for p in prompts])
    return outs, max(b * L for b, L in calls)


def _rank_prefix(ckpt, shared, tails, new):
    from megatron_ssm.inference.engine import Request

    eng = _engine(ckpt, max_batch=2, prefix_block=8, prefix_cache_bytes=1 << 24, prefill_chunk=16)
    outs = [eng.generate([Request(shared + t, new)])[0] for t in tails]
    return outs, eng.prefix.hits


def _rank_sampling(ckpt, prompts, new, seed):
    from megatron_ssm.inference.engine import Request
    from megatron_ssm.inference.sampling import SamplingParams

    reqs = [Request(p, new, SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=seed + i), logprobs=True)
            for i, p in enumerate(prompts)]
    eng = _engine(ckpt, max_batch=4)
    ids = [eng.add_request(r) for r in reqs]
    toks, lps = {i: [] for i in ids}, {i: [] for i in ids}
    while eng.has_work():
        for o in eng.step():
            toks[o.request_id].append(o.token)
            lps[o.request_id].append(o.logprob)
    return [toks[i] for i in ids], [lps[i] for i in ids]


def _rank_prompt_logprobs(ckpt, prompts, **cfg):
    """Engine prompt log-probs (twice: the second round may find prefix states of the first) for a
    mix of scoring, plain and score-only requests, and the references: each prompt run alone from
    scratch, full logits gathered, log_softmax at the next token; tokens of plain requests."""
    from megatron_ssm.inference.engine import Request
    from megatron_ssm.inference.sampling import gather_logits

    eng = _engine(ckpt, max_batch=len(prompts), **cfg)
    kinds = [("score", "plain", "score_only")[i % 3] for i in range(len(prompts))]
    rounds = []
    for _ in range(2):
        ids = [eng.add_request(Request(p, 0 if k == "score_only" else 3, prompt_logprobs=k != "plain"))
               for p, k in zip(prompts, kinds)]
        firsts, toks = {}, {i: [] for i in ids}
        while eng.has_work():
            for o in eng.step():
                firsts.setdefault(o.request_id, o)
                toks[o.request_id].append(o.token)
        rounds.append(([firsts[i].prompt_logprobs for i in ids], [toks[i] for i in ids]))
    m = eng.model
    refs = []
    for p in prompts:
        full = gather_logits(m(torch.tensor([p]))[0], m.cfg.vocab_size, m.tp)
        refs.append(torch.log_softmax(full[:-1], -1).gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist())
    plain = _engine(ckpt, max_batch=len(prompts)).generate([Request(p, 3) for p in prompts])
    return kinds, rounds, refs, plain


def _rank_logprob(local_logits_full, tokens):
    from megatron_ssm.inference.sampling import VocabShard, vocab_parallel_logprob
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    V = local_logits_full.shape[-1] // tp.size
    local = local_logits_full[:, tp.rank * V:(tp.rank + 1) * V]
    return vocab_parallel_logprob(local, tokens, VocabShard(tp.rank * V, V * tp.size, tp))


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", ["mamba2", "mamba"])
def test_mixed_length_batch_equals_each_prompt_alone(ranks, ckpts, family, tp):
    # repeated lengths in non-adjacent slots exercise the gathered (non-contiguous) prefill path
    prompts = _prompts(fresh_seed(), (9, 2, 17, 9, 5, 2, 1))
    alone, batched, small = ranks(tp).run(_rank_alone_vs_batched, ckpts[family][tp], prompts, 6)[0]
    assert batched == alone
    assert small == alone


@pytest.mark.parametrize("tp", [1, 2])
def test_requests_arriving_mid_generation_match_running_alone(ranks, ckpts, tp):
    prompts = _prompts(fresh_seed(), (4, 11, 3, 8, 6, 2, 13))
    got = ranks(tp).run(_rank_arrivals, ckpts["mamba2"][tp], prompts, 5)[0]
    alone = ranks(tp).run(_rank_alone_vs_batched, ckpts["mamba2"][tp], prompts, 11)[0][0]
    for i, (g, a) in enumerate(zip(got, alone)):
        assert g == a[: len(g)], f"request {i}"


@pytest.mark.parametrize("family,tp", [("mamba2", 1), ("mamba", 1), ("mamba2", 2)])
def test_decode_ahead_delivers_what_the_plain_loop_does(ranks, ckpts, family, tp):
    """Decode steps launched before the previous step is delivered: every request gets the same
    tokens, log-probs, alternatives and finish reasons as without, through arrivals, a stop token,
    seeded sampled requests beside greedy ones and an abort; steps did run ahead."""
    prompts = _prompts(fresh_seed(), (4, 11, 3, 8, 6, 2, 13))
    (plain, none_ahead), (ahead, (steps_ahead, beside_sampled)), stops = ranks(tp).run(
        _rank_decode_ahead, ckpts[family][tp], prompts, 5)[0]
    assert none_ahead == (0, False) and steps_ahead > 0 and beside_sampled
    for i, (a, p) in enumerate(zip(ahead, plain)):
        if i == 3:  # aborted: by then each side had delivered some of the same tokens
            assert [o[0] for o in a] == [o[0] for o in p][:len(a)] or [o[0] for o in p] == [o[0] for o in a][:len(p)]
            continue
        assert [(o[0], o[3]) for o in a] == [(o[0], o[3]) for o in p], f"request {i}"
        for (_, lp_a, top_a, _), (_, lp_p, top_p, _) in zip(a, p):
            assert (lp_a is None) == (lp_p is None) and (lp_a is None or abs(lp_a - lp_p) < 1e-5), f"request {i}"
            assert (top_a is None) == (top_p is None), f"request {i}"
            if top_a is not None:
                assert [t for t, _ in top_a] == [t for t, _ in top_p], f"request {i}"
    assert not stops or (plain[2][-1][3] == "stop" and len(plain[2]) >= 3)


def _rank_ahead_failure(ckpt, prompt, fail_at):
    """Greedy decode of one prompt, plain, then ahead with the model raising on forward `fail_at`."""
    from megatron_ssm.inference.engine import Request

    plain = _engine(ckpt, max_batch=1, decode_ahead=False).generate([Request(prompt, 8)])[0]
    eng = _engine(ckpt, max_batch=1)
    forward, calls = eng.model.forward, []

    def failing(*a, **k):
        calls.append(len(calls))
        if len(calls) == fail_at:
            raise RuntimeError("stand-in device failure")
        return forward(*a, **k)

    eng.model.forward = failing
    eng.add_request(Request(prompt, 8))
    got, error = [], None
    try:
        for _ in range(20):
            got += [o.token for o in eng.step()]
    except RuntimeError as e:
        error = str(e)
    return plain, got, error, eng.steps_ahead


def test_a_step_launched_ahead_that_fails_loses_nothing_before_it(ranks, ckpts):
    """The model fails on a step launched ahead. Forward 1 is the prefill (token 0), 2 a plain step
    (token 1, launching 3 ahead), 3 delivers token 2 and launches 4, which fails: token 2 is still
    delivered, each token the plain loop's, and the error comes from the next step."""
    prompt = _prompts(fresh_seed(), (6,))[0]
    plain, got, error, steps_ahead = ranks(1).run(_rank_ahead_failure, ckpts["mamba2"][1], prompt, 4)[0]
    assert steps_ahead == 1 and error == "stand-in device failure"
    assert got == plain[:3], (got, plain)


@pytest.mark.parametrize("family", ["mamba2", "mamba"])
def test_chunked_prefill_equals_one_shot(ranks, ckpts, family):
    prompt = _prompts(fresh_seed(), (45,))[0]
    one_shot = ranks(2).run(_rank_single, ckpts[family][2], prompt, 8, prefill_chunk=4096)[0]
    chunked = ranks(2).run(_rank_single, ckpts[family][2], prompt, 8, prefill_chunk=7, pack_tokens=0)[0]
    assert chunked == one_shot


def _rank_packed_forward(ckpt, lengths):
    """The packed forward (cu_seqlens) beside each prompt's own forward: last logits, every position's
    logits, and the states it leaves per sequence (each difference over its tensor's scale)."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.load import load_model
    from megatron_ssm.ops.varlen import cu_seqlens_of
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    prompts = _prompts(fresh_seed(), lengths)
    n = len(prompts)
    packed_cache = StateCache(model.state_shapes(), n, dtype=model.dtype, device=torch.device("cpu"))
    for c, s in zip(packed_cache.conv, packed_cache.ssm):  # what the states held before is never read
        c.normal_()
        s.normal_()
    ids = torch.tensor([t for p in prompts for t in p]).view(1, -1)
    cu = cu_seqlens_of(lengths, "cpu")
    last = model(ids, packed_cache.rows(0, n), last_only=True, cu_seqlens=cu)[:, -1]
    every = model(ids, None, cu_seqlens=cu)[0]
    alone_cache = StateCache(model.state_shapes(), n, dtype=model.dtype, device=torch.device("cpu"))
    alone_last, alone_every = [], []
    for i, p in enumerate(prompts):
        alone_last.append(model(torch.tensor([p]), alone_cache.rows(i, i + 1), last_only=True)[0, -1])
        alone_every.append(model(torch.tensor([p]))[0])
    diff = scaled_max_diff  # the padded vocabulary's -inf must match too
    return (diff(last, torch.stack(alone_last)), diff(every, torch.cat(alone_every)),
            max(diff(a.conv[:n], b.conv[:n]) + diff(a.ssm[:n], b.ssm[:n])
                for a, b in zip(packed_cache.rows(0, n), alone_cache.rows(0, n))))


@pytest.mark.parametrize("family,tp", [("mamba2", 1), ("mamba2", 2), ("mamba", 2)])
def test_packed_forward_equals_each_prompt_alone(ranks, ckpts, family, tp):
    """Prompts of different lengths in one packed forward give each one's logits and final states as
    if it ran alone (a 1-token prompt, one shorter than the conv window, one across SSD chunks)."""
    for last, every, states in ranks(tp).run(_rank_packed_forward, ckpts[family][tp], (7, 1, 2, 37, 16)):
        assert last < 1e-4 and every < 1e-4 and states < 1e-4, (last, every, states)


def _rank_malformed_boundaries(ckpt):
    """The ValueError message of each malformed packed forward (None where one ran), then whether a
    well-formed one gave finite logits for each sequence."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(fresh_seed()))
    cache = StateCache(model.state_shapes(), 2, dtype=model.dtype, device=torch.device("cpu"))
    calls = [(ids, cache.rows(0, 2), torch.tensor(cu, dtype=torch.int32))
             for cu in ([0, 4, 12], [0, 7, 5], [0, 4, 4], [1, 4, 10], [0, 2, 4, 10])]
    calls += [(ids, None, torch.tensor([0, 4, 10])), (ids.expand(2, -1), None, torch.tensor([0, 4, 10], dtype=torch.int32))]
    errors = []
    for x, states, cu in calls:
        try:
            model(x, states, last_only=states is not None, cu_seqlens=cu)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    good = model(ids, cache.rows(0, 2), last_only=True, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    return errors, tuple(good.shape[:2]), bool(torch.isfinite(good[..., :model.cfg.vocab_size]).all())  # padding: -inf


def test_packed_forward_refuses_malformed_boundaries(ranks, ckpts):
    """cu_seqlens the kernels would index out of bounds with (past the tokens, falling, an empty
    sequence, not starting at 0, more sequences than state rows, not int32, several rows) get a
    ValueError before any kernel runs; well-formed ones still run."""
    [(errors, shape, finite)] = ranks(1).run(_rank_malformed_boundaries, ckpts["mamba2"][1])
    wanted = ["rise strictly from 0 to the 10", "rise strictly", "rise strictly", "rise strictly",
              "3 sequences for 2 state rows", "int32", "one row"]
    assert all(e is not None and w in e for e, w in zip(errors, wanted)) and len(errors) == len(wanted), errors
    assert shape == (2, 1) and finite


def test_prefill_graph_buckets_pad_only_with_whole_sequences():
    """A graphed pack's shape: every real token in place, padding only as extra sequences of at least
    one token each (never tokens appended to a real prompt), the smallest such bucket."""
    from megatron_ssm.inference.cuda_graphs import GraphedPrefill

    g = torch.Generator().manual_seed(fresh_seed())
    graphs = GraphedPrefill.__new__(GraphedPrefill)
    graphs.token_buckets, graphs.seq_buckets = (16, 64, 256, 384, 512), (1, 2, 4, 8)
    for _ in range(200):
        n = int(torch.randint(1, 9, (1,), generator=g))
        lengths = torch.randint(1, 80, (n,), generator=g).tolist()
        shape = graphs.shape_for(lengths)
        total, fits = sum(lengths), []
        for S in graphs.seq_buckets:
            fits += [(T, S) for T in graphs.token_buckets
                     if S >= n and T - total >= S - n and (T > total) == (S > n)]
        assert shape == (min(fits, key=lambda f: (graphs.seq_buckets.index(f[1]), f[0])) if fits else None), lengths


def test_capture_all_takes_every_bucket_once_largest_first():
    """A server captures up front every shape `shape_for` can ask for (so no request waits on a
    capture), the largest first (it sizes the shared memory pool), none twice."""
    from megatron_ssm.inference.cuda_graphs import GraphedPrefill

    g = torch.Generator().manual_seed(fresh_seed())
    graphs = GraphedPrefill.__new__(GraphedPrefill)
    graphs.token_buckets, graphs.seq_buckets = (4, 16, 64, 256), (1, 2, 8)
    taken = []
    graphs._capture = lambda T, S: (taken.append((T, S)), graphs.graphs.setdefault((T, S), None))  # noqa: E731
    graphs.graphs = {(16, 2): None}  # one a pack already needed: not taken again
    graphs.capture_all()
    assert taken[0] == (256, 8) and len(taken) == len(set(taken)) and (16, 2) not in taken, taken
    assert set(taken) | {(16, 2)} == {(T, S) for T in (4, 16, 64, 256) for S in (1, 2, 8) if S <= T}, taken
    assert taken == sorted(taken, reverse=True), taken
    for _ in range(100):  # whatever a pack asks for is there
        lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        shape = graphs.shape_for(lengths)
        assert shape is None or shape in graphs.graphs, (lengths, shape)


def test_packs_fill_graph_buckets_in_admission_order():
    """Admitted prompts cut into packs in order, each one a graph bucket holds, each as full as the
    next prompt allows: 32 prompts of 512 tokens make two exact 8192-token packs of 16 (no padding)."""
    from megatron_ssm.inference.cuda_graphs import PREFILL_SEQ_BUCKETS, PREFILL_TOKEN_BUCKETS, GraphedPrefill
    from megatron_ssm.inference.engine import plan_packs

    graphs = GraphedPrefill.__new__(GraphedPrefill)
    graphs.token_buckets, graphs.seq_buckets = PREFILL_TOKEN_BUCKETS, PREFILL_SEQ_BUCKETS
    fits = lambda p: graphs.shape_for(p) is not None  # noqa: E731
    assert plan_packs([512] * 32, 8192, 16, fits) == [list(range(16)), list(range(16, 32))]
    assert [graphs.shape_for([512] * 16)] == [(8192, 16)]
    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(50):
        lengths = torch.randint(1, 3000, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
        packs = plan_packs(lengths, 8192, 16, fits)
        assert sum(packs, []) == list(range(len(lengths))), lengths
        for this, after in zip(packs, packs[1:] + [None]):
            held = [lengths[i] for i in this]
            assert fits(held) and len(held) <= 16 and sum(held) <= 8192, held
            if after is not None:  # the next prompt did not fit this pack
                grown = held + [lengths[after[0]]]
                assert not (fits(grown) and len(grown) <= 16 and sum(grown) <= 8192), grown
    assert plan_packs([5, 7, 9], 100, 2) == [[0, 1], [2]]  # eager packs: only the limits


def test_prefill_stays_under_the_activation_index_limit(ranks, ckpts):
    """Prefill chunks shrink so that batch x tokens x widest row fits 32-bit kernel offsets, with the
    same tokens as one long chunk."""
    prompts = _prompts(fresh_seed(), (20, 20))
    limited, most_tokens = ranks(2).run(_rank_index_limited, ckpts["mamba2"][2], prompts, 6)[0]
    assert most_tokens <= 6
    assert limited == [ranks(2).run(_rank_single, ckpts["mamba2"][2], p, 6)[0] for p in prompts]


@pytest.mark.parametrize("tp", [1, 2])
def test_prefix_hit_equals_miss(ranks, ckpts, tp):
    shared = _prompts(fresh_seed(), (21,))[0]
    tails = _prompts(fresh_seed(), (5, 9, 3))
    (outs, hits) = ranks(tp).run(_rank_prefix, ckpts["mamba2"][tp], shared, tails, 6)[0]
    assert hits >= 2  # the 2nd and 3rd prompts start from the state after 16 shared tokens
    misses = [ranks(tp).run(_rank_single, ckpts["mamba2"][tp], shared + t, 6)[0] for t in tails]
    assert outs == misses


def test_seeded_sampling_is_reproducible_and_equal_across_tp(ranks, ckpts):
    prompts = _prompts(fresh_seed(), (6, 3, 10))
    seed = fresh_seed()
    runs = {tp: ranks(tp).run(_rank_sampling, ckpts["mamba"][tp], prompts, 12, seed)[0] for tp in (1, 2, 4)}
    again = ranks(2).run(_rank_sampling, ckpts["mamba"][2], prompts, 12, seed)[0]
    assert again[0] == runs[2][0]
    assert runs[1][0] == runs[2][0] == runs[4][0]
    for lp in runs[1][1]:
        assert all(math.isfinite(x) and x <= 0 for x in lp)
    assert torch.allclose(torch.tensor(runs[1][1]), torch.tensor(runs[4][1]), atol=1e-4)


@pytest.mark.parametrize("cfg", [dict(prefill_chunk=4096), dict(prefill_chunk=4),
                                 dict(prefill_chunk=5, prefix_block=4, prefix_cache_bytes=1 << 24)],
                         ids=["one-shot", "chunked", "chunked+prefix-cache"])
@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_logprobs_equal_full_recompute(ranks, ckpts, tp, cfg):
    # three same-length prompts (scoring, plain and score-only in one prefill group), others alone
    prompts = _prompts(fresh_seed(), (13, 13, 13, 1, 6, 9))
    kinds, rounds, refs, plain = ranks(tp).run(_rank_prompt_logprobs, ckpts["mamba2"][tp], prompts, **cfg)[0]
    for lps, toks in rounds:
        for i, (kind, lp, tk, ref) in enumerate(zip(kinds, lps, toks, refs)):
            if kind == "plain":
                assert lp is None, i
            else:
                assert lp is not None and len(lp) == len(prompts[i]) - 1, i
                assert torch.allclose(torch.tensor(lp), torch.tensor(ref), atol=1e-4), (i, lp, ref)
            # scoring does not change what is generated; score-only gives one finished output, no token
            assert tk == ([-1] if kind == "score_only" else plain[i]), i


def _rank_check_request(ckpt):
    """(check_request's error, add_request's error) per bad request, and whether anything was queued."""
    from megatron_ssm.inference.engine import Request
    from megatron_ssm.inference.sampling import SamplingParams

    eng = _engine(ckpt, max_batch=1, max_sequence_length=16)
    bad = [Request([]), Request([10**6]), Request([5], 0), Request([5], -1, prompt_logprobs=True),
           Request([5] * 10, 7), Request([5], 2, SamplingParams(temperature=1, top_p=0))]
    out = []
    for req in bad:
        errs = []
        for call in (eng.check_request, eng.add_request):
            try:
                call(req)
                errs.append(None)
            except ValueError as e:
                errs.append(str(e))
        out.append(errs)
    eng.check_request(Request([5] * 16, 0, prompt_logprobs=True))  # scoring a prompt that fills the budget
    return out, eng.has_work()


def test_check_request_refuses_what_add_request_refuses(ranks, ckpts):
    errs, queued = ranks(1).run(_rank_check_request, ckpts["mamba2"][1])[0]
    expected = ["prompt is empty", "outside", "max_new_tokens must be >= 1", "max_new_tokens must be >= 0",
                "context budget", "top_p"]
    for (checked, added), want in zip(errs, expected):
        assert checked is not None and want in checked and added == checked
    assert not queued


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_logprob_equals_log_softmax(ranks, tp):
    logits = torch.randn(5, 64 * tp) * 3
    tokens = torch.randint(0, 64 * tp, (5,))
    got = ranks(tp).run(_rank_logprob, logits, tokens)[0]
    assert torch.allclose(got, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0], atol=1e-5)
