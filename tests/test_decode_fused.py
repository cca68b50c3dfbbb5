"""The fused decode ops (ops/decode.py): their references against the paths they replace, and the
Triton kernels (ops/triton/decode.py, the Mamba-1 flags of ops/triton/scan.py) against the references
under Triton's CPU interpreter (tests/interpreter.py), outputs and both states after the step.

The input builders are shared with tests/test_kernels_gpu.py, which runs the kernels at model sizes.
"""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from test_ops import (TOL, _act, _dt_bias, _interpreted_kernels, _mamba2_params, check_op,
                      rel_err, scan_update_inputs)

from megatron_ssm import ops as ref_ops
from megatron_ssm.ops import dispatch

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Triton's interpreter casts fp32 to bf16 by truncation, twice the error of the GPU's round-to-nearest,
# and y * silu(z) rounds three times: at these tiny widths that can just pass TOL. The GPU test holds
# the kernels to TOL itself.
INTERPRETED_TOL = {**TOL, torch.bfloat16: 2.5e-2}


def mamba2_decode_inputs(b, h, p, g, n, K, dtype, device, gate="norm", conv_bias=True,
                         dt_limit=(0.0, float("inf"))):
    """gate: 'norm' (the gated RMS norm), 'deferred' (that norm's 1/rms returned for out_proj),
    'silu' (y * silu(z)) or None (y alone)."""
    channels = h * p
    conv_ch = channels + 2 * g * n
    return "mamba2_decode_step", dict(
        xbc=_act(b, conv_ch, dtype=dtype, device=device),
        z=_act(b, channels, dtype=dtype, device=device) if gate else None,
        dt=_act(b, h, dtype=dtype, device=device, scale=0.5),
        conv_state=_act(b, conv_ch, K - 1, dtype=dtype, device=device),
        conv_weight=_act(conv_ch, K, dtype=dtype, device=device, scale=0.5),
        conv_bias=_act(conv_ch, dtype=dtype, device=device) if conv_bias else None,
        ssm_state=torch.randn(b, h, p, n, device=device), dt_limit=dt_limit,
        norm_weight=_act(channels, dtype=dtype, device=device) if gate in ("norm", "deferred") else None, norm_eps=1e-5,
        **({"defer_norm": True} if gate == "deferred" else {}), **_mamba2_params(h, dtype, device))


def mamba1_decode_inputs(b, d, n, dtype, device, norms=True, dt_rank=8, dt_proj=False):
    """Falcon-Mamba's norms (norms=True): B, C normalised and dt scaled by dt_in's inverse RMS.
    dt_proj: dt is dt_proj's input [b, dt_rank] (and Falcon's dt_in that same tensor), with dt_weight."""
    _, kw = scan_update_inputs(b, d, n, dtype, device)
    if dt_proj:
        low = _act(b, dt_rank, dtype=dtype, device=device, scale=3.0)
        kw.update(dt=low, dt_weight=_act(d, dt_rank, dtype=dtype, device=device, scale=0.5 / dt_rank ** 0.5))
        if norms:
            kw.update(norm_eps=1e-6, dt_in=low)
    elif norms:
        kw.update(norm_eps=1e-6, dt_in=_act(b, dt_rank, dtype=dtype, device=device, scale=3.0))
    return "mamba1_decode_step", kw


# ---- the references are the unfused paths --------------------------------------------------------

