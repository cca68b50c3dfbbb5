"""Zamba and Zamba2 end to end at TP 1, 2 and 4 against HF transformers' own modeling code.

Tiny random models (tests/hf_models.py zamba_config): hidden 64, 4 attention heads of 32 channels,
every shared block applied at least twice. kv heads 4 split over TP 2 and 4; 1 kv head (Zamba) and
2 (Zamba2, no q/k/v adapters, which HF allows only without GQA) replicated over TP 4. Embeddings
are tied throughout: transformers 5.24 stops sharing the shared blocks when tie_word_embeddings is
false (each hybrid layer gets its own copy), so an untied Zamba is not Zamba in HF.
"""
from __future__ import annotations

import pytest
import torch

import json

from hf_models import assert_hf_round_trip, build_varied_hf_model, converted_models, fresh_seed, hf_forward_greedy, hf_logits, save_hf, zamba_config
from megatron_ssm.checkpoint.convert import convert
from megatron_ssm.config import SSMConfig

TOL = 1e-4


# run on every rank: the same helpers as the other hybrids
from test_hybrids import _rank_engine_runs, _rank_forks, _rank_packed_vs_alone, _rank_prefill_then_decode  # noqa: E402
from test_model_vs_hf import _rank_generate, _rank_logits  # noqa: E402


CASES = [
    pytest.param("zamba", dict(kv_heads=4), id="zamba-kv4"),
    pytest.param("zamba", dict(kv_heads=1), id="zamba-kv1"),
    pytest.param("zamba2", dict(kv_heads=4), id="zamba2-2blocks-adapters-rope"),
    pytest.param("zamba2", dict(kv_heads=2, attention_adapters=False, mem_blocks=1, n_groups=1, rope=False),
                 id="zamba2-kv2-1block"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    get = converted_models(tmp_path_factory, zamba_config, build_varied_hf_model)
    return lambda family, opts: get(family, opts)[:3]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[2]])
def test_packed_prefill_equals_each_prompt_alone(ranks, converted, family, opts, tp):
    """Prompts of different lengths in one packed forward: the shared blocks' attention (with its
    adapters and, in Zamba2, RoPE from each prompt's position 0) stays within each prompt, and every
    application's keys/values, the Mamba states and the next decode step are a lone prefill's."""
    _, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    for diffs in ranks(tp).run(_rank_packed_vs_alone, ckpts[tp], (7, 1, 2, 13), seed):
        assert max(diffs) < 1e-4, (seed, diffs)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", CASES)
def test_prefill_logits_match_hf(ranks, converted, family, opts, tp):
    model, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    ids = torch.randint(3, 250, (2, 37), generator=torch.Generator().manual_seed(seed))
    ref = hf_logits(model, ids)
    ours = ranks(tp).run(_rank_logits, ckpts[tp], ids)[0]
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed}: max |ours - HF| = {err}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[2]])
def test_cached_decode_equals_full_recompute(ranks, converted, family, opts, tp):
    model, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (3, 29), generator=g)
    split = int(torch.randint(1, 20, (), generator=g).item())
    ref = hf_logits(model, ids)[:, split - 1:-1]
    ours = ranks(tp).run(_rank_prefill_then_decode, ckpts[tp], ids, split)[0]
    err = (ours - ref).abs().max().item()
    # fp32 through a random model: 48 runs (2026-12-01) had max errors of 0.06-0.44 x 1e-4 x max |ref|,
    # one CI run 1.7 x (Zamba, one kv head, TP 4); a wrong cache or position is orders larger.
    assert err < 3 * TOL * max(1.0, ref.abs().max().item()), f"seed {seed} split {split}: max |decode - full| = {err}"


@pytest.mark.parametrize("tp", [1, 4])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[2]])
def test_greedy_generation_matches_hf(ranks, converted, family, opts, tp):
    """Against HF's forward-only greedy loop: Zamba2's HF decode path skips the dt clamp its
    prefill applies (docs/hybrids.md), so its generate() is not its own model's greedy answer."""
    model, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 1, 12)]
    expected = [hf_forward_greedy(model, p, 8) for p in prompts]
    assert ranks(tp).run(_rank_generate, ckpts[tp], prompts, 8) == [expected] * tp, f"seed {seed}"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2]])
