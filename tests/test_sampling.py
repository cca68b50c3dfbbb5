"""Token choice (megatron_ssm.inference.sampling) against references written here from the definitions:
the top-k / top-p kept set by a sorted loop, the drawn token by walking the exact (float64)
probabilities softmax(logits / T) in token order to the generator's uniform number, the vocab-parallel
argmax and log-probability from the gathered logits. Every input is random with a fresh seed that
the failure message names.

The vocab-parallel paths (tp > 1) run twice: as threads of this process (tests/thread_ranks.py: fast,
seen by coverage and mutmut) and on pools of gloo ranks.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_ssm.inference.sampling import SamplingParams, choose_tokens, draw, filter_logits


# ---- references -----------------------------------------------------------------------------------

def kept_tokens(logits: list[float], top_k: int, top_p: float) -> set[int]:
    """The tokens sampling may pick: the top-k by logit (ties at the k-th value kept), then, in order of
    falling probability, every token whose predecessors' probabilities sum to less than top_p."""
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    if top_k and top_k < len(logits):
        kth = logits[order[top_k - 1]]
        order = [i for i in order if logits[i] >= kth]
    if top_p >= 1.0:
        return set(order)
    top = max(logits[i] for i in order)
    weights = [math.exp(logits[i] - top) for i in order]
    total = sum(weights)
    kept, before = set(), 0.0
    for i, w in zip(order, weights):
        if before >= top_p:
            break
        kept.add(i)
        before += w / total
    return kept


def exact_probs(logits: list[float], params: SamplingParams) -> list[float]:
    """softmax(logits / T) over the kept tokens, float64, zero elsewhere."""
    kept = kept_tokens([x / params.temperature for x in logits], params.top_k, params.top_p)
    top = max(logits[i] for i in kept)
    w = [math.exp((x - top) / params.temperature) if i in kept else 0.0 for i, x in enumerate(logits)]
    return [x / sum(w) for x in w]


def inverse_cdf(probs: list[float], u: float, slack: float = 1e-5) -> set[int]:
    """The token whose cumulative-probability interval (in token-id order) holds u; both neighbours
    when u lies within `slack` of an interval's end (float32 rounding may go either way there)."""
    hits, below = set(), 0.0
    for i, p in enumerate(probs):
        if p == 0.0:
            continue
        above = below + p
        if below - slack <= u <= above + slack:
            hits.add(i)
        below = above
    return hits


def _distinct_logits(g: torch.Generator, n: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, generator=g, dtype=torch.float64).mul(scale).float()


# ---- filter_logits ------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    """Hand-worked: probabilities .30 .25 .20 .10 ...; the first three sum to .75, the first two to .55."""
    probs = torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01])
    perm = torch.randperm(8)
    logits = torch.log(probs)[perm]
    rank_of = {j: int(perm[j]) for j in range(8)}  # token j holds the probability at position perm[j]
    for top_p, n in ((0.7, 3), (0.74, 3), (0.76, 4), (0.54, 2), (0.56, 3), (0.29, 1), (0.31, 2), (0.01, 1), (1.0, 8)):
        kept = torch.isfinite(filter_logits(logits, 0, top_p)).nonzero().flatten().tolist()
        assert sorted(rank_of[j] for j in range(8) if j in kept) == list(range(n)), (top_p, perm.tolist())


def test_top_k_keeps_the_k_largest_and_ties_at_the_kth():
    logits = torch.tensor([0.5, 3.0, -1.0, 3.0, 2.0, 0.5])
    for k, want in ((1, {1, 3}), (2, {1, 3}), (3, {1, 3, 4}), (4, {0, 1, 3, 4, 5}), (6, set(range(6))), (0, set(range(6)))):
        out = filter_logits(logits, k, 1.0)
        assert set(torch.isfinite(out).nonzero().flatten().tolist()) == want, k
        assert torch.equal(out[list(want)], logits[list(want)]), "kept logits must be unchanged"


@pytest.mark.parametrize("top_k,top_p", [(0, 0.5), (0, 0.9), (5, 1.0), (20, 0.8), (3, 0.99), (1, 0.2), (40, 0.05)])
def test_filter_logits_equals_sorted_loop(seed, top_k, top_p):
    g = torch.Generator().manual_seed(seed)
    batch = torch.stack([_distinct_logits(g, 40) for _ in range(6)])
    out = filter_logits(batch, top_k, top_p)  # rows filtered independently
    for r in range(6):
        want = kept_tokens(batch[r].tolist(), top_k, top_p)
        got = set(torch.isfinite(out[r]).nonzero().flatten().tolist())
        assert got == want, f"seed {seed}, row {r}: kept {sorted(got)}, expected {sorted(want)}"
        assert torch.equal(out[r][sorted(want)], batch[r][sorted(want)]), f"seed {seed}: kept logits changed"


