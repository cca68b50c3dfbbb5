"""The hybrids (Nemotron-H, Falcon-H1) at TP 1, 2 and 4 against HF transformers' own code: prefill
logits, cached decode, greedy generation, the engine's batching / chunking / prefix reuse, and the
converter's exact round trip."""
from __future__ import annotations

import pytest
import torch

from hf_models import (assert_hf_round_trip, build_hf_model, converted_models, fresh_seed,
                       hf_greedy, hf_logits, hybrid_config, save_hf, scaled_max_diff)
from megatron_ssm.checkpoint.convert import convert
from megatron_ssm.config import ConfigError, SSMConfig
from test_model_vs_hf import TOL, _rank_generate, _rank_logits

# (family, options): kv heads 2 are split at TP 2 and replicated at TP 4; n_groups 2 likewise
CASES = [
    pytest.param("nemotron_h", dict(pattern="M*-M"), id="nemotron-kv2-g2"),
    pytest.param("nemotron_h", dict(pattern="*M-*", heads=8, kv_heads=4, n_groups=1, tied=True),
                 id="nemotron-kv4-g1-tieflag"),
    pytest.param("falcon_h1", dict(), id="falcon-h1-kv2-g2"),
    pytest.param("falcon_h1", dict(kv_heads=4, n_groups=1, mamba_norm=False, layers=1), id="falcon-h1-kv4-nonorm"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, options) -> (hf model, hf dir, {tp: checkpoint dir}), built once per case."""
    get = converted_models(tmp_path_factory, hybrid_config)
    return lambda family, opts: get(family, opts)[:3]


def _close(ours, ref, what=""):
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"{what}max |ours - HF| = {err}"


# ---- run on every rank -------------------------------------------------------------------------

def _rank_prefill_then_decode(ckpt: str, input_ids: torch.Tensor, split: int, overlap: bool = False):
    """Logits of positions split-1.. from prefilling [:split] then decoding a token at a time over
    the KV cache (capacity exactly the sequence: the last step fills it). overlap: the prefill runs
    as two micro-chunks with overlapped all-reduces, in two calls (a prefix of 3 tokens, then the
    rest) that say how many positions every row holds (the engine's causal-kernel path), and all
    positions' logits are returned."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    model = load_model(ckpt, tp)
    model.overlap_min_tokens = 1 if overlap else 0
    b, L = input_ids.shape
    cache = StateCache(model.state_shapes(L - 1), b, dtype=model.dtype, device=torch.device("cpu"))
    states = cache.rows(0, b)
    with torch.no_grad():
        if overlap:
            outs = [model(input_ids[:, :3], [s.upto(3, 0) for s in states]),
                    model(input_ids[:, 3:split], [s.upto(split, 3) for s in states])]
        else:
            outs = [model(input_ids[:, :split], states)[:, -1:]]
        for t in range(split, L - 1):
            outs.append(model(input_ids[:, t:t + 1], states))
        full = gather_logits(torch.cat(outs, dim=1), model.cfg.vocab_size, tp)
    return full if tp.is_first else None


def _rank_decode_through_gemv(ckpt: str, input_ids: torch.Tensor, split: int):
    """_rank_prefill_then_decode with every linear of at most GEMV_MAX_ROWS rows (attention, MLP,
    mixers, LM head) in the skinny-GEMM kernel, under Triton's interpreter."""
    import os

    from megatron_ssm.ops.dispatch import ENTRY_ROWS_ENV, LINEAR_ENV

    # every decode row's block entry inside its first projection's launch too (add_rms_norm_linear)
    os.environ.update({LINEAR_ENV: "triton", ENTRY_ROWS_ENV: "16"})
    try:
        return _rank_prefill_then_decode(ckpt, input_ids, split)
    finally:
        del os.environ[LINEAR_ENV], os.environ[ENTRY_ROWS_ENV]


def _rank_engine_runs(ckpt: str, prompts: list[list[int]], new: int):
    """The same requests alone, batched with queueing, in 5-token prefill chunks, and twice through
    a prefix cache of 4-token blocks (the second pass starts from saved SSM states + KV prefixes)."""
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    longest = max(map(len, prompts)) + new

    def run(reqs=None, **cfg):
        eng = Engine(model, EngineConfig(max_sequence_length=longest, **cfg))
        return eng, eng.generate(reqs or [Request(p, new) for p in prompts])

    alone = [run([Request(p, new)], max_batch=1, decode_ahead=False)[1][0] for p in prompts]
    queued = run(max_batch=2)[1]
    # Decode steps launched ahead, request 0 stopping on a token mid-run: its slot takes the last
    # sequence's state and K/V while a step is in flight.
    toks = alone[0]
    stop = next(((j, t) for j, t in enumerate(toks) if j >= 2 and t not in toks[:j]), (len(toks) - 1, -1))
    reqs = [Request(p, new - i % 3, stop_ids=(stop[1],) if i == 0 else ()) for i, p in enumerate(prompts)]
    ahead_eng, ahead = run(reqs, max_batch=4, decode_ahead=True)
    chunked = run(max_batch=4, prefill_chunk=5)[1]
    eng = Engine(model, EngineConfig(max_batch=4, max_sequence_length=longest, prefix_block=4,
                                     prefix_cache_bytes=1 << 26))
    first = eng.generate([Request(p, new) for p in prompts])
    again = eng.generate([Request(p, new) for p in prompts])
    return alone, queued, chunked, first, again, eng.prefix.hits, (ahead, ahead_eng.steps_ahead, stop[0])


def _rank_forks(ckpt: str, prompts: list[list[int]], new: int):
    """n = 3 greedy forks of prompts[2] beside a request for prompts[1]: each fork copies SSM states
    and KV rows. Tokens per request id."""
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    forks = Engine(model, EngineConfig(max_batch=5, max_sequence_length=max(map(len, prompts)) + new))
    forks.add_request(Request(prompts[2], new, n=3))
    forks.add_request(Request(prompts[1], new))
    forked: dict[int, list[int]] = {}
    while forks.has_work():
        for o in forks.step():
            forked.setdefault(o.request_id, []).append(o.token)
    return [forked[i] for i in sorted(forked)]


def _rank_padded_rows(ckpt: str, input_ids: torch.Tensor):
    """A decode step over a live row and a free slot whose length is at the KV capacity (what a CUDA
    graph's padding rows reach): the free slot must not write out of the cache, the live row must
    not notice it. Returns (live row's logits, the same row decoded alone)."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    T = input_ids.shape[1] + 1
    out = []
    for rows in (2, 1):
        cache = StateCache(model.state_shapes(T), rows, dtype=model.dtype, device=torch.device("cpu"))
        states = cache.rows(0, rows)
        with torch.no_grad():
            model(input_ids[:rows], states)
            for st in states:
                if st.length is not None and rows == 2:
                    st.length[1] = T  # the free slot is full
            out.append(model(input_ids[:rows, -1:], states)[0])
    return out


def _rank_too_long(ckpt: str):
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    eng = Engine(load_model(ckpt, tp_context(torch.device("cpu"))), EngineConfig(max_batch=1, max_sequence_length=8))
    try:
        eng.add_request(Request([5] * 6, 3))
    except ValueError as e:
        return str(e)
    return None


def _rank_packed_vs_alone(ckpt: str, lengths: tuple[int, ...], seed: int):
    """Prompts of these lengths packed in one forward (cu_seqlens) beside each run alone from an empty
    slot: max |difference| over each tensor's scale (hf_models.scaled_max_diff) of the last logits, of
    every position's logits (no state), of the states left (conv, SSM, keys/values at the filled
    positions, lengths), and of the next decode step's logits from each cache."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.load import load_model
    from megatron_ssm.ops.varlen import cu_seqlens_of
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]
    n, cap = len(prompts), max(lengths) + 2
    packed = StateCache(model.state_shapes(cap), n, dtype=model.dtype, device=torch.device("cpu"))
    for layer in packed.layers:  # what the rows held before is never read
        for t in layer.values():
            t.normal_() if t.is_floating_point() else t.fill_(3)
    alone = StateCache(model.state_shapes(cap), n, dtype=model.dtype, device=torch.device("cpu"))
    ids = torch.tensor([t for p in prompts for t in p]).view(1, -1)
    cu = cu_seqlens_of(list(lengths), "cpu")
    with torch.no_grad():
        last = model(ids, packed.rows(0, n), last_only=True, cu_seqlens=cu)[:, -1]
        every = model(ids, None, cu_seqlens=cu)[0]
        alone_last = torch.stack([model(torch.tensor([p]), alone.rows(i, i + 1), last_only=True)[0, -1]
                                  for i, p in enumerate(prompts)])
        alone_every = torch.cat([model(torch.tensor([p]))[0] for p in prompts])
        pairs = []  # keys/values only at the positions each prompt filled
        for a, b in zip(packed.layers, alone.layers):
            for name in a:
                if name in ("k", "v"):
                    pairs += [(a[name][i, :L], b[name][i, :L]) for i, L in enumerate(lengths)]
                else:
                    pairs.append((a[name], b[name]))
        states = max(scaled_max_diff(x, y) for x, y in pairs)
        nxt = torch.randint(3, 250, (n, 1), generator=g)
        step_packed, step_alone = model(nxt, packed.rows(0, n)), model(nxt, alone.rows(0, n))

    diff = scaled_max_diff  # this rank's slice of the logits
    return diff(last, alone_last), diff(every, alone_every), states, diff(step_packed, step_alone)


