"""Context-parallel prefill (a prompt split along time over CP ranks, with TP inside each) against HF
transformers' own Mamba / FalconMamba / Mamba2, at (tp, cp) = (1, 2), (1, 4) and (2, 2)."""
from __future__ import annotations

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, hf_greedy, hf_logits, hybrid_config, save_hf
from megatron_ssm.checkpoint.convert import convert

TOL = 1e-4
LAYOUTS = [pytest.param(1, 2, id="tp1-cp2"), pytest.param(1, 4, id="tp1-cp4"), pytest.param(2, 2, id="tp2-cp2")]
CASES = [
    pytest.param("mamba", dict(), id="mamba1"),
    pytest.param("falcon_mamba", dict(), id="falcon"),
    pytest.param("mamba2", dict(n_groups=1), id="mamba2-g1"),
    pytest.param("mamba2", dict(n_groups=2, tied=False), id="mamba2-g2"),
    # hybrids: attention layers gather the earlier spans' keys/values
    pytest.param("nemotron_h", dict(pattern="M*-M"), id="nemotron-h"),
    pytest.param("falcon_h1", dict(), id="falcon-h1"),
]
HYBRIDS = ("nemotron_h", "falcon_h1")


# ---- run on every rank -------------------------------------------------------------------------

def _load(ckpt):
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import cp_context, tp_context

    tp = tp_context(torch.device("cpu"))
    return load_model(ckpt, tp), tp, cp_context()


def _rank_cp_prefill_then_decode(ckpt: str, ids: torch.Tensor, cuts: list[int]):
    """Prefill ids[:, :cuts[-1]] as consecutive context-parallel forwards ending at each cut (each
    continuing from the states the previous one left), then decode the remaining tokens one at a
    time. Returns every position's logits but the last (full vocabulary) and the final SSM states'
    checksums per layer (equal on every CP rank)."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.context_parallel import ContextParallelSpans

    model, tp, cp = _load(ckpt)
    b, L = ids.shape
    states = StateCache(model.state_shapes(L), b, dtype=model.dtype, device=torch.device("cpu")).rows(0, b)
    unit = model.cfg.chunk_size if model.cfg.is_mamba2 else 1
    outs, start = [], 0
    with torch.no_grad():
        for end in cuts:
            spans = ContextParallelSpans.split(cp, end - start, unit)
            outs.append(model(ids[:, start:end], states, cp=spans))
            start = end
        for t in range(start, L - 1):
            outs.append(model(ids[:, t:t + 1], states))
        full = gather_logits(torch.cat(outs, dim=1), model.cfg.vocab_size, tp)
    sums = [[t.double().sum().item() for t in s.tensors().values()] for s in states]
    return (full if tp.is_first else None), sums


def _rank_bytes_per_layer(ckpt: str, lengths: list[int]):
    """Bytes this rank sends through the CP exchange per layer for one prefill of each length."""
    import megatron_ssm.model.context_parallel as cpmod

    model, tp, cp = _load(ckpt)
    counted = []
    real = cpmod.exchange

    def counting(tensor, group):
        counted[-1] += tensor.numel() * tensor.element_size()
        return real(tensor, group)

    cpmod.exchange = counting
    try:
        for n in lengths:
            counted.append(0)
            ids = torch.randint(3, 250, (1, n), generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                model(ids, cp=cpmod.ContextParallelSpans.split(cp, n), last_only=True)
            counted[-1] //= model.cfg.num_layers
    finally:
        cpmod.exchange = real
    return counted


def _rank_engine_serving(ckpt: str, short: list[int], long: list[int], shared: list[int]):
    """Through the engine with CP on from 100 tokens: a short request decoding while a long one is
    prefilled context-parallel, a second short one arriving meanwhile, then a long prompt sharing
    most of the first's tokens, asking for n=2 (forked once prefilled). Returns (tokens per request,
    the fork's tokens, request ids with output per step, prefix hits of the shared prompt)."""
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request

    model, tp, cp = _load(ckpt)
    eng = Engine(model, EngineConfig(max_batch=3, prefill_chunk=64, context_parallel_min_tokens=100,
                                     prefix_block=64, prefix_cache_bytes=1 << 26, max_sequence_length=400), cp=cp)
    out: dict[int, list[int]] = {}
    log: list[list[int]] = []

    class WideGraphs:  # stands in for GPU decode graphs whose bucket covers every slot
        def bucket(self, n):
            return eng.cache.slots

        def __call__(self, tokens, n):
            assert eng.long is None, "a decode graph would step the slot of the CP prefill under way"
            return None  # run eagerly

    eng.graphed = WideGraphs()

    def step():
        outs = eng.step()
        log.append([o.request_id for o in outs])
        for o in outs:
            out.setdefault(o.request_id, []).append(o.token)

    a = eng.add_request(Request(short, 16))
    step()
    b_ = eng.add_request(Request(long, 8))
    c = eng.add_request(Request(short[:5], 8))
    while eng.has_work():
        step()
    hits = eng.prefix.hits
    d = eng.add_request(Request(shared, 8, n=2))
    while eng.has_work():
        step()
    return [out[i] for i in (a, b_, c, d)], out[d + 1], log, eng.prefix.hits - hits


