"""State passing between independently scanned spans (the math of context-parallel prefill), in one
process: spans scanned from zero and joined give the whole scan's outputs and final states."""
from __future__ import annotations

import pytest
import torch

from hf_models import fresh_seed
from megatron_ssm.model.context_parallel import split_spans
from megatron_ssm.ops.conv1d import causal_conv1d
from megatron_ssm.ops.selective_scan import selective_scan
from megatron_ssm.ops.ssd import ssd_chunk_scan
from megatron_ssm.ops.state_passing import (conv_tail, conv_window, entry_states, selective_scan_cum_dt,
                                            selective_scan_entry_correction, ssd_entry_correction, ssd_log_decay)

TOL = 1e-4


def _close(a, b, what, seed):
    err = (a - b).abs().max().item()
    assert err < TOL * max(1.0, b.abs().max().item()), f"seed={seed}: {what}: max err {err}"


@pytest.mark.parametrize("groups", [1, 2])
def test_ssd_spans_joined_equal_one_scan(groups):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, L, h, p, n, chunk = 2, 203, 4, 8, 8, 16
    x, dt = torch.randn(b, L, h, p, generator=g), torch.randn(b, L, h, generator=g)
    B, C = torch.randn(b, L, groups, n, generator=g), torch.randn(b, L, groups, n, generator=g)
    A, D, bias = -torch.rand(h, generator=g) - 0.1, torch.randn(h, generator=g), torch.randn(h, generator=g)
    init = torch.randn(b, h, p, n, generator=g)
    y_ref, final_ref = ssd_chunk_scan(x, dt, A, B, C, chunk, D, bias, initial_state=init, dt_limit=(0.0, 5.0))
    lengths = split_spans(L, 3, chunk)
    bounds = torch.tensor((0,) + lengths).cumsum(0).tolist()
    runs = [ssd_chunk_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], chunk, D, bias,
                           initial_state=init if s == 0 else None, dt_limit=(0.0, 5.0))
            for s, e in zip(bounds, bounds[1:])]
    logs = [ssd_log_decay(dt[:, s:e], A, bias, (0.0, 5.0)) for s, e in zip(bounds, bounds[1:])]
    entering, final = entry_states([torch.exp(lg[:, -1])[..., None, None] for lg in logs], [f for _, f in runs])
    ys = [y + ssd_entry_correction(C[:, s:e], lg, h_in)
          for (y, _), lg, h_in, s, e in zip(runs, logs, entering, bounds, bounds[1:])]
    _close(torch.cat(ys, 1), y_ref, "y", seed)
    _close(final, final_ref, "final state", seed)


