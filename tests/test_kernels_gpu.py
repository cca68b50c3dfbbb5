"""GPU kernels against the torch reference at model sizes, and the dispatch layer's choices.

Shapes: Mamba-1 2.8B (d_inner 5120, n 16, conv 5120 channels) and Mamba2-2.7B (80 heads x 64,
n 128, one B/C group, conv 5376 channels), plus a grouped Mamba-2 layout (as after a TP split of a
multi-group model). The inputs are fresh random numbers each run and outputs start out as NaN
(`check_op` poisons the allocator), so an unwritten element fails.

`python tests/test_kernels_gpu.py --bench [--out FILE]` times every implementation against the
reference at the same shapes (triton.testing.do_bench, median, L2 flushed between calls); see
tools/gpu_kernel_check.sh.
"""
from __future__ import annotations

import functools
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))

from test_ops import (  # noqa: E402
    TOL, add_norm_inputs, check_op, check_row_max, conv_inputs, conv_update_inputs, entry_linear_inputs, gated_norm_inputs, linear_inputs,
    packed, packed_attention_inputs, rel_err,
    rms_norm_inputs, rope_inputs, decode_attention_inputs,
    scan_inputs, scan_update_inputs, ssd_inputs, ssd_update_inputs,
)

from test_comm import _edge_inputs, _symmetric_three_steps, _three_steps, check_steps_match, same_bits  # noqa: E402

from megatron_ssm import ops as ref_ops  # noqa: E402
from megatron_ssm.ops import dispatch  # noqa: E402

pytestmark = pytest.mark.gpu

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# mamba-ssm's SSD kernels take fp32 matrix products in tf32.
TF32_TOL = 5e-3
DEV = "cuda"


@pytest.fixture
def seed():
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    return s


def kernels():
    from megatron_ssm.ops import triton as k
    return k


def _tol(dtype, impl=None):
    tol = TOL[dtype]
    return max(tol, TF32_TOL) if impl is dispatch._mamba_ssd_chunk_scan and dtype == torch.float32 else tol


# ---- conv1d ---------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("C", [5120, 5376])
@pytest.mark.parametrize("L,state", [(1000, True), (1000, False), (2, True)])
def test_conv1d(seed, dtype, C, L, state):
    check_op(kernels().causal_conv1d, *conv_inputs(2, L, C, 4, dtype, DEV, state=state), TOL[dtype], seed)


@DTYPES
@pytest.mark.parametrize("b", [1, 16])
def test_conv1d_update(seed, dtype, b):
    check_op(kernels().causal_conv1d_update, *conv_update_inputs(b, 5376, 4, dtype, DEV), TOL[dtype], seed)


def test_conv1d_strided_input(seed):
    """The model feeds a column slice of a packed projection: strides, not a contiguous tensor."""
    packed = torch.randn(2, 300, 3 * 640, device=DEV, dtype=torch.bfloat16)
    op, kw = conv_inputs(2, 300, 640, 4, torch.bfloat16, DEV)
    kw["x"] = packed[..., 640:1280]
    check_op(kernels().causal_conv1d, op, kw, TOL[torch.bfloat16], seed)


# Packed prompts (cu_seqlens) as the engine packs them: one long, one token, one across an SSD chunk
# boundary, and a padding tail.
PACKED = [700, 1, 300, 23]


@DTYPES
def test_conv1d_packed(seed, dtype):
    check_op(kernels().causal_conv1d, *packed(conv_inputs(1, sum(PACKED), 5376, 4, dtype, DEV, state=False), PACKED),
             TOL[dtype], seed)


# ---- Mamba-1 --------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("L,state,gate", [(1000, True, True), (333, False, False), (1, True, True)])
def test_selective_scan(seed, dtype, L, state, gate):
    check_op(kernels().selective_scan, *scan_inputs(2, L, 5120, 16, dtype, DEV, state=state, gate=gate),
             TOL[dtype], seed)


@DTYPES
@pytest.mark.parametrize("b,L,d", [(2, 600, 8192), (1, 3000, 8192), (3, 257, 8000)], ids=["fm7b-b2", "fm7b-b1-long", "d8000"])
def test_selective_scan_falcon_mamba_7b(seed, dtype, b, L, d):
    """falcon-mamba-7b's width at TP=1 (8192 channels; 8000: no block divides it), batch 2 (wide
    blocks) and batch 1 (the narrow blocks that split a channel's states over lanes)."""
    check_op(kernels().selective_scan, *scan_inputs(b, L, d, 16, dtype, DEV), TOL[dtype], seed)


@pytest.mark.parametrize("cfg", [(4, 32, 1, 1), (2, 32, 1, 1), (2, 32, 1, 2), (1, 32, 1, 1), (2, 64, 2, 1), (1, 128, 4, 1),
                                 (1, 16, 1, 2), (1, 8, 1, 2), (1, 8, 1, 1)],
                         ids=lambda c: "P{}W{}w{}ahead{}".format(*c))