# ---- tests -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2, 4])  # kv heads split at TP 2, replicated at TP 4
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[1], CASES[2]])
def test_packed_prefill_equals_each_prompt_alone(ranks, converted, family, opts, tp):
    """Prompts of different lengths in one packed forward (attention block-diagonal and from position
    0 in each; Falcon-H1's parallel blocks too) give each one's logits and leave the states, keys,
    values and lengths a lone prefill leaves: the next decode step agrees."""
    _, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    for last, every, states, step in ranks(tp).run(_rank_packed_vs_alone, ckpts[tp], (7, 1, 2, 13), seed):
        assert max(last, every, states, step) < 1e-4, (seed, last, every, states, step)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", CASES)
def test_prefill_logits_match_hf(ranks, converted, family, opts, tp):
    model, _, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (2, 37))
    _close(ranks(tp).run(_rank_logits, ckpts[tp], ids)[0], hf_logits(model, ids))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2], CASES[3]])
def test_cached_decode_equals_full_recompute(ranks, converted, family, opts, tp):
    model, _, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (3, 29))
    split = int(torch.randint(1, 20, ()).item())
    ref = hf_logits(model, ids)[:, split - 1:-1]
    _close(ranks(tp).run(_rank_prefill_then_decode, ckpts[tp], ids, split)[0], ref, f"split={split}: ")


