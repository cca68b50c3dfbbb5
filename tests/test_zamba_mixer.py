"""Zamba's multi-head Mamba-1 mixer at TP 1, 2 and 4 against HF's own `ZambaMambaMixer`.

n_mamba_heads 2 at TP 4 spans each head over two ranks (x_proj's partial sums all-reduced per head);
n_mamba_heads 4 at TP 2 gives each rank two whole heads (x_proj local).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_models import fresh_seed

TOL = 1e-4


def _hf_mixer(heads: int, seed: int):
    from transformers import ZambaConfig
    from transformers.models.zamba.modeling_zamba import ZambaMambaMixer

    cfg = ZambaConfig(hidden_size=64, num_hidden_layers=3, n_mamba_heads=heads, mamba_d_state=8,
                      num_attention_heads=4, vocab_size=100)
    torch.manual_seed(seed)
    mixer = ZambaMambaMixer(cfg, layer_idx=0).float().eval()
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(p * (1 + 0.3 * torch.randn_like(p)) + 0.05 * torch.randn_like(p))
    return cfg, mixer


def _rank_mixer(heads: int, weights: dict, hidden: torch.Tensor, split: int):
    """(full-sequence output, prefill[:split] + one-token decode output) on this rank."""
    from megatron_ssm.checkpoint.partition import Rule, shard_by_rule
    from megatron_ssm.model.zamba_mamba import ZambaMambaMixer
    from megatron_ssm.parallel import megatron_config, tp_context

    tp = tp_context(torch.device("cpu"))
    cfg = SimpleNamespace(hidden_size=64, intermediate_size=128, state_size=8, conv_kernel=4, use_bias=False,
                          use_conv_bias=True, time_step_rank=4, num_heads=heads)
    mixer = ZambaMambaMixer(cfg, tp, megatron_config(tp.size, torch.float32), dtype=torch.float32,
                            device=torch.device("cpu"))
    rules = {"in_proj.weight": Rule(interleaved=2), "conv1d.weight": Rule(dim=0), "conv1d.bias": Rule(dim=0),
             "x_proj_weight": Rule(head_channels=2, heads=heads), "dt_proj_weight": Rule(head_channels=1, heads=heads),
             "dt_proj_bias": Rule(head_channels=1, heads=heads), "A_log": Rule(head_channels=1, heads=heads),
             "D": Rule(head_channels=1, heads=heads), "out_proj.weight": Rule(dim=1)}
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.copy_(shard_by_rule(rules[name], name, weights[name], cfg, tp.size, tp.rank))
        full = mixer.start(hidden).wait()
        b = hidden.shape[0]
        (cs, ss) = mixer.state_shapes()
        conv, ssm = torch.zeros(b, *cs), torch.zeros(b, *ss)
        outs = [mixer.start(hidden[:, :split], conv, ssm).wait()]
        for t in range(split, hidden.shape[1]):
            outs.append(mixer.start(hidden[:, t:t + 1], conv, ssm).wait())
    return full, torch.cat(outs, dim=1)


@pytest.mark.parametrize("tp,heads", [(1, 2), (2, 2), (4, 2), (2, 4)])
def test_zamba_mixer_matches_hf(ranks, tp, heads):
    seed = fresh_seed()
    _, hf = _hf_mixer(heads, seed)
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 11, 64, generator=g)
    with torch.no_grad():
        want = hf(hidden)
    weights = {k: v.clone() for k, v in hf.state_dict().items()}
    for full, stepped in ranks(tp).run(_rank_mixer, heads, weights, hidden, 7):
        torch.testing.assert_close(full, want, atol=TOL, rtol=TOL, msg=lambda m: f"seed {seed} full: {m}")
        torch.testing.assert_close(stepped, want, atol=TOL, rtol=TOL, msg=lambda m: f"seed {seed} cached: {m}")