def test_mamba2_reference_continues_a_prefill(seed):
    """Prefill L tokens (conv, chunk scan, gated norm: the prompt path), then one decode step from the
    states it left, equals the prefill of all L+1 tokens' last position: the decode op splits
    x | B | C and groups the norm as the prompt path does."""
    b, h, p, g, n, K, L = 2, 4, 3, 2, 5, 4, 6
    channels, conv_ch = h * p, h * p + 2 * g * n
    xbc = torch.randn(b, L + 1, conv_ch, dtype=torch.float64)
    z = torch.randn(b, L + 1, channels, dtype=torch.float64)
    dt = torch.randn(b, L + 1, h, dtype=torch.float64) * 0.5
    w, cb = torch.randn(conv_ch, K, dtype=torch.float64), torch.randn(conv_ch, dtype=torch.float64)
    A, D, bias = -(1 + torch.rand(h, dtype=torch.float64)), torch.randn(h, dtype=torch.float64), _dt_bias(h, torch.float64, "cpu")
    nw = torch.randn(channels, dtype=torch.float64)

    def prefill(T):
        conv, conv_state = ref_ops.causal_conv1d(xbc[:, :T], w, cb)
        x, B, C = conv.split([channels, g * n, g * n], -1)
        y, ssm = ref_ops.ssd_chunk_scan(x.reshape(b, T, h, p), dt[:, :T], A, B.reshape(b, T, g, n),
                                        C.reshape(b, T, g, n), 4, D, bias)
        return ref_ops.gated_rms_norm(y.reshape(b, T, channels), z[:, :T], nw, 1e-5, channels // g), conv_state, ssm

    full, _, _ = prefill(L + 1)
    _, conv_state, ssm = prefill(L)
    step = ref_ops.mamba2_decode_step(xbc[:, L], z[:, L], dt[:, L], conv_state, w, cb, ssm.double(), A, D, bias,
                                      norm_weight=nw, norm_eps=1e-5)
    assert rel_err(step, full[:, L]) < 1e-6, seed  # (the references take dt and states in fp32)


@pytest.mark.parametrize("g", [1, 3])
def test_mamba2_reference_deferred_norm_is_the_norm(seed, g):
    """The deferred norm's output times its 1/rms per group is the gated norm's output, and with one
    group out_proj with that row scale is out_proj of the norm; a group spanning ranks divides the
    reduced sum by the whole group's size."""
    op, kw = mamba2_decode_inputs(2, 6, 4, g, 8, 4, torch.float64, "cpu")
    states = {k: kw[k].clone() for k in ("conv_state", "ssm_state")}
    more = {k: kw[k].clone() for k in ("conv_state", "ssm_state")}
    normed = ref_ops.mamba2_decode_step(**kw)
    y, rstd = ref_ops.mamba2_decode_step(**dict(kw, **states, defer_norm=True))
    assert rstd.shape == (2, g) and rstd.dtype == torch.float32
    assert rel_err((y.view(2, g, -1) * rstd[..., None]).view(2, -1), normed) < 1e-6, seed
    assert rel_err(states["ssm_state"], kw["ssm_state"]) == 0, seed
    if g == 1:
        w = torch.randn(7, 24, dtype=torch.float64)
        assert rel_err(ref_ops.linear(y, w, row_scale=rstd[:, 0]), ref_ops.linear(normed, w)) < 1e-6, seed
    _, spanning = ref_ops.mamba2_decode_step(**dict(kw, **more, defer_norm=True, group_size=2 * 24 // g,
                                                   reduce_sum_of_squares=lambda ss: 2 * ss))
    assert rel_err(spanning, rstd) < 1e-6, seed


def test_mamba1_reference_equals_the_norms_before_dt_proj(seed):
    """Falcon-Mamba's unfused path normalises dt before dt_proj; the op takes dt_proj of the raw dt
    and scales after: the same numbers, because the norm has no weight."""
    b, d, n, R = 3, 6, 4, 5
    _, kw = scan_update_inputs(b, d, n, torch.float64, "cpu")
    dt_in, W = torch.randn(b, R, dtype=torch.float64) * 3, torch.randn(d, R, dtype=torch.float64)
    eps = 1e-6
    unfused_state = kw["state"].clone()
    dt_n, B_n, C_n = (ref_ops.rms_norm(t, None, eps) for t in (dt_in, kw["B"], kw["C"]))
    want = ref_ops.selective_state_update(unfused_state, kw["u"], dt_n @ W.T, kw["A"], B_n, C_n, kw["D"], kw["z"],
                                          kw["dt_bias"])
    got = ref_ops.mamba1_decode_step(**dict(kw, dt=dt_in @ W.T), norm_eps=eps, dt_in=dt_in)
    # (the references take dt in fp32: dt_proj before or after the scale differs by its rounding)
    assert rel_err(got, want) < 1e-6 and rel_err(kw["state"], unfused_state) < 1e-6, seed


def _edited(case, drop=(), **values):
    op, kw = case
    return op, {**{k: v for k, v in kw.items() if k not in drop}, **values}


def _default_eps_case():
    """norm_eps left out (the default), on a tiny group so that eps shows in the norm."""
    op, kw = mamba2_decode_inputs(2, 4, 3, 1, 5, 4, torch.float32, "cpu")
    return _edited((op, kw), drop=("norm_eps",), xbc=kw["xbc"] * 1e-3)


@pytest.mark.parametrize("case", [
    lambda: mamba2_decode_inputs(2, 4, 3, 2, 5, 4, torch.float32, "cpu", dt_limit=(0.0, 0.1)),
    lambda: _edited(mamba2_decode_inputs(2, 4, 3, 1, 5, 4, torch.float32, "cpu"), norm_eps=0.25),  # far from the default
    _default_eps_case,
    lambda: _edited(mamba2_decode_inputs(2, 4, 3, 1, 5, 4, torch.float32, "cpu", gate="deferred"), group_size=24,
                    reduce_sum_of_squares=lambda ss: 2 * ss),
    lambda: mamba1_decode_inputs(2, 4, 3, torch.float32, "cpu"),
    lambda: mamba1_decode_inputs(2, 4, 3, torch.float32, "cpu", dt_proj=True)],
    ids=["mamba2", "mamba2-eps", "mamba2-default-eps", "mamba2-deferred-spanning", "mamba1", "mamba1-dt-proj"])
def test_dispatch_forwards_every_argument_in_order(seed, case):
    op, kw = case()
    check_op(getattr(dispatch, op), op, kw, tol=1e-12, seed=seed)


@pytest.mark.parametrize("value,mamba1,mamba2", [
    (None, True, True), ("0", False, False), ("", False, False), ("1", True, True),
    ("mamba2", False, True), ("mamba1, mamba2", True, True)])
def test_fused_decode_switch(monkeypatch, value, mamba1, mamba2):
    if value is None:
        monkeypatch.delenv(dispatch.FUSED_DECODE_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.FUSED_DECODE_ENV, value)
    assert (dispatch.fused_decode("mamba1"), dispatch.fused_decode("mamba2")) == (mamba1, mamba2)


def test_fused_decode_switch_refuses_unknown_mixers(monkeypatch):
    monkeypatch.setenv(dispatch.FUSED_DECODE_ENV, "mamba3")
    with pytest.raises(ValueError, match="mamba3"):
        dispatch.fused_decode("mamba1")
    with pytest.raises(ValueError, match="unknown mixer"):
        dispatch.fused_decode("attention")


ROW_SWITCHES = pytest.mark.parametrize("env,read,default", [
    (dispatch.FOLD_ROWS_ENV, dispatch.fold_rows, dispatch.FOLD_ROWS_DEFAULT),
    (dispatch.ENTRY_ROWS_ENV, dispatch.entry_rows, dispatch.ENTRY_ROWS_DEFAULT),
    (dispatch.MAMBA2_FUSED_ROWS_ENV, dispatch.mamba2_fused_rows, dispatch.MAMBA2_FUSED_ROWS_DEFAULT)],
    ids=["fold", "entry", "mamba2-fused"])


@ROW_SWITCHES
@pytest.mark.parametrize("value,rows", [(None, None), ("", None), ("0", 0), (" 8 ", 8)])
def test_row_count_switches(monkeypatch, env, read, default, value, rows):
    if value is None:
        monkeypatch.delenv(env, raising=False)
    else:
        monkeypatch.setenv(env, value)
    assert read() == (default if rows is None else rows)


@ROW_SWITCHES
@pytest.mark.parametrize("value", ["-1", "two", "1.5"])
def test_row_count_switches_refuse_what_is_not_a_row_count(monkeypatch, env, read, default, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(ValueError, match=env):
        read()


# ---- the kernels, interpreted -----------------------------------------------------------------

MAMBA2_CASES = [  # (b, h, p, g, n, K, gate, conv_bias, dt_limit)
    (1, 4, 4, 1, 16, 4, "norm", True, (0.0, float("inf"))),    # one group (replicated across TP ranks)
    (3, 8, 4, 2, 16, 4, "norm", True, (0.0, 0.1)),             # groups split across TP ranks; batch > 1
    (2, 6, 2, 3, 8, 3, "norm", False, (0.0, float("inf"))),    # several programs a group, no conv bias
    (2, 3, 5, 1, 6, 4, "silu", True, (0.0, float("inf"))),     # odd sizes; Falcon-H1's y * silu(z)
    (2, 4, 4, 1, 16, 4, None, True, (0.0, float("inf"))),      # y alone: the norm group spans ranks
    (3, 4, 4, 1, 16, 4, "deferred", True, (0.0, 0.1)),         # the norm's 1/rms left for out_proj
    (2, 6, 2, 3, 8, 3, "deferred", False, (0.0, float("inf"))),  # ... per group, several programs a group
]


@DTYPES
@pytest.mark.parametrize("b,h,p,g,n,K,gate,conv_bias,dt_limit", MAMBA2_CASES)
def test_mamba2_kernel_interpreted(seed, monkeypatch, dtype, b, h, p, g, n, K, gate, conv_bias, dt_limit):
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import decode

    monkeypatch.setattr(decode, "UPDATE_BLOCK", 64)  # several programs per group, as at model sizes
    op, kw = mamba2_decode_inputs(b, h, p, g, n, K, dtype, "cpu", gate=gate, conv_bias=conv_bias, dt_limit=dt_limit)
    # bf16 against the float64 answer for the same inputs: the bf16 reference rounds at every op, and
    # its gated norm over groups of 4 channels once erred by 4.4% where the kernel erred by 0.8%
    # (seed 2825863907)
    check_op(kernels.mamba2_decode_step, op, kw, INTERPRETED_TOL[dtype], seed,
             reference_dtype=torch.float64 if dtype == torch.bfloat16 else None)


def test_mamba2_kernel_deferred_norm_spanning_ranks(seed, monkeypatch):
    """A norm group wider than the rank's channels: the kernel hands its sum of squares to the
    reduction and divides by the whole group's width, as the reference."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import decode

    monkeypatch.setattr(decode, "UPDATE_BLOCK", 64)
    op, kw = mamba2_decode_inputs(2, 4, 4, 1, 16, 4, torch.float32, "cpu", gate="deferred")
    seen = []
    kw.update(group_size=48, reduce_sum_of_squares=lambda ss: seen.append(ss.shape) or ss * 3.0)
    check_op(kernels.mamba2_decode_step, op, kw, INTERPRETED_TOL[torch.float32], seed)
    assert seen == [(2, 1), (2, 1)], seen  # the reference's call and the kernel's


def test_mamba2_kernel_steps_repeat(seed, monkeypatch):
    """Three steps in a row from the kernel's own states, several programs per group: each step's
    counters must be back at zero for the next, and B/C's conv state shifted once per step."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import decode

    monkeypatch.setattr(decode, "UPDATE_BLOCK", 32)  # 2 channels x 16 states a program: 8 programs per group
    _, kw = mamba2_decode_inputs(2, 8, 2, 2, 16, 4, torch.float32, "cpu")
    ours = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    for step in range(3):
        fresh = dict(xbc=torch.randn_like(kw["xbc"]), z=torch.randn_like(kw["z"]), dt=torch.randn_like(kw["dt"]))
        kw.update(fresh), ours.update({k: v.clone() for k, v in fresh.items()})
        want = ref_ops.mamba2_decode_step(**kw)
        got = kernels.mamba2_decode_step(**ours)
        where = f"step {step} (seed {seed})"
        assert rel_err(got, want) < 1e-5, where
        assert rel_err(ours["conv_state"], kw["conv_state"]) < 1e-6, where
        assert rel_err(ours["ssm_state"], kw["ssm_state"]) < 1e-5, where
        counters, _ = decode._workspaces[torch.device("cpu")]
        assert counters.eq(0).all(), where


def test_mamba2_kernel_strided_views(seed):
    """The model passes column slices of in_proj's packed output and a cache row slice."""
    kernels = _interpreted_kernels()
    b, h, p, g, n, K = 2, 4, 4, 2, 8, 4
    op, kw = mamba2_decode_inputs(b, h, p, g, n, K, torch.float32, "cpu")
    channels, conv_ch = h * p, h * p + 2 * g * n
    packed = torch.randn(b, channels + conv_ch + h)
    cache_conv = torch.randn(b + 2, conv_ch, K - 1)
    cache_ssm = torch.randn(b + 2, h, p, n)
    views = dict(z=packed[:, :channels], xbc=packed[:, channels:channels + conv_ch], dt=packed[:, channels + conv_ch:],
                 conv_state=cache_conv[1:1 + b], ssm_state=cache_ssm[1:1 + b])
    ref_kw = dict(kw, **{k: v.clone() for k, v in views.items()})
    want = ref_ops.mamba2_decode_step(**ref_kw)
    got = kernels.mamba2_decode_step(**dict(kw, **views))
    assert rel_err(got, want) < 1e-5, seed
    assert rel_err(cache_conv[1:1 + b], ref_kw["conv_state"]) < 1e-6, seed
    assert rel_err(cache_ssm[1:1 + b], ref_kw["ssm_state"]) < 1e-5, seed


@DTYPES
@pytest.mark.parametrize("b,d,n,norms,dt_proj,dt_rank", [
    (1, 12, 16, True, False, 8), (3, 10, 5, True, False, 8), (2, 12, 16, False, False, 8),
    (1, 12, 16, True, True, 8), (3, 70, 5, True, True, 100), (2, 12, 16, False, True, 5)],
    ids=["falcon-b1", "falcon-odd", "plain-mamba1", "falcon-dt-proj", "falcon-dt-proj-odd", "plain-dt-proj"])
def test_mamba1_kernel_interpreted(seed, dtype, b, d, n, norms, dt_proj, dt_rank, monkeypatch):
    """dt-proj cases: dt_proj inside the kernel; the odd one's rank is not a power of two and its
    channels span three programs, the last one partial."""
    kernels = _interpreted_kernels()
    import triton

    from megatron_ssm.ops.triton import scan

    monkeypatch.setattr(scan, "UPDATE_BLOCK_DT_PROJ", 32 * triton.next_power_of_2(n))
    check_op(kernels.mamba1_decode_step,
             *mamba1_decode_inputs(b, d, n, dtype, "cpu", norms=norms, dt_proj=dt_proj, dt_rank=dt_rank),
             INTERPRETED_TOL[dtype], seed)


def test_mamba1_kernel_norms_without_dt_in(seed):
    """norm_eps alone normalises B and C only (dt already normalised by the caller)."""
    kernels = _interpreted_kernels()
    op, kw = mamba1_decode_inputs(2, 8, 16, torch.float32, "cpu", norms=False)
    check_op(kernels.mamba1_decode_step, op, dict(kw, norm_eps=1e-6), TOL[torch.float32], seed)


# ---- the model's decode with the kernels (interpreted) against its decode with the references ------

def _rank_decode_with_kernels(ckpt: str, input_ids: torch.Tensor, split: int, hybrid: bool = False,
                              fold_rows: int | None = None):
    """(logits with the fused decode ops run by the interpreted Triton kernels, logits with the
    references): the tensors are on CPU, so the ops are routed to the kernels by hand. fold_rows:
    FOLD_ROWS_ENV for both runs (None: the default); then also how many of Mamba-1's decode steps
    were handed dt_proj's weight."""
    from interpreter import interpreter_problem
    if hybrid:
        from test_hybrids import _rank_prefill_then_decode
    else:
        from test_model_vs_hf import _rank_prefill_then_decode

    if problem := interpreter_problem():
        return problem
    # both mixers' fused ops, whatever the default (these rank processes serve other tests after)
    env = {dispatch.FUSED_DECODE_ENV: "1", dispatch.MAMBA2_FUSED_ROWS_ENV: "64"}
    if fold_rows is not None:
        env[dispatch.FOLD_ROWS_ENV] = str(fold_rows)
    from megatron_ssm.model import mamba1

    real, real_step = dispatch.backend, mamba1.mamba1_decode_step
    fused = ("mamba1_decode_step", "mamba2_decode_step")
    folded = []
    mamba1.mamba1_decode_step = lambda *a, **k: folded.append(k.get("dt_weight") is not None) or real_step(*a, **k)
    try:
        with mock.patch.dict(os.environ, env):
            dispatch.backend = lambda op, like: "triton" if op in fused else real(op, like)
            try:
                with_kernels = _rank_prefill_then_decode(ckpt, input_ids, split)
            finally:
                dispatch.backend = real
            out = with_kernels, _rank_prefill_then_decode(ckpt, input_ids, split)
        return out if fold_rows is None else (*out, sum(folded))
    finally:
        mamba1.mamba1_decode_step = real_step


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from hf_models import converted_models, hf_config

    return converted_models(tmp_path_factory, hf_config, tps=(1, 2))


@pytest.fixture(scope="module")
def converted_hybrid(tmp_path_factory):
    from hf_models import converted_models, hybrid_config

    return converted_models(tmp_path_factory, hybrid_config, tps=(1, 2))


@pytest.mark.parametrize("family,opts,tp", [
    ("mamba2", dict(n_groups=2), 2),    # groups split: the norm inside the kernel
    ("mamba2", dict(n_groups=1), 2),    # one group over two ranks: y from the kernel, the norm all-reduced
    ("falcon_mamba", dict(), 2),
    ("mamba", dict(), 1),
    ("falcon_h1", dict(kv_heads=4, n_groups=1, mamba_norm=False, layers=1), 2),  # muP scales, y * silu(z)
    ("nemotron_h", dict(pattern="M*-M"), 1),
], ids=["mamba2-split", "mamba2-spanning", "falcon-tp2", "mamba1", "falcon-h1-nonorm-tp2", "nemotron-h"])
def test_model_decode_with_kernels_matches_references(ranks, converted, converted_hybrid, seed, family, opts, tp):
    hybrid = family in ("falcon_h1", "nemotron_h")
    _, _, ckpts, _ = (converted_hybrid if hybrid else converted)(family, opts)
    ids = torch.randint(0, 250, (2, 9))
    got = ranks(tp).run(_rank_decode_with_kernels, ckpts[tp], ids, 5, hybrid)[0]
    if isinstance(got, str):
        pytest.skip(got)
    with_kernels, refs = got
    assert rel_err(with_kernels, refs) < 1e-4, seed


def _rank_mamba2_fused_and_chain(ckpt: str, input_ids: torch.Tensor, split: int, hybrid: bool):
    """Decode logits (references only) with Mamba-2's fused step, its norm deferred and not, and
    with the chain of unfused ops."""
    if hybrid:
        from test_hybrids import _rank_prefill_then_decode
    else:
        from test_model_vs_hf import _rank_prefill_then_decode

    out = []
    for fused, deferred in (("mamba2", "1"), ("mamba2", "0"), ("0", "1")):
        with mock.patch.dict(os.environ, {dispatch.FUSED_DECODE_ENV: fused, dispatch.DEFER_NORM_ENV: deferred,
                                          dispatch.MAMBA2_FUSED_ROWS_ENV: "64"}):  # 64: the tests' two rows
            out.append(_rank_prefill_then_decode(ckpt, input_ids, split))
    return out


@pytest.mark.parametrize("family,opts,tp", [
    ("mamba2", dict(n_groups=2), 2),    # one group a rank: its 1/rms from the step
    ("mamba2", dict(n_groups=1), 2),    # one group over two ranks: the sums of squares all-reduced first
    ("mamba2", dict(n_groups=2), 1),    # two groups on the rank: the norm stays inside the step
    ("nemotron_h", dict(pattern="M*-M"), 1),
], ids=["mamba2-split", "mamba2-spanning", "mamba2-two-groups", "nemotron-h"])
def test_mamba2_fused_decode_matches_the_chain(ranks, converted, converted_hybrid, seed, family, opts, tp):
    """The fused step with its norm deferred to out_proj (a factor per row after the product) and
    inside the step both give the unfused chain's logits."""
    hybrid = family == "nemotron_h"
    _, _, ckpts, _ = (converted_hybrid if hybrid else converted)(family, opts)
    ids = torch.randint(0, 250, (2, 9))
    deferred, inside, chain = ranks(tp).run(_rank_mamba2_fused_and_chain, ckpts[tp], ids, 5, hybrid)[0]
    assert rel_err(deferred, chain) < 1e-5 and rel_err(inside, chain) < 1e-5, seed


def _rank_decode_exit_in_out_proj(ckpt: str, input_ids: torch.Tensor, split: int, hybrid: bool):
    """Decode logits with each block's entry in the epilogue of the projection before it (and how
    many forwards took it), and without (MEGATRON_SSM_EXIT_ROWS=0); then the same with every
    projection and entry in the interpreted skinny-GEMM kernel."""
    if hybrid:
        from test_hybrids import _rank_prefill_then_decode
    else:
        from test_model_vs_hf import _rank_prefill_then_decode
    from megatron_ssm.model import layers

    real, taken = layers.linear_into_entry, []
    layers.linear_into_entry = lambda *a, **k: taken.append(1) or real(*a, **k)
    out = []
    try:
        on, off = {dispatch.EXIT_ROWS_ENV: "16"}, {dispatch.EXIT_ROWS_ENV: "0"}  # 16: the prefill's 10 rows too
        for env in (on, off, {dispatch.LINEAR_ENV: "triton", **on}, {dispatch.LINEAR_ENV: "triton", **off}):
            taken.clear()
            with mock.patch.dict(os.environ, env):
                out.append((_rank_prefill_then_decode(ckpt, input_ids, split), len(taken)))
    finally:
        layers.linear_into_entry = real
    return out


@pytest.mark.parametrize("family,opts,tp", [
    ("falcon_mamba", {}, 1), ("mamba2", dict(n_groups=1), 1), ("mamba2", dict(n_groups=1), 2),
    ("nemotron_h", dict(pattern="M*-M"), 1),
], ids=["falcon-mamba", "mamba2", "mamba2-tp2", "nemotron-h"])
def test_decode_entry_in_the_projection_before(ranks, converted, converted_hybrid, seed, family, opts, tp):
    """A block's entry in the epilogue of the projection before it gives the logits of the entry
    run alone, on the references and in the interpreted kernels; at TP 1 only (TP 2 never takes it:
    the output is summed over ranks before the residual add). Every Mamba block after a projection
    takes it, and the head; the hybrid's attention and MLP blocks wait for a plain output."""
    hybrid = family == "nemotron_h"
    _, _, ckpts, _ = (converted_hybrid if hybrid else converted)(family, opts)
    ids = torch.randint(0, 250, (2, 9))
    (ref, n_ref), (ref_off, n_off), (ker, n_ker), (ker_off, n_ker_off) = \
        ranks(tp).run(_rank_decode_exit_in_out_proj, ckpts[tp], ids, 5, hybrid)[0]
    forwards = 1 + (9 - 1 - 5)  # the prefill (10 rows) and three decode steps
    # the second Mamba layer and the head; in "M*-M" the last M (after the MLP) and the head
    want = 0 if tp > 1 else 2 * forwards
    assert (n_ref, n_ker, n_off, n_ker_off) == (want, want, 0, 0), (n_ref, n_ker, n_off, n_ker_off)
    assert rel_err(ref, ref_off) < 1e-5 and rel_err(ker, ker_off) < 1e-4 and rel_err(ker, ref) < 1e-4, seed


@pytest.mark.parametrize("family,tp", [("falcon_mamba", 2), ("mamba", 1)], ids=["falcon-tp2", "mamba1"])
def test_mamba1_decode_with_dt_proj_folded(ranks, converted, seed, family, tp):
    """dt_proj inside the state update (every row folded): the kernels match the references, and the
    references match the model with dt_proj as its own projection (no row folded)."""
    _, _, ckpts, _ = converted(family, {})
    ids = torch.randint(0, 250, (2, 9))
    folded = ranks(tp).run(_rank_decode_with_kernels, ckpts[tp], ids, 5, False, 8)[0]
    if isinstance(folded, str):
        pytest.skip(folded)
    apart = ranks(tp).run(_rank_decode_with_kernels, ckpts[tp], ids, 5, False, 0)[0]
    assert folded[2] > 0 and apart[2] == 0, (folded[2], apart[2])  # each run's decode steps, both runs
    assert rel_err(folded[0], folded[1]) < 1e-4, seed
    assert rel_err(folded[1], apart[1]) < 1e-6 and rel_err(apart[0], apart[1]) < 1e-4, seed


# ---- the kernels compile for the GPU ------------------------------------------------------------

def _compile_for_sm90() -> list[str]:
    """Compile every variant of the fused kernels down to an sm_90 cubin, without a GPU: as the
    decode graph launches them (PDL, the states and weights loaded before its wait), and once each
    with every load after the wait."""
    from interpreter import compile_for_sm90 as compile_one

    from megatron_ssm.ops.triton import conv1d, decode, scan

    wait = "griddepcontrol.wait"

    def m2_types(a):
        if a.endswith("_ptr"):
            return {"count_ptr": "*i32", "part_ptr": "*fp32", "st_ptr": "*fp32", "A_ptr": "*fp32",
                    "norm_out_ptr": "*fp32"}.get(a, "*bf16")
        return "fp32" if a in ("dt_min", "dt_max", "eps") else "i32"

    def m1_types(a):
        if a.endswith("_ptr"):
            return {"state_ptr": "*fp32", "A_ptr": "*fp32"}.get(a, "*bf16")
        return "fp32" if a in ("dt_min", "dt_max", "norm_eps") else "i32"

    done = []
    for gate, out_sum, early in ((0, False, True), (1, False, True), (2, False, True), (3, False, True),
                                 (3, True, True), (3, False, False)):
        done.append(compile_one(decode._mamba2_decode_kernel, m2_types, dict(
            HEADDIM=64, K=4, HAS_CONV_BIAS=True, HAS_D=True, HAS_DT_BIAS=True, GATE=gate, OUT_SUM=out_sum, BLOCK_D=16,
            BLOCK_N=128, BLOCK_K=4, BLOCK_P=512, NORM_BLOCK=2048, PDL=True, EARLY=early), wait))
    for norm_bc, dt_scale, dt_proj, early in ((True, True, False, True), (True, False, False, True),
                                              (False, False, False, True), (True, True, True, True),
                                              (False, False, True, True), (True, True, True, False)):
        done.append(compile_one(scan._state_update_kernel, m1_types, dict(
            HEADDIM=1, A_PER_HEAD=False, HAS_D=True, HAS_Z=True, HAS_DT_BIAS=True, NORM_BC=norm_bc,
            DT_SCALE=dt_scale, DT_PROJ=dt_proj, BLOCK_D=32 if dt_proj else 128, BLOCK_N=16, BLOCK_R=256 if dt_scale else 1,
            BLOCK_RP=256 if dt_proj else 1, PDL=True, EARLY=early), wait))
    for early in (True, False):
        done.append(compile_one(conv1d._conv_update_kernel, lambda a: "*bf16" if a.endswith("_ptr") else "i32", dict(
            K=4, HAS_BIAS=True, SILU=True, PDL=True, EARLY=early, BLOCK_C=128, BLOCK_K=4), wait))
    return done


def test_fused_kernels_compile_for_sm90(tmp_path):
    from interpreter import run_without_interpreter

    out = run_without_interpreter("import test_decode_fused as t; print('\\n'.join(t._compile_for_sm90()))",
                                  tmp_path, os.path.dirname(__file__))
    assert len(out) == 14, out


# ---- the step, out_proj and the next block's entry (mamba2_step_into_entry) -----------------------

def step_into_entry_inputs(h, p, n, K, N, dtype, device, scale=None, conv_bias=True):
    """One row, one norm group: the deferred step's inputs plus out_proj's weight [N, h p], the
    residual stream [1, 1, N] (fp32) and the next block's norm weight."""
    _, kw = mamba2_decode_inputs(1, h, p, 1, n, K, dtype, device, gate="deferred", conv_bias=conv_bias)
    kw.pop("defer_norm")
    channels = h * p
    return dict(kw, out_weight=_act(N, channels, dtype=dtype, device=device, scale=channels ** -0.5), out_scale=scale,
                residual=torch.randn(1, 1, N, device=device), entry_norm_weight=_act(N, dtype=dtype, device=device),
                entry_eps=1e-5, residual_dtype=torch.float32)


def check_step_into_entry(impl, kw, tol, where=""):
    """impl against the reference on copies of kw: the entry's parts (the 1/rms from the row's
    parts, whatever their number) and both states after the step."""
    ref_kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    want = ref_ops.mamba2_step_into_entry(**ref_kw)
    got = impl(**kw)
    for name, a, b in (("scaled", got.scaled, want.scaled), ("stream", got.stream, want.stream),
                       ("1/rms", got.row_rms.value(), want.row_rms.value()),
                       ("conv state", kw["conv_state"], ref_kw["conv_state"]),
                       ("ssm state", kw["ssm_state"], ref_kw["ssm_state"])):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{name} {where}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        err = rel_err(a, b)
        assert err < tol, f"{name} {where}: relative error {err:.2e}"
    return got


def test_step_into_entry_reference_is_the_two_ops(seed):
    """The reference is the deferred step, then linear_into_entry with its 1/rms: the same numbers
    as the unfused ops (conv update, state update, gated norm, out_proj, add_rms_norm)."""
    kw = step_into_entry_inputs(4, 4, 8, 4, 24, torch.float64, "cpu", scale=0.5)
    plain = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    got = ref_ops.mamba2_step_into_entry(**kw)
    y = ref_ops.mamba2_decode_step(plain["xbc"], plain["z"], plain["dt"], plain["conv_state"], plain["conv_weight"],
                                   plain["conv_bias"], plain["ssm_state"], plain["A"], plain["D"], plain["dt_bias"],
                                   norm_weight=plain["norm_weight"], norm_eps=1e-5)
    delta = ref_ops.linear(y, plain["out_weight"]) * 0.5
    normed, stream = ref_ops.add_rms_norm(plain["residual"], delta.view(1, 1, -1), plain["entry_norm_weight"], 1e-5,
                                          torch.float32)
    assert rel_err(got.stream, stream) < 1e-6, seed
    assert rel_err(got.scaled * got.row_rms.value()[..., None], normed) < 1e-6, seed
    assert rel_err(kw["ssm_state"], plain["ssm_state"]) < 1e-12 and torch.equal(kw["conv_state"], plain["conv_state"])


@DTYPES
@pytest.mark.parametrize("h,p,n,N,scale,conv_bias", [(4, 16, 16, 40, None, True), (3, 16, 5, 70, 0.25, False)],
                         ids=["even", "odd-sizes-scaled"])
def test_step_into_entry_kernel_interpreted(seed, monkeypatch, dtype, h, p, n, N, scale, conv_bias):
    """The kernel's three sections (the interpreter runs them as three launches, split at the waits)
    against the reference, three steps in a row from the kernel's own states; several row blocks
    a part, the last part's rows past N."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import decode

    monkeypatch.setattr(decode, "STEP_OUT_ROW_BLOCK", 16)
    kw = step_into_entry_inputs(h, p, n, 4, N, dtype, "cpu", scale=scale, conv_bias=conv_bias)
    tol = INTERPRETED_TOL[dtype]
    for step in range(3):
        kw.update(xbc=torch.randn_like(kw["xbc"]), z=torch.randn_like(kw["z"]), dt=torch.randn_like(kw["dt"]),
                  residual=torch.randn_like(kw["residual"]))
        got = check_step_into_entry(kernels.mamba2_step_into_entry, kw, tol, f"step {step} (seed {seed})")
        parts = [q for key, q in decode._PARTS.items() if key[1] == h and key[4] == N]
        assert parts and parts[-1] >= 1 and got.row_rms.sum_sq.shape[-1] == h * parts[-1]  # not the fallback
        assert decode._step_out_workspaces[torch.device("cpu")][1].eq(0).all(), f"counters after step {step}"