def _rank_load_when_one_world_rank_fails(ckpt: str, bad: int):
    """Load, with world rank `bad` failing inside its own load: what each rank raises (None: loaded)."""
    import torch.distributed as dist

    from megatron_ssm.checkpoint.hf import CheckpointError
    from megatron_ssm.model import load as load_mod

    real = load_mod._load

    def flaky(*args):
        if dist.get_rank() == bad:
            raise CheckpointError("simulated unreadable shard")
        return real(*args)

    load_mod._load = flaky
    try:
        _load(ckpt)
        return None
    except CheckpointError as e:
        return str(e)
    finally:
        load_mod._load = real


# ---- tests -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, options) -> (hf model, {tp: checkpoint dir}, (seed, prompts [2, 318], HF's logits)),
    built once per case (HF's slow Mamba-1 path is not rerun for every layout)."""
    built = {}

    def get(family, opts):
        key = (family, tuple(sorted(opts.items())))
        if key not in built:
            root = tmp_path_factory.mktemp(f"cp-{family}")
            seed = fresh_seed()
            config = hybrid_config(family, **opts) if family in HYBRIDS else hf_config(family, **opts)
            model = build_hf_model(config, seed)
            hf_dir = save_hf(model, root / "hf")
            ckpts = {tp: str(root / f"tp{tp}") for tp in (1, 2)}
            for tp, path in ckpts.items():
                convert(hf_dir, path, tp, progress=False)
            ids = torch.randint(3, 250, (2, 318), generator=torch.Generator().manual_seed(seed))
            built[key] = (model, ckpts, (seed, ids, hf_logits(model, ids)[:, :-1]))
        return built[key]

    return get


@pytest.fixture(scope="module")
def served(converted):
    """(family, options) -> (seed, the engine test's prompts, HF's greedy tokens for each)."""
    built = {}

    def get(family, opts):
        key = (family, tuple(sorted(opts.items())))
        if key not in built:
            model, _, (seed, ids, _) = converted(family, opts)
            short, long = ids[1, :9].tolist(), ids[0].tolist()
            shared = long[:280] + ids[1, -40:].tolist()
            prompts = [short, long, short[:5], shared]
            built[key] = (seed, prompts, [hf_greedy(model, p, n) for p, n in zip(prompts, (16, 8, 8, 8))])
        return built[key]

    return get


@pytest.mark.parametrize("tp,cp", LAYOUTS)
@pytest.mark.parametrize("family,opts", CASES)
def test_cp_prefill_logits_and_decode_match_hf(ranks, converted, family, opts, tp, cp):
    """Two context-parallel prefill forwards (of 203 and 110 tokens: neither divides by cp or the
    chunk of 16; the second starts from the first's states) then decode: HF's logits everywhere, and
    every CP rank holds the same final states."""
    _, ckpts, (seed, ids, ref) = converted(family, opts)
    results = ranks(tp * cp, tp=tp).run(_rank_cp_prefill_then_decode, ckpts[tp], ids, [203, 313])
    ours = results[0][0]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed={seed}: max |CP - HF| = {err}"
    for r in range(tp, tp * cp):  # CP rank r // tp holds what TP rank r % tp of CP rank 0 holds
        assert results[r][1] == results[r % tp][1], f"seed={seed}: rank {r}'s final states differ"


@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2]])
def test_cp_bytes_per_layer_do_not_grow_with_length(ranks, converted, family, opts):
    _, ckpts, _ = converted(family, opts)
    short, long = ranks(2, tp=1).run(_rank_bytes_per_layer, ckpts[1], [96, 480])[0]
    assert short > 0 and short == long, f"bytes per layer: {short} at 96 tokens, {long} at 480"