@pytest.mark.parametrize("family,opts,tp", [(*CASES[0].values, 2), (*CASES[2].values, 1)], ids=["nemotron-tp2", "falcon-h1-tp1"])
def test_decode_through_the_gemv_kernel_matches_hf(ranks, converted, family, opts, tp):
    """Attention, MLP and mixer projections of a hybrid in the skinny-GEMM kernel (interpreted)."""
    from interpreter import interpreter_problem

    if problem := interpreter_problem():
        pytest.skip(problem)
    model, _, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (3, 8))
    ref = hf_logits(model, ids)[:, 4:-1]
    _close(ranks(tp).run(_rank_decode_through_gemv, ckpts[tp], ids, 5)[0], ref, "through gemv: ")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2]])
def test_overlapped_prefill_matches_hf(ranks, converted, family, opts, tp):
    model, _, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (2, 41))
    split = int(torch.randint(5, 36, ()).item())
    ref = hf_logits(model, ids)[:, :-1]
    _close(ranks(tp).run(_rank_prefill_then_decode, ckpts[tp], ids, split, True)[0], ref, f"split={split}: ")


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[2]])
def test_greedy_generation_matches_hf_generate(ranks, converted, family, opts, tp):
    model, _, ckpts = converted(family, opts)
    g = torch.Generator().manual_seed(fresh_seed())
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 1, 12)]
    expected = [hf_greedy(model, p, 8) for p in prompts]
    assert ranks(tp).run(_rank_generate, ckpts[tp], prompts, 8) == [expected] * tp


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2]])
def test_engine_batching_chunking_and_prefix_reuse_agree(ranks, converted, family, opts, tp):
    """Continuous batching with slot moves, decode steps launched ahead, chunked prefill continuing
    from cached K/V, prefix hits (SSM states + KV prefix) and n > 1 forks all give the tokens a lone
    request gets, which are HF's."""
    model, _, ckpts = converted(family, opts)
    g = torch.Generator().manual_seed(fresh_seed())
    shared = torch.randint(3, 250, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 0, 7)] + [shared[:2]]
    alone, queued, chunked, first, again, hits, (ahead, steps_ahead, stop_at) = ranks(tp).run(
        _rank_engine_runs, ckpts[tp], prompts, 6)[0]
    forked = ranks(tp).run(_rank_forks, ckpts[tp], prompts, 6)[0]
    assert alone == [hf_greedy(model, p, 6) for p in prompts]
    assert queued == alone and chunked == alone and first == alone and again == alone
    assert ahead == [alone[0][:stop_at + 1]] + [a[:6 - i % 3] for i, a in enumerate(alone)][1:] and steps_ahead > 0
    assert hits >= 3
    assert forked == [alone[2]] * 3 + [alone[1]]