def test_selective_scan_layouts(seed, cfg, monkeypatch):
    """Every (P, W, num_warps, AHEAD) the launcher may pick (and wider), compiled for the GPU, at model size."""
    from megatron_ssm.ops.triton import scan
    monkeypatch.setitem(scan.SCAN_CONFIG, 16, (cfg,))
    check_op(kernels().selective_scan, *scan_inputs(2, 300, 8192, 16, torch.bfloat16, DEV), TOL[torch.bfloat16], seed)
    check_op(kernels().selective_scan, *packed(scan_inputs(1, sum(PACKED), 8192, 16, torch.float32, DEV, state=False),
                                               PACKED), TOL[torch.float32], seed)


@DTYPES
def test_selective_scan_packed(seed, dtype):
    check_op(kernels().selective_scan, *packed(scan_inputs(1, sum(PACKED), 5120, 16, dtype, DEV, state=False), PACKED),
             TOL[dtype], seed)


@DTYPES
@pytest.mark.parametrize("b", [1, 16])
def test_selective_state_update(seed, dtype, b):
    check_op(kernels().selective_state_update, *scan_update_inputs(b, 5120, 16, dtype, DEV), TOL[dtype], seed)


# ---- Mamba-2 --------------------------------------------------------------------------------------

def _ssd_impls():
    impls = [pytest.param(lambda: kernels().ssd_chunk_scan, id="ours")]
    impls.append(pytest.param(lambda: dispatch._mamba_ssd_chunk_scan, id="mamba_ssm", marks=pytest.mark.skipif(
        dispatch._mamba_chunk_scan_combined() is None, reason="mamba-ssm not installed")))
    return impls


SSD_SHAPES = pytest.mark.parametrize("b,L,h,p,g,n,state,limit", [
    (2, 1000, 80, 64, 1, 128, True, (0.0, float("inf"))),   # Mamba2-2.7B, L not a multiple of 256
    (2, 256, 80, 64, 1, 128, False, (0.0, float("inf"))),
    (1, 700, 16, 64, 4, 128, True, (0.001, 0.08)),           # grouped B/C, clamped dt
], ids=["2.7B-state", "2.7B-fresh", "grouped-limit"])


@pytest.mark.parametrize("get_impl", _ssd_impls())
@DTYPES
@SSD_SHAPES
def test_ssd_chunk_scan(seed, get_impl, dtype, b, L, h, p, g, n, state, limit):
    impl = get_impl()
    check_op(impl, *ssd_inputs(b, L, h, p, g, n, 256, dtype, DEV, state=state, dt_limit=limit),
             _tol(dtype, impl), seed)


@pytest.mark.parametrize("get_impl", _ssd_impls())
@DTYPES
@pytest.mark.parametrize("h,g", [(80, 1), (16, 4)])
def test_ssd_chunk_scan_packed(seed, get_impl, dtype, h, g):
    impl = get_impl()
    check_op(impl, *packed(ssd_inputs(1, sum(PACKED), h, 64, g, 128, 256, dtype, DEV, state=False), PACKED),
             _tol(dtype, impl), seed)


@DTYPES
@pytest.mark.parametrize("b,h,p,g,n", [(1, 80, 64, 1, 128), (16, 80, 64, 1, 128), (4, 16, 64, 4, 128)])
def test_ssd_state_update(seed, dtype, b, h, p, g, n):
    check_op(kernels().ssd_state_update, *ssd_update_inputs(b, h, p, g, n, dtype, DEV, dt_limit=(0.0, 0.1)),
             TOL[dtype], seed)


def test_ssd_state_update_strided_state(seed):
    """A state whose (heads, headdim) dims don't merge into one: updated through a copy, written back."""
    op, kw = ssd_update_inputs(2, 8, 64, 1, 128, torch.bfloat16, DEV)
    kw["state"] = torch.randn(2, 64, 8, 128, device=DEV).transpose(1, 2)
    check_op(kernels().ssd_state_update, op, kw, TOL[torch.bfloat16], seed)


# ---- norms ----------------------------------------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("lead,width,first", [((1, 1), 2560, False), ((64, 1), 4096, False), ((2, 1000), 4096, True)])
def test_add_rms_norm(seed, dtype, lead, width, first):
    check_op(kernels().add_rms_norm, *add_norm_inputs(lead, width, dtype, DEV, delta=not first), TOL[dtype], seed)
    check_op(kernels().add_rms_norm, *add_norm_inputs(lead, width, dtype, DEV, residual_dtype=dtype), TOL[dtype], seed)


@DTYPES
@pytest.mark.parametrize("lead,width,group", [((2, 1000), 5120, 5120), ((16, 1), 5120, 640), ((3, 7), 2560, 1280)])
def test_gated_rms_norm(seed, dtype, lead, width, group):
    check_op(kernels().gated_rms_norm, *gated_norm_inputs(lead, width, group, dtype, DEV), TOL[dtype], seed)


@DTYPES
def test_gated_rms_norm_group_across_ranks(seed, dtype):
    """n_groups < tp: this rank holds half of one group; the callback adds the other half's sum."""
    _, kw = gated_norm_inputs((2, 500), 5120, 5120, dtype, DEV)
    full = ref_ops.gated_rms_norm(**kw)
    halves = [dict(kw, y=y, gate=g, weight=w) for y, g, w in
              zip(kw["y"].chunk(2, -1), kw["gate"].chunk(2, -1), kw["weight"].chunk(2))]
    total = sum((s["y"].float() * torch.nn.functional.silu(s["gate"].float())).pow(2).sum(-1, keepdim=True)
                for s in halves)
    parts = [kernels().gated_rms_norm(**s, reduce_sum_of_squares=lambda local: total) for s in halves]
    assert rel_err(torch.cat(parts, -1), full) < TOL[dtype], seed