def test_overlapped_prefill_matches_hf(ranks, converted, family, opts, tp):
    """Prefill in two calls, each cut in two micro-chunks with overlapped all-reduces: the shared
    blocks read each span's own token embeddings and every position's keys/values land in its cache."""
    model, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 41), generator=g)
    split = int(torch.randint(5, 36, (), generator=g).item())
    ref = hf_logits(model, ids)[:, :-1]
    ours = ranks(tp).run(_rank_prefill_then_decode, ckpts[tp], ids, split, True)[0]
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed} split {split}: max |ours - HF| = {err}"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[2]])
def test_engine_batching_chunking_and_prefix_reuse_agree(ranks, converted, family, opts, tp):
    """The engine's continuous batching, chunked prefill, prefix hits (SSM states plus every
    shared-block position's KV prefix) and forked requests give the tokens a lone request gets,
    which are HF's."""
    model, _, ckpts = converted(family, opts)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 250, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 250, (n,), generator=g).tolist() for n in (3, 0, 7)] + [shared[:2]]
    alone, queued, chunked, first, again, hits, (ahead, steps_ahead, stop_at) = ranks(tp).run(
        _rank_engine_runs, ckpts[tp], prompts, 6)[0]
    forked = ranks(tp).run(_rank_forks, ckpts[tp], prompts, 6)[0]
    assert alone == [hf_forward_greedy(model, p, 6) for p in prompts], f"seed {seed}"
    assert queued == alone and chunked == alone and first == alone and again == alone, f"seed {seed}"
    assert hits >= 3
    # decode steps launched ahead, request 0 stopping mid-run (its slot takes another's KV meanwhile)
    assert ahead == [alone[0][:stop_at + 1]] + [a[:6 - i % 3] for i, a in enumerate(alone)][1:], f"seed {seed}"
    assert steps_ahead > 0
    assert forked == [alone[2]] * 3 + [alone[1]], f"seed {seed}"  # n > 1 copies every position's KV too


@pytest.mark.parametrize("family,dtype,opts", [
    pytest.param("zamba", torch.bfloat16, dict(kv_heads=1), id="zamba-bf16"),
    pytest.param("zamba2", torch.float32, dict(), id="zamba2-fp32"),
])
def test_hf_tp4_tp2_hf_is_bit_exact(tmp_path, family, dtype, opts):
    """HF -> TP4 -> TP2 -> HF gives back HF's bytes: each shared block once, under the first layer
    that uses it, adapters included; transformers loads the result as the same model."""
    model = build_varied_hf_model(zamba_config(family, **opts), fresh_seed()).to(dtype)
    hf = save_hf(model, tmp_path / "hf")
    convert(hf, tmp_path / "tp4", 4, progress=False)
    convert(tmp_path / "tp4", tmp_path / "tp2", 2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "back", to_hf=True, progress=False)
    assert_hf_round_trip(model, hf, tmp_path / "back", dtype, low_id=3)


def test_convert_cli_then_torchrun_generate_at_tp2_matches_hf(converted, tmp_path):
    """The two CLIs as a user runs them: tools/convert_hf.py --tp 2, then torchrun examples/generate.py."""
    from test_cli import convert as convert_cli
    from test_cli import torchrun

    model, hf_dir, _ = converted(*CASES[0].values)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (7, 3)]
    res = convert_cli(hf_dir, tmp_path / "tp2", 2)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out.json"
    ids = sum((["--prompt-ids", ",".join(map(str, p))] for p in prompts), [])
    res = torchrun(2, "--load", str(tmp_path / "tp2"), *ids, "--max-new-tokens", "6", "--temperature", "0",
                   "--output-json", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["tokens"] == [hf_forward_greedy(model, p, 6) for p in prompts], f"seed {seed}"


def test_configs_that_cannot_be_built_or_split_are_refused():
    from megatron_ssm.config import ConfigError

    zamba = zamba_config("zamba").to_dict()
    cfg = SSMConfig.from_hf(zamba)
    assert cfg.pattern == "MSMSS" and cfg.shared_blocks == 1 and cfg.attention_input_size == 128
    with pytest.raises(ConfigError, match="TP degree 8 does not divide the 4 attention heads"):
        cfg.validate(8)
    with pytest.raises(ConfigError, match="TP degree 4 and 3 mamba heads"):
        SSMConfig.from_hf(dict(zamba, n_mamba_heads=3, mamba_expand=3)).validate(4)
    zamba2 = zamba_config("zamba2").to_dict()
    assert SSMConfig.from_hf(zamba2).pattern == "MSMSSS"
    with pytest.raises(ConfigError, match="need num_key_value_heads == num_attention_heads"):
        SSMConfig.from_hf(dict(zamba2, num_key_value_heads=2))
    with pytest.raises(ConfigError, match="rms_norm_eps"):
        SSMConfig.from_hf(dict(zamba2, rms_norm_eps=1e-6))
    with pytest.raises(ConfigError, match="no hybrid layer"):
        SSMConfig.from_hf(dict(zamba2, layers_block_type=["mamba"] * 6))