def test_rows_past_the_kv_capacity_stay_inside_the_cache(ranks, converted):
    _, _, ckpts = converted(*CASES[0].values)
    padded, alone = ranks(1).run(_rank_padded_rows, ckpts[1], torch.randint(0, 250, (2, 7)))[0]
    assert (padded - alone)[..., :250].abs().max().item() < 1e-5  # batch 2 vs 1: same math, other blocking


def test_request_past_the_kv_cache_is_refused(ranks, converted):
    _, _, ckpts = converted(*CASES[0].values)
    msg = ranks(1).run(_rank_too_long, ckpts[1])[0]
    assert msg and "exceeds the context budget of 8 tokens" in msg and "KV cache" in msg


# ---- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("family,dtype,opts", [
    pytest.param("nemotron_h", torch.bfloat16, dict(pattern="M*-M"), id="nemotron-bf16"),
    pytest.param("falcon_h1", torch.float32, dict(), id="falcon-h1-fp32"),
])
def test_hf_tp2_tp4_hf_is_bit_exact(tmp_path, family, dtype, opts):
    model = build_hf_model(hybrid_config(family, **opts), fresh_seed()).to(dtype)
    hf = save_hf(model, tmp_path / "hf")
    convert(hf, tmp_path / "tp2", 2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "tp4", 4, progress=False)
    convert(tmp_path / "tp4", tmp_path / "back", to_hf=True, progress=False)
    assert_hf_round_trip(model, hf, tmp_path / "back", dtype)


def test_moe_layers_and_bad_tp_degrees_are_refused(tmp_path):
    raw = hybrid_config("nemotron_h", pattern="M*-M").to_dict()
    moe = dict(raw, layers_block_type=["mamba", "moe", "attention", "mlp"])
    with pytest.raises(ConfigError, match=r"MoE \('E'\) layers, which are not supported"):
        SSMConfig.from_hf(moe)
    cfg = SSMConfig.from_hf(raw)
    assert cfg.pattern == "M*-M"
    with pytest.raises(ConfigError, match="TP degree 8 does not divide the 4 attention heads"):
        cfg.validate(8)
    with pytest.raises(ConfigError, match="one must divide the other"):
        SSMConfig.from_hf(dict(raw, num_attention_heads=6, num_key_value_heads=3, head_dim=16)).validate(2)