def test_selective_scan_spans_joined_equal_one_scan():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, L, d, n = 2, 97, 6, 4
    u, dt, z = (torch.randn(b, L, d, generator=g) for _ in range(3))
    B, C = torch.randn(b, L, n, generator=g), torch.randn(b, L, n, generator=g)
    A, D, bias = -torch.rand(d, n, generator=g) - 0.1, torch.randn(d, generator=g), torch.randn(d, generator=g)
    init = torch.randn(b, d, n, generator=g)
    y_ref, final_ref = selective_scan(u, dt, A, B, C, D, z, bias, initial_state=init)
    bounds = [0, 30, 31, 64, L]  # a one-token span among them
    runs = [selective_scan(u[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, z[:, s:e], bias,
                           initial_state=init if s == 0 else None) for s, e in zip(bounds, bounds[1:])]
    cums = [selective_scan_cum_dt(dt[:, s:e], bias) for s, e in zip(bounds, bounds[1:])]
    entering, final = entry_states([torch.exp(c[:, -1].unsqueeze(-1) * A) for c in cums], [f for _, f in runs])
    ys = [y + selective_scan_entry_correction(C[:, s:e], c, A, h_in, max_elements=50) * torch.nn.functional.silu(z[:, s:e])
          for (y, _), c, h_in, s, e in zip(runs, cums, entering, bounds, bounds[1:])]
    _close(torch.cat(ys, 1), y_ref, "y", seed)
    _close(final, final_ref, "final state", seed)


def test_conv_window_reaches_past_short_spans():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, L, c, K = 2, 23, 5, 4
    x, w, prior = torch.randn(b, L, c, generator=g), torch.randn(c, K, generator=g), torch.randn(b, c, K - 1, generator=g)
    y_ref, final_ref = causal_conv1d(x, w, None, initial_state=prior)
    bounds = [0, 1, 3, 10, 11, L]  # spans of 1, 2, 7, 1, 12 tokens: shorter than K-1 at times
    spans = [x[:, s:e] for s, e in zip(bounds, bounds[1:])]
    lengths = [e - s for s, e in zip(bounds, bounds[1:])]
    tails = [conv_tail(s, K - 1) for s in spans]
    ys = [causal_conv1d(s, w, None, initial_state=conv_window(prior, tails[:r], lengths[:r]))[0]
          for r, s in enumerate(spans)]
    _close(torch.cat(ys, 1), y_ref, "y", seed)
    _close(conv_window(prior, tails, lengths), final_ref, "final conv state", seed)


def test_split_spans():
    assert split_spans(203, 3, 16) == (80, 64, 59)
    assert split_spans(10, 4, 16) == (3, 3, 2, 2)  # fewer chunks than ranks: single tokens
    assert sum(split_spans(1000, 4, 7)) == 1000
    with pytest.raises(ValueError):
        split_spans(3, 4)


def test_entry_correction_in_steps_and_empty_spans_against_closed_form():
    """Mamba-1's correction sum_n C_tn exp(cum_dt_td A_dn) h_dn in float64, computed by the op a few
    time steps at a time (max_elements forcing 2 steps per slice over 5 steps) and for an empty span;
    an empty span's conv tail is [b, C, 0]; one span's entering state is zero and its final passes."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    b, L, d, n = 2, 5, 3, 4
    C, cum_dt = torch.randn(b, L, n, generator=g), torch.rand(b, L, d, generator=g).cumsum(1)
    A, h_in = -torch.rand(d, n, generator=g), torch.randn(b, d, n, generator=g)
    want = torch.einsum("bln,bldn->bld", C.double(),
                        torch.exp(cum_dt.double()[..., None] * A.double()) * h_in.double()[:, None])
    got = selective_scan_entry_correction(C, cum_dt, A, h_in, max_elements=2 * b * d * n)
    _close(got, want, "correction in slices of 2 steps", seed)
    assert got.shape == (b, L, d)
    empty = selective_scan_entry_correction(C[:, :0], cum_dt[:, :0], A, h_in)
    assert empty.shape == (b, 0, d) and empty.dtype == torch.float32
    x = torch.randn(b, 3, 6, generator=g)
    assert conv_tail(x, 0).shape == (b, 6, 0)
    assert torch.equal(conv_tail(x, 5), torch.cat([torch.zeros(b, 6, 2), x.transpose(1, 2)], -1))
    final = torch.randn(b, d, n, generator=g)
    entering, last = entry_states([torch.rand(b, d, n, generator=g)], [final])
    assert torch.equal(entering[0], torch.zeros(b, d, n)) and torch.equal(last, final)


def test_ssd_log_decay_applies_dt_limit_and_conv_window_keeps_the_prior_dtype():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    dt, A, bias = 3 * torch.randn(2, 6, 4, generator=g), -torch.rand(4, generator=g), torch.randn(4, generator=g)
    limit = (0.05, 0.5)
    want = torch.cumsum(torch.nn.functional.softplus(dt.double() + bias.double()).clamp(*limit) * A.double(), 1)
    _close(ssd_log_decay(dt, A, bias, limit), want, "log decay with dt_limit", seed)
    prior = torch.randn(2, 6, 3, generator=g).bfloat16()
    tails = [torch.randn(2, 6, 3, generator=g)]
    window = conv_window(prior, tails, [4])
    assert window.dtype == torch.bfloat16 and torch.equal(window, tails[0].bfloat16())