@DTYPES
@pytest.mark.parametrize("lead,width,weight", [((2, 1000), 2560, True), ((4, 1), 160, False), ((5,), 16, False)])
def test_rms_norm(seed, dtype, lead, width, weight):
    check_op(kernels().rms_norm, *rms_norm_inputs(lead, width, dtype, DEV, weight=weight), TOL[dtype], seed)


# ---- skinny GEMMs (decode projections) -------------------------------------------------------------

# (N, K, bias): mamba2-2.7b in_proj / out_proj, falcon-mamba-7b out_proj / x_proj / dt_proj, odd sizes
GEMV_SHAPES = [(10576, 2560, False), (2560, 5120, False), (4096, 8192, False), (288, 8192, False), (8192, 256, True),
               (1000, 999, True)]


@DTYPES
@pytest.mark.parametrize("rows,v", [(1, 65024), (1, 50288), (64, 65024), (3, 100), (2, 131072)])
def test_row_max(seed, dtype, rows, v):
    check_row_max(kernels().row_max, rows, v, dtype, DEV, seed)
    assert dispatch.backend("row_max", torch.empty(1, device=DEV)) == "triton"


def test_row_max_replayed_from_a_graph(seed):
    """Captured once, replayed on new logits: the row counters reset themselves."""
    x = torch.randn(4, 65024, device=DEV)
    kernels().row_max(x)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, idx = kernels().row_max(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(idx, x.argmax(-1)), f"seed {seed}"


@DTYPES
@pytest.mark.parametrize("n,k,bias", GEMV_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "heuristic"])
def test_linear(seed, dtype, n, k, bias, m, tuned):
    """The tuned choice (which may be cuBLAS) and the heuristic configuration (always the kernel),
    with an output scale (one float, one factor per feature, the model's Factors) on the last two shapes."""
    from megatron_ssm.ops.triton import gemv

    impl = kernels().linear if tuned else (
        lambda x, weight, bias, scale=None: gemv.linear(x, weight, bias, scale, config=gemv.heuristic(m, n, k, x.device)))
    scales = [None] + (["float", "vector", "segments"] if (n, k, bias) in GEMV_SHAPES[-2:] else [])
    for scale in scales:
        check_op(impl, *linear_inputs((m,), n, k, dtype, DEV, bias=bias, scale=scale), TOL[dtype], seed)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_linear_row_scale(seed, m):
    """A factor per row of x after the product (Mamba-2's deferred norm into out_proj), tuned shape."""
    _, kw = linear_inputs((m, 1), 2560, 5120, torch.bfloat16, DEV, bias=False)
    rows = torch.rand(m, 1, device=DEV) + 0.5
    want = ref_ops.linear(**kw, row_scale=rows)
    assert rel_err(dispatch.linear(**kw, row_scale=rows), want) < TOL[torch.bfloat16], seed
    assert rel_err(kernels().linear(**kw, row_scale=rows, config=kernels().gemv.heuristic(m, 2560, 5120, kw["x"].device)),
                   want) < TOL[torch.bfloat16], seed