@pytest.mark.parametrize("top_p,kept", [(0.125, 1), (0.25, 2), (0.5, 4), (0.625, 5), (0.626, 6), (1.0, 8)])
def test_top_p_at_exactly_a_nucleus_sum_stops_there(top_p, kept):
    """Eight equal logits: every probability is exactly 1/8 in float32, so the nucleus of k tokens sums
    to exactly k/8 and the smallest one reaching top_p has ceil(8 top_p) tokens (top_p = 5/8 keeps 5,
    not 6: "reaching" includes equality)."""
    out = filter_logits(torch.zeros(8), 0, top_p)
    assert int(torch.isfinite(out).sum()) == kept == math.ceil(8 * top_p)


def test_top_p_one_keeps_tokens_below_float32_resolution(seed):
    """top_p = 1 (the default) keeps every token, also those whose probability is below float32's
    resolution next to 1 (a nucleus computed anyway would see the first token's probability round
    to 1.0 and drop the rest: sampling could then never pick them)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.cat([torch.zeros(1), -20.0 - 5 * torch.rand(5, generator=g)])
    assert torch.softmax(logits, -1)[0] == 1.0  # the premise: the rest is below resolution
    assert torch.equal(filter_logits(logits, 0, 1.0), logits), f"seed {seed}"


def test_scale_logits_shifts_each_row_by_its_own_maximum(seed):
    """Rows of a batch ([3, 7]): (row - max(row)) / T, each against float64."""
    from megatron_ssm.inference.sampling import scale_logits

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 7, generator=g, dtype=torch.float64) * 4
    logits[1] += 50.0  # rows with different maxima
    want = (logits - logits.max(dim=1, keepdim=True).values) / 0.7
    assert torch.allclose(scale_logits(logits.float(), 0.7).double(), want, atol=1e-5), f"seed {seed}"


# ---- draw: the exact token for the generator's uniform number ----------------------------------------

@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.5), SamplingParams(2.5, top_k=6),
                                    SamplingParams(0.7, top_p=0.8), SamplingParams(1.3, top_k=10, top_p=0.6)],
                         ids=["T1", "T0.5", "T2.5-k6", "T0.7-p0.8", "T1.3-k10-p0.6"])
def test_draw_is_the_inverse_cdf_of_softmax_over_temperature(seed, params):
    g = torch.Generator().manual_seed(seed)
    for trial in range(40):
        logits = _distinct_logits(g, 17, scale=3.0)
        probs = exact_probs(logits.tolist(), params)
        draw_seed = seed + trial
        u = torch.rand((), generator=torch.Generator().manual_seed(draw_seed)).item()
        got = draw(logits, params, torch.Generator().manual_seed(draw_seed))
        want = inverse_cdf(probs, u)
        assert got in want, (f"seed {seed}, trial {trial}, {params}: u={u:.6f} drew {got}, expected {sorted(want)}; "
                             f"probabilities {[round(p, 4) for p in probs]}")


def test_draw_frequencies_follow_the_probabilities(seed):
    """Many draws from one generator: every count within 5 standard deviations of n * p (a
    consumption of more or fewer than one uniform per token would still pass the exact test above)."""
    logits = torch.log(torch.tensor([0.30, 0.25, 0.20, 0.10, 0.08, 0.04, 0.02, 0.01]))
    params = SamplingParams(0.8, top_k=6, top_p=0.9)
    probs = torch.tensor(exact_probs(logits.tolist(), params))
    gen, n = torch.Generator().manual_seed(seed), 4000
    counts = torch.bincount(torch.tensor([draw(logits, params, gen) for _ in range(n)]), minlength=8).double()
    sd = torch.sqrt(probs * (1 - probs) * n)
    assert torch.all((counts - n * probs).abs() <= 5 * sd + 1e-9), (seed, counts.tolist(), (n * probs).tolist())
    assert counts[probs == 0].sum() == 0, (seed, counts.tolist())


def test_sampling_params_validate():
    for bad, match in ((SamplingParams(-0.1), r"temperature must be in \[0, 100\], got -0.1"),
                       (SamplingParams(100.5), "temperature"), (SamplingParams(1.0, top_k=-1), "top_k must be >= 0, got -1"),
                       (SamplingParams(1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
                       (SamplingParams(1.0, top_p=1.01), "top_p")):
        with pytest.raises(ValueError, match=match):
            bad.validate()
    for good in (SamplingParams(0.0), SamplingParams(100.0), SamplingParams(1.0, top_k=0, top_p=1.0),
                 SamplingParams(1.0, top_p=1e-6)):
        good.validate()
    assert SamplingParams(0.0).greedy and not SamplingParams(1e-3).greedy


def test_tiny_temperature_draws_the_best_token(seed):
    """T = 1e-38 (about fp32's smallest normal) sends every logit but the best to -inf, and none to
    +inf (inf - inf would be NaN): always the argmax."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        logits = _distinct_logits(g, 30) + 50.0
        assert draw(logits, SamplingParams(1e-38), g) == int(logits.argmax()), seed


# ---- choose_tokens on one rank and across vocab-parallel ranks --------------------------------------------

def _rank_choose(full: torch.Tensor, vocab: int, params, seeds, want):
    """choose_tokens on this rank's slice of `full` (padded vocabulary: columns >= vocab are -inf)."""
    from megatron_ssm.inference.sampling import VocabShard
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    per = full.shape[-1] // tp.size
    local = full[:, tp.rank * per:(tp.rank + 1) * per]
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    return choose_tokens(local, params, gens, want, VocabShard(tp.rank * per, vocab, tp))


def _choose_case(seed: int, tp: int):
    g = torch.Generator().manual_seed(seed)
    vocab, padded = 32 * tp - 7, 32 * tp  # padding on the last rank: logits of ids >= vocab are never chosen
    full = torch.full((5, padded), float("-inf"))
    full[:, :vocab] = torch.stack([_distinct_logits(g, vocab) for _ in range(5)])
    full[1, 7] = full[1, vocab - 3] = full[1, :vocab].max() + 1  # a tie (across ranks at tp > 1): the lowest id wins
    full[4, vocab - 1] = full[4, :vocab].max() + 2  # the best token in the last real column
    params = [SamplingParams(), SamplingParams(), SamplingParams(0.9, top_k=8, seed=1), SamplingParams(),
              SamplingParams(1.4, top_p=0.7)]
    seeds = [None, None, seed + 1, None, seed + 2]
    return full, vocab, params, seeds


def _check_choose(seed, full, vocab, params, seeds, tokens, logprobs):
    ref_lp = torch.log_softmax(full[:, :vocab].double(), -1)
    for i, p in enumerate(params):
        row = full[i, :vocab]
        if p.greedy:
            want = {int((row == row.max()).nonzero()[0])}
        else:
            u = torch.rand((), generator=torch.Generator().manual_seed(seeds[i])).item()
            want = inverse_cdf(exact_probs(row.tolist(), p), u)
        assert int(tokens[i]) in want, f"seed {seed}, row {i}: chose {int(tokens[i])}, expected {sorted(want)}"
        assert abs(logprobs[i].item() - ref_lp[i, int(tokens[i])].item()) < 1e-5, f"seed {seed}, row {i}"


def test_choose_tokens_one_rank(seed):
    from megatron_ssm.inference.sampling import VocabShard
    from megatron_ssm.parallel import TPContext

    full, vocab, params, seeds = _choose_case(seed, 1)
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    tp = TPContext(rank=0, size=1, group=None, device=torch.device("cpu"))
    tokens, lps = choose_tokens(full, params, gens, [True] * 5, VocabShard(0, vocab, tp))
    _check_choose(seed, full, vocab, params, seeds, tokens, lps)
    greedy_only, none = choose_tokens(full[[0, 1]], params[:2], gens[:2], [False, False], VocabShard(0, vocab, tp))
    assert greedy_only.tolist() == tokens[:2].tolist() and none is None
    # every row sampled: no argmax pass, tokens still one per row
    gens = [torch.Generator().manual_seed(s) for s in seeds[2::2]]
    sampled, _ = choose_tokens(full[[2, 4]], [params[2], params[4]], gens, [False, False], VocabShard(0, vocab, tp))
    assert sampled.tolist() == tokens[[2, 4]].tolist(), seed
    # a decode graph's argmax, given: returned as it is when every row is greedy (the graph's input
    # already holds it), copied, never written, when a sampled row replaces its entry
    given = torch.randint(0, vocab, (5,))
    kept = given.clone()
    gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
    mixed, lps = choose_tokens(full, params, gens, [True] * 5, VocabShard(0, vocab, tp), greedy=given)
    assert torch.equal(given, kept) and mixed.data_ptr() != given.data_ptr(), seed
    assert mixed[[0, 1, 3]].tolist() == given[[0, 1, 3]].tolist() and mixed[[2, 4]].tolist() == tokens[[2, 4]].tolist()
    same, _ = choose_tokens(full[[0, 1]], params[:2], gens[:2], [False, False], VocabShard(0, vocab, tp),
                            greedy=given[:2])
    assert same.data_ptr() == given.data_ptr(), seed


@pytest.mark.parametrize("tp", [2, 4])
def test_choose_tokens_vocab_parallel(ranks, seed, tp):
    full, vocab, params, seeds = _choose_case(seed, tp)
    results = ranks(tp).run(_rank_choose, full, vocab, params, seeds, [True] * 5)
    for tokens, lps in results:
        _check_choose(seed, full, vocab, params, seeds, tokens, lps)


@pytest.mark.parametrize("tp", [2, 4])
def test_choose_tokens_vocab_parallel_threads(monkeypatch, seed, tp):
    from megatron_ssm.inference import sampling
    from megatron_ssm.inference.sampling import VocabShard
    from thread_ranks import run_ranks

    full, vocab, params, seeds = _choose_case(seed, tp)
    per = full.shape[-1] // tp

    def rank(ctx):
        local = full[:, ctx.rank * per:(ctx.rank + 1) * per]
        gens = [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]
        return choose_tokens(local, params, gens, [True] * 5, VocabShard(ctx.rank * per, vocab, ctx))

    for tokens, lps in run_ranks(tp, rank, sampling, monkeypatch=monkeypatch):
        _check_choose(seed, full, vocab, params, seeds, tokens, lps)


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_argmax_and_logprob_threads(monkeypatch, seed, tp):
    """Ties between ranks go to the lowest token id; a rank holding only padding (-inf) adds nothing."""
    from megatron_ssm.inference import sampling
    from megatron_ssm.inference.sampling import VocabShard, vocab_parallel_argmax, vocab_parallel_logprob
    from thread_ranks import run_ranks

    g = torch.Generator().manual_seed(seed)
    per = 16
    full = torch.randn(4, per * tp, generator=g) * 3
    full[0, per + 3] = full[0, 2] = full[0].max() + 1  # tie across ranks 0 and 1
    full[1, -1] = full[1].max() + 1  # best in the last column
    full[2, per * (tp - 1):] = float("-inf")  # the last rank holds padding only
    full[3] += 300.0  # exp overflows fp32 unless every rank shifts by the true maximum
    vocab = per * tp
    # first and last column of a rank: where an off-by-one in "which rank owns the token" shows
    tokens = torch.tensor([per, per - 1, 0, per * (tp - 1) - 1])

    def rank(ctx):
        local = full[:, ctx.rank * per:(ctx.rank + 1) * per]
        shard = VocabShard(ctx.rank * per, vocab, ctx)
        return vocab_parallel_argmax(local, shard), vocab_parallel_logprob(local, tokens, shard)

    want_lp = torch.log_softmax(full.double(), -1).gather(1, tokens[:, None])[:, 0]
    for best, lp in run_ranks(tp, rank, sampling, monkeypatch=monkeypatch):
        assert best.tolist() == [2, per * tp - 1, int(full[2].argmax()), int(full[3].argmax())], seed
        assert torch.allclose(lp.double(), want_lp, atol=1e-5), (seed, lp, want_lp)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocab_parallel_topk_threads(monkeypatch, seed, tp):
    """The k best tokens and their log-probs equal torch.topk of log_softmax over the gathered
    vocabulary (ties across ranks: the lower id first), padding never among them, k capped at the
    real vocabulary."""
    from megatron_ssm.inference import sampling
    from megatron_ssm.inference.sampling import VocabShard, vocab_parallel_topk
    from thread_ranks import run_ranks

    g = torch.Generator().manual_seed(seed)
    per, vocab = 16, 16 * tp - 5  # the last rank holds 5 columns of padding
    full = torch.randn(3, per * tp, generator=g) * 2
    full[:, vocab:] = float("-inf")
    full[0, 1] = full[0, per * tp - 6] = full[0, :vocab].max() + 1  # a tie between the first and last rank

    def rank(ctx, k):
        local = full[:, ctx.rank * per:(ctx.rank + 1) * per]
        return vocab_parallel_topk(local, k, VocabShard(ctx.rank * per, vocab, ctx))

    ref = torch.log_softmax(full[:, :vocab].double(), -1)
    for k in (1, 3, 20, 1000):
        want_k = min(k, vocab)
        want_lp, want_ids = torch.topk(ref, want_k, dim=-1)
        for lps, ids in run_ranks(tp, lambda ctx: rank(ctx, k), sampling, monkeypatch=monkeypatch):
            assert ids.shape == (3, want_k) and lps.shape == (3, want_k), (seed, k, ids.shape)
            assert ids[0, :2].tolist() == [1, per * tp - 6][:want_k], (seed, k, ids[0].tolist())
            assert torch.allclose(lps.double(), want_lp, atol=1e-5), (seed, k)
            assert bool((ids < vocab).all()), (seed, k, ids.tolist())
            # as a set per row (equal values may come in either order past the tie above)
            assert all(set(a) == set(b) for a, b in zip(ids[1:].tolist(), want_ids[1:].tolist())), (seed, k)
