"""TP=8 on CPU (gloo): every split case a model can meet at eight ranks, against HF's own code.

Eight ranks is where the partition rules meet their edge cases at once: Mamba-2 with one head per
rank, B/C groups replicated over 8, 4 or 1 ranks (n_groups 1, 2, 8), Mamba-1 with 16 channels per
rank, and a vocabulary of 250 padded to 1024 rows so most ranks hold padding only; the hybrids with one
query head per rank and kv heads replicated or split. Nothing here assumes at most four ranks: the
one-shot and quantised all-reduces take their group-size paths too.
"""
from __future__ import annotations

import pytest
import torch

from hf_models import (build_hf_model, converted_models, fresh_seed, hf_config, hf_forward_greedy, hf_greedy, hf_logits, hybrid_config,
                       save_hf)
from megatron_ssm.checkpoint.convert import convert
from test_hybrids import _rank_packed_vs_alone
from test_hybrids import _rank_prefill_then_decode as _hybrid_prefill_then_decode
from test_model_vs_hf import _rank_generate, _rank_prefill_then_decode

TP = 8
TOL = 1e-4

CASES = [
    pytest.param("mamba", dict(), id="mamba1"),
    pytest.param("falcon_mamba", dict(tied=False), id="falcon-untied"),
    pytest.param("mamba2", dict(n_groups=1), id="mamba2-g1"),
    pytest.param("mamba2", dict(n_groups=2, tied=False), id="mamba2-g2-untied"),
    pytest.param("mamba2", dict(n_groups=8), id="mamba2-g8"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, options) -> (hf model, its TP=8 checkpoint, seed), built once per case."""
    get = converted_models(tmp_path_factory, hf_config, tps=(TP,))

    def model_ckpt_seed(family, opts):
        model, _, ckpts, seed = get(family, opts)
        return model, ckpts[TP], seed

    return model_ckpt_seed


def _rank_logits(ckpt: str, ids: torch.Tensor, allreduce: str):
    from megatron_ssm.comm import make_allreduce
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    assert tp.size == TP
    model = load_model(ckpt, tp, allreduce=make_allreduce(allreduce))
    with torch.no_grad():
        full = gather_logits(model(ids), model.cfg.vocab_size, tp)
    return full if tp.is_first else None


@pytest.mark.parametrize("family,opts", CASES)
def test_tp8_prefill_decode_and_greedy_match_hf(ranks, converted, family, opts):
    model, ckpt, seed = converted(family, opts)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (2, 37), generator=g)  # several Mamba-2 chunks of 16 plus a partial one
    ref = hf_logits(model, ids)
    scale = max(1.0, ref.abs().max().item())
    pool = ranks(TP)
    ours = pool.run(_rank_logits, ckpt, ids, "oneshot")[0]
    err = (ours - ref).abs().max().item()
    assert err < TOL * scale, f"seed={seed}: prefill max |ours - HF| = {err}"

    split = int(torch.randint(1, 30, (), generator=g))
    decoded = pool.run(_rank_prefill_then_decode, ckpt, ids, split)[0]
    err = (decoded - ref[:, split - 1:-1]).abs().max().item()
    assert err < TOL * scale, f"seed={seed} split={split}: max |decode - HF| = {err}"

    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (7, 1)]
    expected = [hf_greedy(model, p, 6) for p in prompts]
    assert pool.run(_rank_generate, ckpt, prompts, 6) == [expected] * TP, f"seed={seed}"


def test_tp8_quantised_allreduce_close_to_exact(ranks, converted):
    """The two-shot int8 all-reduce at eight ranks: each rank owns 1/8 of every message (chunks
    padded to whole blocks), so a wrong chunk offset would show as garbage logits."""
    _, ckpt, seed = converted("mamba2", dict(n_groups=1))
    ids = torch.randint(3, 250, (4, 24), generator=torch.Generator().manual_seed(seed))
    exact = ranks(TP).run(_rank_logits, ckpt, ids, "exact")[0]
    int8 = ranks(TP).run(_rank_logits, ckpt, ids, "int8")[0]
    err = (int8 - exact).abs().max().item() / exact.abs().max().item()
    assert 0 < err < 0.05, f"seed={seed}: relative int8 logit error {err}"
    agree = (int8.argmax(-1) == exact.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"seed={seed}: top-1 agreement {agree}"


# ---- hybrids at eight ranks: one query head per rank, kv heads replicated (2 over 8) or split (8),
# Mamba-2 groups replicated, Zamba2's shared blocks with LoRA adapters applied at several positions

def _zamba2_tp8_config():
    from transformers import Zamba2Config

    return Zamba2Config(vocab_size=250, hidden_size=64, num_attention_heads=8, num_key_value_heads=8,
                        intermediate_size=96, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, max_position_embeddings=256, num_hidden_layers=4, n_mamba_heads=8,
                        mamba_d_state=16, mamba_ngroups=2, chunk_size=16, num_mem_blocks=2,
                        use_shared_attention_adapter=True, adapter_rank=8, use_mem_rope=True,
                        layers_block_type=["mamba", "hybrid", "hybrid", "hybrid"])


HYBRIDS = [
    pytest.param(lambda: hybrid_config("nemotron_h", pattern="M*-M*", heads=8, kv_heads=2, n_groups=2),
                 "generate", id="nemotron-h-kv2-g2"),
    pytest.param(lambda: hybrid_config("falcon_h1", heads=8, kv_heads=8, n_groups=1), "generate",
                 id="falcon-h1-kv8-g1"),
    pytest.param(_zamba2_tp8_config, "forward", id="zamba2-kv8-g2"),
]


@pytest.mark.parametrize("make_config,greedy_ref", HYBRIDS)
def test_tp8_hybrids_match_hf(ranks, tmp_path, make_config, greedy_ref):
    seed = fresh_seed()
    model = build_hf_model(make_config(), seed)
    convert(save_hf(model, tmp_path / "hf"), tmp_path / "tp8", TP, progress=False)
    ckpt = str(tmp_path / "tp8")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (2, 37), generator=g)
    ref = hf_logits(model, ids)
    scale = max(1.0, ref.abs().max().item())
    pool = ranks(TP)
    err = (pool.run(_rank_logits, ckpt, ids, "oneshot")[0] - ref).abs().max().item()
    assert err < TOL * scale, f"seed={seed}: prefill max |ours - HF| = {err}"
    split = int(torch.randint(1, 30, (), generator=g))
    decoded = pool.run(_hybrid_prefill_then_decode, ckpt, ids, split)[0]
    err = (decoded - ref[:, split - 1:-1]).abs().max().item()
    assert err < TOL * scale, f"seed={seed} split={split}: max |decode - HF| = {err}"
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (7, 1)]
    # Zamba2's HF cached decode skips the dt clamp its prefill applies: full forwards are the reference
    expected = [(hf_greedy if greedy_ref == "generate" else hf_forward_greedy)(model, p, 6) for p in prompts]
    assert pool.run(_rank_generate, ckpt, prompts, 6) == [expected] * TP, f"seed={seed}"
    if greedy_ref == "generate":  # Nemotron-H and Falcon-H1 prefill packed (Zamba's shared blocks do not)
        for diffs in pool.run(_rank_packed_vs_alone, ckpt, (7, 1, 2, 13), seed):
            assert max(diffs) < 1e-4, (seed, diffs)