@pytest.mark.parametrize("n,k,bias", [(2560, 5120, False), (288, 8192, False), (8192, 256, True)])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_linear_split_k_replayed_from_a_graph(seed, n, k, bias, m, pdl, monkeypatch):
    """Split-K launches captured once and replayed on new inputs: the arrival counters reset
    themselves, so every replay reduces all splits. With PDL, the captured launches are
    programmatic dependents of the copy that writes x (so a read of x before the wait would fail)."""
    from megatron_ssm.ops.triton import gemv, pdl as pdl_mod

    monkeypatch.setenv(pdl_mod.ENV, "1" if pdl else "0")
    if pdl and not pdl_mod.supported(torch.device(DEV)):
        pytest.skip("no programmatic dependent launch here")
    _, kw = linear_inputs((m,), n, k, torch.bfloat16, DEV, bias=bias)
    for cfg in [gemv.Config(32, 64, 8, 4), gemv.Config(32, 256, 8, 4, dot=False)]:
        gemv.linear(**kw, config=cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        fresh = torch.empty_like(kw["x"])
        with torch.cuda.graph(graph):
            kw["x"].copy_(fresh)  # the kernel before: the one a PDL launch overlaps
            out = gemv.linear(**kw, config=cfg)
        for step in range(3):
            fresh.copy_(torch.randn_like(fresh))
            graph.replay()
            err = rel_err(out, F.linear(**kw))
            assert err < TOL[torch.bfloat16], f"{cfg} replay {step}: relative error {err:.2e} (seed {seed})"


# (N out, K in, N of the next projection): mamba2-2.7b's out_proj then in_proj, falcon-mamba-7b's
# out_proj then in_proj, and its last out_proj then the LM head
EXIT_SHAPES = [(2560, 5120, 10576), (4096, 8192, 16384), (4096, 8192, 65024)]


@pytest.mark.parametrize("n,k,n2", EXIT_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("pdl", [False, True], ids=["eager", "graphed-pdl"])
def test_linear_into_entry_then_the_next_projection(seed, n, k, n2, m, pdl, monkeypatch):
    """out_proj with the next block's entry in its epilogue (tuned configuration), then the next
    projection with the norm's 1/rms from the parts, against the references; graphed with PDL
    behind the copy that writes x, replayed on new inputs."""
    from megatron_ssm.ops.triton import pdl as pdl_mod

    monkeypatch.setenv(pdl_mod.ENV, "1" if pdl else "0")
    if pdl and not pdl_mod.supported(torch.device(DEV)):
        pytest.skip("no programmatic dependent launch here")
    bf = torch.bfloat16
    x = torch.randn(m, k, device=DEV, dtype=bf)
    w = (torch.randn(n, k, device=DEV) / k ** 0.5).to(bf)
    w2 = (torch.randn(n2, n, device=DEV) / n ** 0.5).to(bf)
    residual = torch.randn(m, n, device=DEV, dtype=torch.float32)
    norm_w = (0.5 + torch.rand(n, device=DEV)).to(bf)
    rows = 0.5 + torch.rand(m, device=DEV)

    def both():
        entry = kernels().linear_into_entry(x, w, rows, residual, norm_w, 1e-5, torch.float32)
        return entry, kernels().linear(entry.scaled, w2, row_scale=entry.row_rms)

    both()  # tunes both shapes eagerly
    torch.cuda.synchronize()
    if pdl:
        graph, fresh = torch.cuda.CUDAGraph(), torch.empty_like(x)
        with torch.cuda.graph(graph):
            x.copy_(fresh)
            entry, out = both()
    for step in range(2 if pdl else 1):
        if pdl:
            fresh.copy_(torch.randn_like(fresh))
            graph.replay()
        else:
            entry, out = both()
        want = ref_ops.linear_into_entry(x, w, rows, residual, norm_w, 1e-5, torch.float32)
        normed, h = ref_ops.add_rms_norm(residual, ref_ops.linear(x, w, row_scale=rows), norm_w, 1e-5, torch.float32)
        where = f"m {m} ({n}, {k}) -> {n2} step {step} (seed {seed})"
        assert rel_err(entry.stream, h) < 1e-2 and rel_err(entry.scaled, want.scaled) < TOL[bf], where
        assert rel_err(entry.row_rms.value(), want.row_rms.value()) < 1e-3, where
        assert rel_err(out, ref_ops.linear(normed, w2)) < TOL[bf], where


# (N, K, bias, stream dtype): falcon-mamba-7b's in_proj (fp32 stream) and LM head, mamba2-2.7b's in_proj
# (where linear's tuner takes cuBLAS: the entry then takes our kernel's fastest), odd sizes
ENTRY_SHAPES = [(16384, 4096, False, torch.float32), (65024, 4096, False, torch.float32),
                (10576, 2560, False, torch.float32), (1000, 999, True, None)]


@DTYPES
@pytest.mark.parametrize("n,k,bias,stream", ENTRY_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("tuned", [True, False], ids=["tuned", "heuristic"])
def test_add_rms_norm_linear(seed, dtype, n, k, bias, stream, m, tuned):
    """A block's entry inside its first projection's launch, against add_rms_norm then linear: the
    tuned configuration and the heuristic one, the first block (no delta) on the odd shape."""
    from megatron_ssm.ops.triton import gemv

    impl = kernels().add_rms_norm_linear if tuned else functools.partial(
        gemv.add_rms_norm_linear, config=gemv.heuristic(m, n, k, torch.device(DEV)))
    for delta in (True, False) if stream is None else (True,):
        check_op(impl, *entry_linear_inputs((m,), n, k, dtype, DEV, residual_dtype=stream or dtype, delta=delta,
                                            bias=bias), TOL[dtype], seed)


@pytest.mark.parametrize("m", [1, 16])
def test_add_rms_norm_linear_replayed_from_a_graph(seed, m, monkeypatch):
    """The entry captured once (PDL on, behind the copy that writes the stream) and replayed on new
    streams: each replay's output and stream are the new inputs', split K and not."""
    from megatron_ssm.ops.triton import gemv, pdl as pdl_mod

    monkeypatch.setenv(pdl_mod.ENV, "1")
    _, kw = entry_linear_inputs((m,), 2560, 5120, torch.bfloat16, DEV)
    for cfg in [gemv.Config(32, 64, 8, 4), gemv.Config(64, 128, 1, 4)]:
        gemv.add_rms_norm_linear(**kw, config=cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        fresh = torch.empty_like(kw["residual"])
        with torch.cuda.graph(graph):
            kw["residual"].copy_(fresh)
            out, stream = gemv.add_rms_norm_linear(**kw, config=cfg)
        for step in range(3):
            fresh.copy_(torch.randn_like(fresh) * 3)
            graph.replay()
            want, want_stream = ref_ops.add_rms_norm_linear(**kw)
            err = rel_err(out, want)
            assert torch.equal(stream, want_stream), f"{cfg} replay {step}: the stream differs (seed {seed})"
            assert err < TOL[torch.bfloat16], f"{cfg} replay {step}: relative error {err:.2e} (seed {seed})"


# ---- packed causal attention (a hybrid's packed prefill) ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("lengths,heads,kv_heads,scale", [((37, 1, 200, 64), 8, 2, None), ((512,) * 4, 4, 4, 0.05)],
                         ids=["gqa-mixed", "mha-scaled"])
def test_packed_causal_attention_flash(seed, dtype, lengths, heads, kv_heads, scale):
    """torch's flash varlen kernel, as dispatch takes it, against the masked reference."""
    from megatron_ssm.ops import attention

    if attention.flash_varlen() is None:
        pytest.skip("this torch has no flash varlen attention with causal windows")
    assert attention.flash_works(torch.device(DEV)), "torch's flash varlen kernel failed its probe (see the log)"
    op, kw = packed_attention_inputs(lengths, heads, kv_heads, 128, dtype, DEV, scale)
    assert dispatch.backend(op, kw["q"]) == "flash"
    check_op(dispatch.implementation(op, kw["q"]), op, kw, TOL[dtype], seed)


# ---- the fused decode steps (ops/decode.py) --------------------------------------------------------

@DTYPES
@pytest.mark.parametrize("b,h,p,g,n,gate,limit", [
    (1, 80, 64, 1, 128, "norm", (0.0, float("inf"))),    # Mamba2-2.7B
    (16, 80, 64, 1, 128, "norm", (0.0, float("inf"))),
    (4, 64, 64, 4, 128, "norm", (0.0, 0.1)),             # Codestral's 8 groups split over TP 2
    (2, 80, 64, 1, 128, "silu", (0.0, float("inf"))),    # Falcon-H1 sizes without the gated norm
    (2, 80, 64, 1, 128, None, (0.0, float("inf"))),      # the norm group spans ranks: y alone
    (1, 80, 64, 1, 128, "deferred", (0.0, float("inf"))),  # the norm's 1/rms left for out_proj
    (16, 80, 64, 1, 128, "deferred", (0.0, float("inf"))),
    (4, 64, 64, 4, 128, "deferred", (0.0, 0.1)),
], ids=["2.7B-b1", "2.7B-b16", "grouped", "silu", "y", "deferred-b1", "deferred-b16", "deferred-grouped"])
def test_mamba2_decode_step(seed, dtype, b, h, p, g, n, gate, limit):
    from test_decode_fused import mamba2_decode_inputs
    check_op(kernels().mamba2_decode_step, *mamba2_decode_inputs(b, h, p, g, n, 4, dtype, DEV, gate=gate, dt_limit=limit),
             TOL[dtype], seed)


@DTYPES
@pytest.mark.parametrize("b,d,norms,dt_proj,rank", [
    (1, 8192, True, False, 256), (32, 8192, True, False, 256), (4, 5120, False, False, 256),
    (1, 8192, True, True, 256), (4, 8192, True, True, 256), (2, 5120, False, True, 160)],
    ids=["falcon-7B-b1", "falcon-7B-b32", "mamba1", "falcon-7B-b1-dt-proj", "falcon-7B-b4-dt-proj", "mamba-2.8B-dt-proj"])
def test_mamba1_decode_step(seed, dtype, b, d, norms, dt_proj, rank):
    from test_decode_fused import mamba1_decode_inputs
    check_op(kernels().mamba1_decode_step,
             *mamba1_decode_inputs(b, d, 16, dtype, DEV, norms=norms, dt_rank=rank, dt_proj=dt_proj), TOL[dtype], seed)


@pytest.mark.parametrize("h,N", [(80, 2560), (128, 4096)], ids=["2.7B", "codestral-7B"])
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed-pdl"])
def test_mamba2_step_into_entry(seed, h, N, graphed, monkeypatch):
    """The step, out_proj and the next block's entry in one launch (its grid barrier inside) at
    model sizes, three steps: eagerly, or captured behind the copy that writes in_proj's output and
    replayed as a programmatic dependent (the barrier's counters must be back at zero each time)."""
    from test_decode_fused import check_step_into_entry, step_into_entry_inputs

    from megatron_ssm.ops.triton import decode, pdl as pdl_mod

    monkeypatch.setenv(pdl_mod.ENV, "1")
    if graphed and not pdl_mod.supported(torch.device(DEV)):
        pytest.skip("no programmatic dependent launch here")
    bf = torch.bfloat16
    kw = step_into_entry_inputs(h, 64, 128, 4, N, bf, DEV, scale=0.5)
    fresh = {k: kw[k].clone() for k in ("xbc", "z", "dt", "residual")}
    run = lambda: kernels().mamba2_step_into_entry(**kw)  # noqa: E731
    if graphed:
        run()  # compiles and sizes the workspace outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for k, v in fresh.items():
                kw[k].copy_(v)
            captured = run()
    for step in range(3):
        for v in fresh.values():
            v.copy_(torch.randn_like(v) * (0.5 if v.shape[-1] == h else 1.0))
        where = f"step {step} (seed {seed})"
        if graphed:
            ref_kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            ref_kw.update({k: v.clone() for k, v in fresh.items()})
            want = ref_ops.mamba2_step_into_entry(**ref_kw)
            graph.replay()
            torch.cuda.synchronize()
            for name, a, b in (("scaled", captured.scaled, want.scaled), ("stream", captured.stream, want.stream),
                               ("1/rms", captured.row_rms.value(), want.row_rms.value()),
                               ("ssm state", kw["ssm_state"], ref_kw["ssm_state"]),
                               ("conv state", kw["conv_state"], ref_kw["conv_state"])):
                assert rel_err(a, b) < TOL[bf], f"{name} {where}: {rel_err(a, b):.2e}"
        else:
            kw.update({k: v.clone() for k, v in fresh.items()})
            got = check_step_into_entry(kernels().mamba2_step_into_entry, kw, TOL[bf], where)
            parts = [q for key, q in decode._PARTS.items() if key[1] == h and key[4] == N]
            assert parts and parts[-1] >= 1 and got.row_rms.sum_sq.shape[-1] == h * parts[-1], f"fallback {where}"
        assert decode._step_out_workspaces[kw["xbc"].device][1].eq(0).all(), f"counters {where}"


@pytest.mark.parametrize("gate", ["norm", "deferred"])
def test_mamba2_decode_step_replayed_from_a_graph(seed, gate):
    """Several steps replayed from one captured launch: the group counters reset every time."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
    from fuse_check import check_graph_replay
    check_graph_replay(gate=gate)


@DTYPES
@pytest.mark.parametrize("b,L,heads,d,rotary_dim", [(1, 1, 32, 128, 128), (16, 1, 8, 64, 32), (1, 512, 4, 128, 128)],
                         ids=["decode-b1", "decode-b16-partial", "prefill"])
def test_rotary_embedding(seed, dtype, b, L, heads, d, rotary_dim):
    op, kw = rope_inputs(b, L, heads, d, rotary_dim, dtype, DEV, start=4000)
    check_op(kernels().rotary_embedding, op, kw, TOL[dtype], seed)
    _check_verified(op, kw)


def _check_verified(op, kw):
    """Through dispatch, the kernel passes the first-call check a kernel gets while in VERIFY_FIRST
    (the check's own path on a GPU, with a real kernel)."""
    dispatch._VERIFIED.clear()
    added = op not in dispatch.VERIFY_FIRST
    dispatch.VERIFY_FIRST.add(op)
    try:
        getattr(dispatch, op)(**kw)
    finally:
        if added:
            dispatch.VERIFY_FIRST.discard(op)
    decisions = [ok for key, ok in dispatch._VERIFIED.items() if key[0] == op]
    assert decisions == [True], f"{op}: the dispatch check refused the kernel ({decisions})"


@DTYPES
@pytest.mark.parametrize("b,S,heads,kv_heads,d", [(1, 576, 32, 8, 128), (16, 8192, 12, 2, 64), (3, 100, 4, 4, 128)],
                         ids=["nemotron-b1", "long-b16-gqa6", "mha"])
def test_decode_attention(seed, dtype, b, S, heads, kv_heads, d):
    positions = torch.randint(0, S, (b,)).tolist()
    positions[0] = S + 3  # a graph's free row, past the cache
    op, kw = decode_attention_inputs(b, S, heads, kv_heads, d, dtype, DEV, positions)
    check_op(kernels().decode_attention, op, kw, TOL[dtype], seed)
    _check_verified(op, kw)


# ---- dispatch -------------------------------------------------------------------------------------

def test_dispatch_choices(monkeypatch):
    x = torch.zeros(1, device=DEV)
    expect_ssd = "mamba_ssm" if dispatch._mamba_chunk_scan_combined() is not None else "torch"
    expect = {"ssd_chunk_scan": expect_ssd, "packed_causal_attention": "torch"}  # (flash: 16-bit only)
    for op in ref_ops.__all__:
        assert dispatch.backend(op, x) == expect.get(op, "triton"), op
    from megatron_ssm.ops import attention
    expect_flash = "flash" if attention.flash_varlen() is not None else "torch"
    assert dispatch.backend("packed_causal_attention", x.bfloat16()) == expect_flash
    assert dispatch.backend("selective_scan", x.cpu()) == "torch"
    assert dispatch.backend("linear", torch.zeros(dispatch.GEMV_MAX_ROWS + 1, 8, device=DEV)) == "torch"
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert all(dispatch.backend(op, x) == "torch" for op in ref_ops.__all__)


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_dispatch_matches_reference(seed, dtype):
    for op, kw in [conv_inputs(2, 300, 5376, 4, dtype, DEV), conv_update_inputs(4, 5376, 4, dtype, DEV),
                   scan_inputs(2, 300, 1024, 16, dtype, DEV), scan_update_inputs(4, 5120, 16, dtype, DEV),
                   ssd_inputs(2, 300, 80, 64, 1, 128, 256, dtype, DEV), ssd_update_inputs(4, 80, 64, 1, 128, dtype, DEV),
                   rms_norm_inputs((2, 300), 2560, dtype, DEV), gated_norm_inputs((2, 300), 5120, 5120, dtype, DEV),
                   linear_inputs((4, 1), 2560, 5120, dtype, DEV), linear_inputs((2, 300), 2560, 5120, dtype, DEV)]:
        check_op(getattr(dispatch, op), op, kw, TOL[dtype], seed)


# ---- the quantised all-reduce's fused steps (megatron_ssm/comm/triton_quantize.py) ---------------

@pytest.mark.parametrize("fmt", ["int8", "fp8", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("world,shape,block", [(2, (1,), 128), (4, (4099,), 128), (3, (5, 1031), 128),
                                               (4, (3000,), 32), (8, (64, 4099), 128), (4, (2048, 4096), 128)])
def test_quantized_allreduce_steps(seed, fmt, dtype, world, shape, block):
    """The three kernels give torch's bytes (send and gathered buffers) and bits (result), against
    torch on CUDA and on CPU (which defines the numbers), NaN/inf/zero/-0/subnormal blocks included."""
    from megatron_ssm.comm import quantize, triton_quantize

    xs = [x.to(DEV) for x in _edge_inputs(seed, world, shape, dtype)]
    check_steps_match(triton_quantize, quantize, xs, fmt, block, seed)
    check_steps_match(triton_quantize, quantize, xs, fmt, block, seed, ref_device="cpu")


@pytest.mark.parametrize("fmt", ["int8", "fp16"])
def test_quantized_allreduce_steps_in_cuda_graph(seed, fmt):
    """The kernels capture into a CUDA graph (no host syncs) and replay on new input."""
    from megatron_ssm.comm import QuantizedAllReduce, quantize, triton_quantize

    assert QuantizedAllReduce(fmt)._module(torch.zeros(1, device=DEV)) is triton_quantize
    xs = [x.to(DEV) for x in _edge_inputs(seed, 4, (8, 1000), torch.bfloat16)]
    static = [x.clone() for x in xs]
    steps = lambda: _three_steps(triton_quantize, static, fmt, 128)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        steps()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, _, out = steps()
    fresh = [x.to(DEV) for x in _edge_inputs(seed + 1, 4, (8, 1000), torch.bfloat16)]
    for s, x in zip(static, fresh):
        s.copy_(x)
    graph.replay()
    assert same_bits(out.cpu(), _three_steps(quantize, [x.cpu() for x in fresh], fmt, 128)[2]), seed


@pytest.mark.parametrize("fmt", ["int8", "fp8", "fp16"])
@pytest.mark.parametrize("world,shape", [(2, (4099,)), (4, (64, 4099)), (8, (2048, 512))])
def test_symmetric_allreduce_steps_read_peers_by_address(seed, fmt, world, shape):
    """symmetric.py's three kernels with every "rank's" buffer on this GPU, read through their
    addresses as peers' would be over NVLink: the two-shot's bits on every rank (torch on CPU)."""
    from megatron_ssm.comm import quantize, triton_quantize

    xs = [x.to(DEV) for x in _edge_inputs(seed, world, shape, torch.bfloat16)]
    want = _three_steps(quantize, [x.cpu() for x in xs], fmt, 128)[2]
    for r, got in enumerate(_symmetric_three_steps(triton_quantize, xs, fmt, 128, 1 << 26)):
        assert same_bits(got.cpu(), want), f"seed {seed}: rank {r} of {world}"


# ---- timings --------------------------------------------------------------------------------------

def _bench_cases():
    """(case name, op, kwargs) at the shapes the models run: decode at batch 1 and 16, prefill of
    one 2048-token prompt and of 8 x 512 tokens. bf16 activations, fp32 states."""
    bf = torch.bfloat16
    cases = []
    for b in (1, 16):
        cases += [
            (f"decode b{b} conv1d_update 5376", *conv_update_inputs(b, 5376, 4, bf, DEV)),
            (f"decode b{b} selective_state_update m1-2.8B", *scan_update_inputs(b, 5120, 16, bf, DEV)),
            (f"decode b{b} ssd_state_update m2-2.7B", *ssd_update_inputs(b, 80, 64, 1, 128, bf, DEV)),
            (f"decode b{b} gated_rms_norm 5120", *gated_norm_inputs((b, 1), 5120, 5120, bf, DEV)),
            (f"decode b{b} rms_norm 2560", *rms_norm_inputs((b, 1), 2560, bf, DEV)),
        ]
    for b, L in ((1, 2048), (8, 512)):
        cases += [
            (f"prefill {b}x{L} conv1d 5376", *conv_inputs(b, L, 5376, 4, bf, DEV)),
            (f"prefill {b}x{L} selective_scan m1-2.8B", *scan_inputs(b, L, 5120, 16, bf, DEV)),
            (f"prefill {b}x{L} ssd_chunk_scan m2-2.7B", *ssd_inputs(b, L, 80, 64, 1, 128, 256, bf, DEV)),
            (f"prefill {b}x{L} gated_rms_norm 5120", *gated_norm_inputs((b, L), 5120, 5120, bf, DEV)),
            (f"prefill {b}x{L} rms_norm 2560", *rms_norm_inputs((b, L), 2560, bf, DEV)),
        ]
    return cases


def _min_bytes(op, kw, ref_out):
    """Each input read once, each output written once (an in-place state counts twice)."""
    n = sum(v.nbytes for v in kw.values() if isinstance(v, torch.Tensor))
    n += sum(t.nbytes for t in (ref_out if isinstance(ref_out, tuple) else (ref_out,)))
    if op in ("causal_conv1d_update", "selective_state_update", "ssd_state_update"):
        n += kw["conv_state" if op == "causal_conv1d_update" else "state"].nbytes
    return n


def _time(fn):
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # us


def _impls(op):
    impls = {"torch": getattr(ref_ops, op), "triton": getattr(kernels(), op)}
    if op == "ssd_chunk_scan" and dispatch._mamba_chunk_scan_combined() is not None:
        impls["mamba_ssm"] = dispatch._mamba_ssd_chunk_scan
    return impls


def _run(impl, kw):
    fresh = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return fresh, (lambda: impl(**fresh))


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _bench_allreduce_steps(record, hbm_tbps):
    """The quantised all-reduce's three local steps for one rank of 4, on a 128 MiB bf16 message
    (int8 and fp16), fused against the torch steps; floor: each input read and each output written once."""
    from megatron_ssm.comm import quantize, triton_quantize

    x = torch.randn(64 << 20, dtype=torch.bfloat16, device=DEV)
    for fmt in ("int8", "fp16"):
        sent = triton_quantize.quantize_pack(x, fmt, 128, 4)
        out = torch.empty_like(sent[0])
        steps = {"quantize_pack": (lambda ops: ops.quantize_pack(x, fmt, 128, 4), x.nbytes + sent.nbytes),
                 "reduce_requantise": (lambda ops: ops.reduce_requantise(sent, fmt, 128, out), sent.nbytes + out.nbytes),
                 "unpack_dequantise": (lambda ops: ops.unpack_dequantise(sent, fmt, 128, x.shape, x.dtype),
                                       sent.nbytes + x.nbytes)}
        for name, (step, nbytes) in steps.items():
            for impl, ops in (("torch", quantize), ("triton", triton_quantize)):
                floor = nbytes / (hbm_tbps * 1e12) * 1e6
                record(f"allreduce {fmt} 128MiB/4 {name}", impl, _time(lambda: step(ops)), floor, 0.0)


def bench(out_path=None, hbm_tbps=None):
    import json

    from megatron_ssm.ops.triton import scan

    if hbm_tbps is None:  # measure the copy ceiling once: bytes read + written over time
        a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
        bb = torch.empty_like(a)
        hbm_tbps = 2 * a.nbytes / (_time(lambda: bb.copy_(a)) * 1e-6) / 1e12
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {hbm_tbps:.2f} TB/s")
    rows = []

    def record(case, impl_name, us, floor, err):
        rows.append(dict(case=case, impl=impl_name, us=round(us, 2), floor_us=round(floor, 2), rel_err=err))
        print(f"{case:44s} {impl_name:22s} {us:10.1f} us  floor {floor:8.1f} us  err {err:.1e}", flush=True)

    for case, op, kw in _bench_cases():
        ref_kw, ref_fn = _run(getattr(ref_ops, op), kw)
        ref_out = ref_fn()
        floor = _min_bytes(op, kw, ref_out) / (hbm_tbps * 1e12) * 1e6
        for name, impl in _impls(op).items():
            fresh, fn = _run(impl, kw)
            err = rel_err(_first(fn()), _first(ref_out)) if name != "torch" else 0.0
            record(case, name, _time(fn), floor, err)
        # tuning sweeps for the prefill scan (SCAN_CONFIG's (P, W, num_warps, AHEAD) candidates) and the decode block
        if op in ("selective_scan", "ssd_chunk_scan"):
            n = kw["A"].shape[-1] if op == "selective_scan" else kw["B"].shape[-1]
            default = scan.SCAN_CONFIG.get(n)
            cfgs = ([(2, 32, 1, 1), (1, 32, 1, 1), (2, 64, 2, 1), (1, 16, 1, 2), (1, 8, 1, 2), (1, 8, 1, 1)] if n == 16
                    else [(1, 16, 1, 1), (1, 8, 1, 1), (1, 4, 1, 2), (2, 4, 1, 1)])
            for cfg in cfgs:
                scan.SCAN_CONFIG[n] = (cfg,)
                fresh, fn = _run(getattr(kernels(), op), kw)
                err = rel_err(_first(fn()), _first(ref_out))
                record(case, f"triton P,W,w={cfg}", _time(fn), floor, err)
            scan.SCAN_CONFIG[n] = default
        if op in ("selective_state_update", "ssd_state_update"):
            default = scan.UPDATE_BLOCK
            for blk in (512, 1024, 4096, 8192):
                scan.UPDATE_BLOCK = blk
                fresh, fn = _run(getattr(kernels(), op), kw)
                err = rel_err(_first(fn()), _first(ref_out))
                record(case, f"triton block={blk}", _time(fn), floor, err)
            scan.UPDATE_BLOCK = default
    _bench_allreduce_steps(record, hbm_tbps)
    if out_path:
        with open(out_path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_tbps=hbm_tbps,
                           rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.bench:
        torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
        with torch.inference_mode():
            bench(args.out)