@pytest.mark.parametrize("tp,cp", LAYOUTS)
@pytest.mark.parametrize("family,opts", CASES)
def test_engine_cp_prefill_serves_others_and_reuses_prefixes(ranks, converted, served, family, opts, tp, cp):
    """HF's greedy tokens for every request; the short request gets tokens while the long prompt's
    context-parallel prefill is under way; the shared prompt starts from a saved prefix state; every
    rank's engine gives the same tokens."""
    seed, prompts, expected = served(family, opts)
    ckpt = converted(family, opts)[1][tp]
    results = ranks(tp * cp, tp=tp).run(_rank_engine_serving, ckpt, prompts[0], prompts[1], prompts[3])
    tokens, fork, log, hits = results[0]
    assert tokens == expected, f"seed={seed}"
    assert fork == expected[3], f"seed={seed}: the greedy fork of the shared prompt differs"
    assert all(r[0] == tokens for r in results), f"seed={seed}: ranks disagree"
    first_long = next(i for i, ids in enumerate(log) if 1 in ids)
    assert any(0 in ids for ids in log[1:first_long]), f"seed={seed}: no decode during the long prefill: {log}"
    assert hits == 1, f"seed={seed}: the shared prompt found no prefix state"


def test_torchrun_generate_with_context_parallel_matches_hf(converted, tmp_path):
    """examples/generate.py on 2 ranks at CP=2 (a TP=1 checkpoint, loaded by both CP ranks): a long
    prompt prefilled context-parallel and a short one, HF's greedy tokens. (2 ranks, not 4: each
    torchrun rank imports torch and megatron afresh, which is most of this test's time on CI.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    model, ckpts, (seed, ids, _) = converted("mamba2", dict(n_groups=1))
    prompts = [ids[0, :157].tolist(), ids[1, :6].tolist()]
    out = tmp_path / "out.json"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "examples/generate.py",
            "--load", ckpts[1], "--context-parallel-size", "2", "--context-parallel-min-tokens", "100",
            "--max-new-tokens", "5", "--output-json", str(out)]
    for p in prompts:
        args += ["--prompt-ids", ",".join(map(str, p))]
    res = subprocess.run(args, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["tokens"] == [hf_greedy(model, p, 5) for p in prompts], f"seed={seed}"


def test_a_load_failure_in_one_cp_group_stops_every_rank(ranks, converted):
    """TP=2 x CP=2: world rank 3 (TP rank 1 of CP rank 1) fails to load; the other CP group must not
    go on to wait for it in the first CP exchange."""
    _, ckpts, _ = converted("mamba2", dict(n_groups=1))
    errors = ranks(4, tp=2).run(_rank_load_when_one_world_rank_fails, ckpts[2], 3)
    assert errors[3] == "simulated unreadable shard"
    assert all(e is not None and "TP rank(s) 1 could not load their shard" in e for e in errors[:3]), errors
