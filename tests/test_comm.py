"""The pluggable all-reduce (megatron_ssm.comm): block quantisation, the two-shot quantised
all-reduce against the exact sum, edge values, the exact path, `auto` and `make_allreduce`.

Inputs are random with a fresh seed per test (conftest's `seed`; MEGATRON_SSM_TEST_SEED replays one); every rank builds
all ranks' inputs from that seed, so each can compute the exact sum and the error bound locally.
Functions run on ranks are module-level (the rank pool imports them by name).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_ssm.comm import (
    ALLREDUCE_CHOICES,
    AutoAllReduce,
    ExactAllReduce,
    QuantizedAllReduce,
    calibrate,
    dequantize_blocks,
    make_allreduce,
    quantize_blocks,
)
from megatron_ssm.comm.allreduce import threshold_by_name
from megatron_ssm.comm.quantize import code_dtype

FORMATS = ("int8", "fp8", "fp16")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = [(1,), (127,), (1000,), (4099,), (3, 333), (2, 5, 7)]
WORLDS = (2, 4)


def _rank():
    from megatron_ssm.parallel import tp_context

    return tp_context(torch.device("cpu"))


def _inputs(seed: int, world: int, shape, dtype=torch.float32) -> list[torch.Tensor]:
    """One input per rank, different on each: normal values whose magnitude changes every 64
    elements (10^-3..10^3), so blocks mix scales and some blocks straddle two."""
    xs = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 64 + r)
        n = math.prod(shape)
        mag = 10.0 ** torch.randint(-3, 4, (n // 64 + 1,), generator=g).repeat_interleave(64)[:n]
        xs.append((torch.randn(n, generator=g) * mag).to(dtype).view(shape))
    return xs


# --- error bounds ---------------------------------------------------------------------------------

def _step_bound(v: torch.Tensor, fmt: str, block: int) -> torch.Tensor:
    """Largest quantisation error of each element, given (an upper bound on) |values|, flat fp64.
    Monotone in |values|, so a bound on them gives a bound on the error."""
    n = v.numel()
    vb = torch.nn.functional.pad(v, (0, -n % block)).view(-1, block)
    if fmt == "int8":  # round to nearest: half a step of absmax / 127
        err = (vb.amax(dim=1, keepdim=True) / 127 / 2).expand_as(vb)
    elif fmt == "fp8":  # e4m3: 3 mantissa bits (half-ulp 2^-4 relative), subnormal half-step 2^-10
        scale = vb.amax(dim=1, keepdim=True) / 448
        err = torch.maximum(vb / 16, scale / 1024)
    else:  # fp16: 10 mantissa bits, subnormal half-step 2^-25
        err = torch.clamp(vb * 2.0**-11, min=2.0**-25)
    return err.reshape(-1)[:n]


def _two_shot_reference(xs: list[torch.Tensor], fmt: str, block: int):
    """(exact sum, per-element error bound) in fp64 for the two-shot algorithm on inputs xs.

    Stage 1: each rank's values are quantised (block boundaries are those of the flat input: the
    algorithm pads only at the end). Stage 2: the owner's sum is requantised. Then the result is
    rounded to the inputs' dtype. The slack covers fp32 arithmetic (divisions, the sum)."""
    flat = [x.reshape(-1).double() for x in xs]
    ref = sum(flat)
    e1 = sum(_step_bound(f.abs(), fmt, block) for f in flat)
    e2 = _step_bound(ref.abs() + e1, fmt, block)
    quant = (e1 + e2) * (1 + 1e-4) + 1e-6 * sum(f.abs() for f in flat)
    out_eps = torch.finfo(xs[0].dtype).eps
    return ref, quant + out_eps * (ref.abs() + quant)


# --- quantise / dequantise (one process) ----------------------------------------------------------

@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_roundtrip_error_per_block(fmt, block, seed):
    x = _inputs(seed, 1, (block * 37,))[0]
    q, scales = quantize_blocks(x, fmt, block)
    y = dequantize_blocks(q, scales, fmt, block)
    assert y.dtype == torch.float32 and y.shape == x.shape
    err = (y.double() - x.double()).abs()
    xb = x.double().view(-1, block)
    if fmt == "int8":
        assert q.dtype == torch.int8 and scales.shape == (37,)
        assert torch.allclose(scales.double(), xb.abs().amax(1) / 127, rtol=1e-6)
        bound = (scales.double() / 2).repeat_interleave(block) * (1 + 1e-5)
    elif fmt == "fp8":
        assert q.dtype == torch.float8_e4m3fn and scales.shape == (37,)
        bound = torch.maximum(x.double().abs() / 16, (scales.double() / 1024).repeat_interleave(block))
        bound = bound * (1 + 1e-5)
    else:
        assert q.dtype == torch.float16 and scales is None
        bound = x.double().abs() * 2.0**-11 + 2.0**-25
    worst = (err / bound).max().item()
    assert worst <= 1, f"seed {seed}: error {worst:.3f}x the bound"


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_edge_values(fmt):
    f32max = torch.finfo(torch.float32).max
    blocks = {
        "zero": torch.zeros(128),
        "huge": torch.linspace(-1e30, 1e30, 128),
        "bf16max": torch.full((128,), torch.finfo(torch.bfloat16).max) * torch.tensor([1.0, -1.0]).repeat(64),
        "tiny": torch.linspace(-1e-38, 1e-38, 128),
    }
    x = torch.cat(list(blocks.values()))
    q, scales = quantize_blocks(x, fmt, 128)
    y = dequantize_blocks(q, scales, fmt, 128).view(len(blocks), 128)
    assert torch.isfinite(y).all()
    assert (y[0] == 0).all()
    if fmt != "fp16":  # fp16 saturates at 65504: the scale-less format cannot hold 1e30
        assert torch.allclose(y[1:3].double(), x.view(-1, 128)[1:3].double(), rtol=0.07, atol=1e28)

    # NaN stays NaN in its own element only; inf saturates (to fp32 max where there is a scale).
    x = torch.randn(256)
    x[3], x[130] = float("nan"), float("-inf")
    q, scales = quantize_blocks(x, fmt, 128)
    y = dequantize_blocks(q, scales, fmt, 128)
    assert torch.isnan(y[3]) and torch.isnan(y).sum() == 1
    assert y[130] < 0 and torch.isfinite(y[131:]).all()
    if fmt != "fp16":
        assert y[130] <= -f32max * 0.99


def test_quantize_rejects_bad_arguments():
    with pytest.raises(ValueError, match="format"):
        quantize_blocks(torch.zeros(128), "int4", 128)
    with pytest.raises(ValueError, match="multiple"):
        quantize_blocks(torch.zeros(100), "int8", 128)
    with pytest.raises(ValueError, match="block"):
        quantize_blocks(torch.zeros(128), "int8", 0)


# --- the all-reduce's three steps (one process simulating the ranks) ------------------------------

STEP_SHAPES = [(1,), (127,), (1000,), (4099,), (3, 333), (5, 1031)]


def _edge_inputs(seed: int, world: int, shape, dtype) -> list[torch.Tensor]:
    """_inputs plus, where they fit: NaN on one rank, +inf on one, +inf and -inf that meet (NaN sum),
    an all-zero block, a block of -0.0 (fp8 codes of -0), subnormals, and values whose sum
    overflows fp32 (a saturated scale)."""
    xs = [x.reshape(-1) for x in _inputs(seed, world, shape, dtype)]
    n, big = xs[0].numel(), torch.finfo(dtype).max / 2
    for r, x in enumerate(xs):
        x[n // 2] = float("nan") if r == 0 else x[n // 2]
        if n > 10:
            x[3] = float("inf") if r == world - 1 else x[3]
            x[7] = float("inf") if r == 0 else float("-inf") if r == 1 else x[7]
        if n >= 1000:
            x[128:256], x[256:384] = 0.0, -0.0
            x[384:512] = torch.linspace(-1e-39, 1e-39, 128).to(dtype)
            x[512:640] = big * (torch.arange(128) % 3 - 1)
    return [x.view(shape) for x in xs]


def _old_two_shot(xs: list[torch.Tensor], fmt: str, block: int) -> torch.Tensor:
    """The quantised all-reduce's result as first written (pad, quantize_blocks, cat, contiguous
    slices, dequantize_blocks, torch.sum, requantise, ...), simulated for len(xs) ranks."""
    world, n = len(xs), xs[0].numel()
    chunk = math.ceil(n / (world * block)) * block
    dtype = code_dtype(fmt)

    def pack(q, scales, parts):
        payload = q.view(torch.uint8).view(parts, -1)
        return payload if scales is None else torch.cat([payload, scales.view(torch.uint8).view(parts, -1)], 1)

    def dequantize(packed):
        q = packed[:, :chunk * dtype.itemsize].contiguous().view(dtype)
        scales = packed[:, chunk * dtype.itemsize:].contiguous().view(torch.float32) if fmt != "fp16" else None
        return dequantize_blocks(q, scales, fmt, block)

    sent = [pack(*quantize_blocks(torch.nn.functional.pad(x.reshape(-1), (0, world * chunk - n)), fmt, block), world)
            for x in xs]
    mine = [pack(*quantize_blocks(dequantize(torch.stack([s[r] for s in sent])).view(world, chunk).sum(0), fmt, block), 1)
            for r in range(world)]
    return dequantize(torch.cat(mine))[:n].to(xs[0].dtype).view(xs[0].shape)


def _three_steps(ops, xs: list[torch.Tensor], fmt: str, block: int):
    """QuantizedAllReduce's steps with `ops` (quantize or triton_quantize), all ranks in one process:
    (each rank's send buffer, the gathered buffer, the result)."""
    world = len(xs)
    sent = [ops.quantize_pack(x, fmt, block, world) for x in xs]
    gathered = torch.full_like(sent[0], 0xAB)  # poisoned: every byte must be written
    for r in range(world):
        ops.reduce_requantise(torch.stack([s[r] for s in sent]), fmt, block, gathered[r])
    return sent, gathered, ops.unpack_dequantise(gathered, fmt, block, xs[0].shape, xs[0].dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, except that any NaN equals any NaN (torch and PTX write different NaN bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    ints = {2: torch.int16, 4: torch.int32, 1: torch.int8}[a.element_size()]
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0).view(ints), b.nan_to_num(0.0).view(ints))


def same_packed(a: torch.Tensor, b: torch.Tensor, fmt: str) -> bool:
    """Packed buffers equal byte for byte; for fp16 (float16 codes, no scales) as same_bits on the codes,
    since torch on the CPU and PTX write different fp16 NaN bits."""
    a, b = a.cpu(), b.cpu()
    if fmt == "fp16":
        return same_bits(a.view(torch.float16), b.view(torch.float16))
    return torch.equal(a, b)


def check_steps_match(ops, ref_ops, xs, fmt, block, seed, ref_device=None):
    """ops' three steps give ref_ops' bytes and bits (ref_ops run on ref_device if given)."""
    sent, gathered, out = _three_steps(ops, xs, fmt, block)
    ref_sent, ref_gathered, ref_out = _three_steps(ref_ops, [x.to(ref_device or x.device) for x in xs], fmt, block)
    for r, (a, b) in enumerate(zip(sent, ref_sent)):
        assert same_packed(a, b, fmt), f"seed {seed}: rank {r}'s send buffer differs"
    assert same_packed(gathered, ref_gathered, fmt), f"seed {seed}: gathered buffer differs"
    assert same_bits(out.cpu(), ref_out.cpu()), f"seed {seed}: results differ"


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_three_steps_match_first_version(fmt, dtype, world, seed):
    """quantize_pack / reduce_requantise / unpack_dequantise give the bits of the unfused original."""
    from megatron_ssm.comm import quantize

    for i, shape in enumerate(STEP_SHAPES):
        xs = _edge_inputs(seed + i, world, shape, dtype)
        sent, gathered, out = _three_steps(quantize, xs, fmt, 128)
        chunk = quantize.chunk_values(xs[0].numel(), world, 128)
        assert sent[0].shape == (world, quantize.part_bytes(chunk, fmt, 128)) and chunk % 512 == 0
        assert out.shape == xs[0].shape and out.dtype == dtype
        assert same_bits(out, _old_two_shot(xs, fmt, 128)), f"seed {seed}, shape {shape}"
        # inf saturates before the sum (so +inf and -inf cancel): NaN only where an input is NaN.
        assert torch.equal(out.isnan(), sum(x.isnan().int() for x in xs) > 0), f"seed {seed}: NaN misplaced"
    xs = _edge_inputs(seed, world, (3000,), dtype)
    assert same_bits(_three_steps(quantize, xs, fmt, 32)[2], _old_two_shot(xs, fmt, 32)), f"seed {seed}, block 32"


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_pack_into_a_given_buffer(fmt, seed):
    """quantize_pack(out=...) writes the parts where the caller says (a view of a symmetric buffer)
    and returns that buffer, the bytes of a fresh pack; a buffer of the wrong shape, dtype or device
    is refused by name; part_chunk inverts part_bytes."""
    from megatron_ssm.comm import quantize

    x = _edge_inputs(seed, 1, (3, 1000), torch.bfloat16)[0]
    fresh = quantize.quantize_pack(x, fmt, 128, 3)
    chunk = quantize.chunk_values(x.numel(), 3, 128)
    assert fresh.shape == (3, quantize.part_bytes(chunk, fmt, 128)) and quantize.part_chunk(fresh.shape[1], fmt, 128) == chunk
    buf = torch.full((3, fresh.shape[1]), 0xAB, dtype=torch.uint8)
    got = quantize.quantize_pack(x, fmt, 128, 3, out=buf)
    assert got.data_ptr() == buf.data_ptr() and same_packed(buf, fresh, fmt), seed
    for bad in (torch.zeros(3, fresh.shape[1] + 16, dtype=torch.uint8), torch.zeros(2, fresh.shape[1], dtype=torch.uint8),
                torch.zeros(3, fresh.shape[1], dtype=torch.int8), torch.zeros(3, fresh.shape[1], dtype=torch.uint8, device="meta")):
        with pytest.raises(ValueError, match=rf"out must be \(3, {fresh.shape[1]}\) uint8 on cpu"):
            quantize.quantize_pack(x, fmt, 128, 3, out=bad)
    made = quantize.packed_out(None, 3, 48, "cpu")  # what the kernels pack into when given no buffer
    assert made.shape == (3, 48) and made.dtype == torch.uint8 and made.device.type == "cpu"
    assert quantize.packed_out(buf, 3, fresh.shape[1], "cpu") is buf
    assert quantize.packed_out(None, 2, 16, "meta").device.type == "meta"  # on the device asked for
    per_block = 128 * quantize.code_dtype(fmt).itemsize + (4 if quantize.has_scales(fmt) else 0)
    assert quantize.part_chunk(5 * per_block, fmt, 128) == 5 * 128
    with pytest.raises(ValueError, match=f"{5 * per_block + 1} bytes are not a packed {fmt} part of block 128"):
        quantize.part_chunk(5 * per_block + 1, fmt, 128)


def test_three_steps_reject_mismatched_buffers():
    from megatron_ssm.comm import quantize

    with pytest.raises(ValueError, match="packed"):
        quantize.unpack_dequantise(torch.zeros(2, 100, dtype=torch.uint8), "int8", 128, (10,), torch.float32)
    with pytest.raises(ValueError, match="packed"):
        quantize.reduce_requantise(torch.zeros(2, 132, dtype=torch.float32), "int8", 128, torch.zeros(132))


@pytest.fixture
def interpreted_triton_quantize(monkeypatch):
    """triton_quantize running on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1).

    Triton 3.6's interpreter rounds fp32 -> bf16 toward zero and fp32 -> fp8 half up, and decodes the
    fp8 NaN code as a number, where the GPU rounds half to even: its float converter is replaced by
    torch's, so the kernels' own logic is compared bit for bit (the GPU tests check the real casts)."""
    from interpreter import interpreter_problem

    if problem := interpreter_problem():
        pytest.skip(problem)
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    torch_of = {tl.float32: torch.float32, tl.bfloat16: torch.bfloat16, tl.float16: torch.float16,
                tl.float8e4nv: torch.float8_e4m3fn}
    ints = {8: (np.int8, torch.int8), 16: (np.int16, torch.int16), 32: (np.int32, torch.int32)}
    original = interpreter._convert_float

    def convert(data, src, dst, rounding_mode):
        if src not in torch_of or dst not in torch_of:
            return original(data, src, dst, rounding_mode)
        bits = torch.from_numpy(np.ascontiguousarray(data).view(ints[src.primitive_bitwidth][0]))
        return bits.view(torch_of[src]).to(torch_of[dst]).view(ints[dst.primitive_bitwidth][1]).numpy()

    if not hasattr(interpreter, "_convert_float"):
        pytest.skip("this Triton's interpreter has no _convert_float to replace")
    monkeypatch.setattr(interpreter, "_convert_float", convert)
    from megatron_ssm.comm import triton_quantize

    assert triton_quantize.INTERPRETED
    return triton_quantize


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_three_steps_interpreted(interpreted_triton_quantize, fmt, dtype, seed):
    from megatron_ssm.comm import quantize

    for world, block, shape in [(2, 128, (1,)), (4, 128, (4099,)), (3, 128, (5, 1031)), (4, 32, (3000,))]:
        xs = _edge_inputs(seed, world, shape, dtype)
        check_steps_match(interpreted_triton_quantize, quantize, xs, fmt, block, seed)
    # Non-power-of-two blocks go to the torch functions.
    xs = _edge_inputs(seed, 2, (1000,), dtype)
    check_steps_match(interpreted_triton_quantize, quantize, xs, fmt, 100, seed)


# --- the two-shot over symmetric memory: every rank's buffer in one process -----------------------

def _symmetric_three_steps(ops, xs: list[torch.Tensor], fmt: str, block: int, capacity: int):
    """symmetric.py's steps for every rank in lockstep (where the barriers would be), each rank's
    buffer a poisoned tensor on xs' device whose address is in `peers` as a peer's would be: each
    rank's result."""
    from megatron_ssm.comm import symmetric

    world, device = len(xs), xs[0].device
    local = [torch.full((capacity,), 0xAB, dtype=torch.uint8, device=device) for _ in xs]
    peers = torch.tensor([b.data_ptr() for b in local], dtype=torch.int64, device=device)
    layouts = [symmetric.Layout.of(xs[0].numel(), fmt, block, world, r, capacity) for r in range(world)]
    assert all(lay.fits() for lay in layouts)
    for r in range(world):
        symmetric.pack(ops, xs[r], fmt, block, layouts[r], local[r])
    for r in range(world):
        symmetric.reduce(ops, peers, fmt, block, layouts[r], local[r])
    return [symmetric.gather(ops, peers, fmt, block, layouts[r], local[r], xs[0].shape, xs[0].dtype)
            for r in range(world)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_symmetric_steps_interpreted_give_the_two_shot_bits(interpreted_triton_quantize, fmt, seed):
    """Each rank reads its peers' parts in place (addresses, as over NVLink) and gets the bits of the
    NCCL transport's steps (quantize.py in torch), on every rank; two calls of different sizes
    through the same buffers, the larger after the smaller, as a layer's reductions follow each other."""
    from megatron_ssm.comm import quantize

    for world, shape, dtype in [(2, (4099,), torch.bfloat16), (3, (5, 1031), torch.float32), (8, (2, 700), torch.float16)]:
        xs = _edge_inputs(seed, world, shape, dtype)
        want = _three_steps(quantize, xs, fmt, 128)[2]
        for r, got in enumerate(_symmetric_three_steps(interpreted_triton_quantize, xs, fmt, 128, 1 << 16)):
            assert same_bits(got, want), f"seed {seed}: world {world} {shape}: rank {r} differs from the two-shot"


def test_symmetric_layout_keeps_region_b_apart():
    """Region B sits at a fixed offset past every region A that fits, so no call's parts overwrite
    another call's reduced part; what does not fit is refused (it takes the NCCL transport)."""
    from megatron_ssm.comm.symmetric import Layout

    cap = 1 << 20
    fitting = [Layout.of(n, fmt, 128, world, 0, cap) for n in (1, 4099, 60_000, 120_000) for fmt in FORMATS
               for world in (2, 4, 8)]
    for lay in filter(Layout.fits, fitting):
        assert lay.world * lay.part_bytes <= lay.region_b == cap // 2 and lay.region_b % 16 == 0
        assert lay.region_b + lay.part_bytes <= cap
    # by hand: a part is n / world values rounded up to 512 (4 blocks), 1-byte codes and a 4-byte
    # scale per 128 (int8, fp8) or 2-byte codes (fp16); region A is world parts, in half the buffer
    for n, fmt, world in [(1, "int8", 8), (500_000, "int8", 2), (530_000, "int8", 2), (260_000, "fp16", 2),
                          (262_144, "fp16", 4), (262_145, "fp16", 4), (1_000_000, "fp8", 8)]:
        chunk = -(-n // (world * 512)) * 512
        part = chunk * 2 if fmt == "fp16" else chunk + chunk // 128 * 4
        assert Layout.of(n, fmt, 128, world, 0, cap).fits() == (world * part <= cap // 2), (n, fmt, world)


def test_symmetric_transport_falls_back_to_nccl_off_cuda(ranks, seed):
    """CPU tensors (gloo) take the NCCL transport's path: the same bits as QuantizedAllReduce."""
    got = ranks(2).run(_symmetric_on_cpu, seed)
    assert all(same for same in got), f"seed {seed}: {got}"


def _symmetric_on_cpu(seed: int) -> bool:
    from megatron_ssm.comm.symmetric import SymmetricQuantizedAllReduce

    ctx = _rank()
    x = _inputs(seed, ctx.size, (4099,))[ctx.rank]
    return torch.equal(SymmetricQuantizedAllReduce("int8")(x.clone(), ctx.group),
                       QuantizedAllReduce("int8")(x.clone(), ctx.group))


# --- the two-shot all-reduce ----------------------------------------------------------------------

def _check_two_shot(seed: int, fmt: str, block: int, cases) -> tuple[list[str], list[torch.Tensor]]:
    """On each rank: reduce every (shape, dtype) case and compare with the bound. Returns the
    failures and the outputs (the test checks that all ranks got the same bits)."""
    ctx = _rank()
    allreduce = QuantizedAllReduce(fmt, block)
    failures, outs = [], []
    for i, (shape, dtype) in enumerate(cases):
        xs = _inputs(seed + i, ctx.size, shape, dtype)
        out = allreduce(xs[ctx.rank].clone(), ctx.group)
        ref, tol = _two_shot_reference(xs, fmt, block)
        worst = ((out.double().reshape(-1) - ref).abs() / tol).max().item()
        if out.shape != xs[0].shape or out.dtype != dtype or not worst <= 1:
            failures.append(f"{shape} {dtype}: out {tuple(out.shape)} {out.dtype}, error {worst:.3f}x the bound")
        outs.append(out)
    return failures, outs


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_two_shot_matches_exact_sum(ranks, world, fmt, seed):
    cases = [(shape, dtype) for shape in SHAPES for dtype in DTYPES]
    results = ranks(world).run(_check_two_shot, seed, fmt, 128, cases)
    failures = results[0][0]
    assert not failures, f"seed {seed}, rank 0:\n" + "\n".join(failures)
    for _, outs in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], outs)), f"seed {seed}: ranks disagree"


def test_two_shot_other_block_size(ranks, seed):
    cases = [((5000,), torch.float32), ((7, 31), torch.bfloat16)]
    failures, _ = ranks(4).run(_check_two_shot, seed, "int8", 32, cases)[0]
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)


def _check_edge_values(seed: int, fmt: str) -> dict[str, bool]:
    """Blocks that are zero on every rank, 1e30-scale fp32, and bf16 max with signs that cancel."""
    ctx = _rank()
    allreduce = QuantizedAllReduce(fmt, 128)
    xs = _inputs(seed, ctx.size, (640,))
    bf16max = torch.finfo(torch.bfloat16).max
    for r, x in enumerate(xs):
        x[128:256] = 0
        x[256:384] *= 1e30
        x[384:512] = bf16max * (-1) ** r  # sums to 0 at an even world size
    ok = {}
    for dtype in (torch.float32, torch.bfloat16):
        ins = [x.to(dtype) for x in xs]
        if dtype == torch.bfloat16:
            for x in ins:
                x[256:384] /= 1e30  # bf16 holds 1e30 too, but its sum is tested in fp32 already
        out = allreduce(ins[ctx.rank].clone(), ctx.group).double()
        ref, tol = _two_shot_reference(ins, fmt, 128)
        ok[f"{dtype} finite"] = bool(torch.isfinite(out).all())
        ok[f"{dtype} zero blocks zero"] = bool((out[128:256] == 0).all())
        in_range = slice(None) if fmt != "fp16" else torch.cat([torch.arange(256), torch.arange(512, 640)])
        ok[f"{dtype} within bound"] = bool(((out - ref).abs()[in_range] <= tol[in_range]).all())
    zeros = allreduce(torch.zeros(300), ctx.group)
    ok["all zero"] = bool((zeros == 0).all())
    ok["empty"] = allreduce(torch.zeros(0, 5), ctx.group).shape == (0, 5)
    return ok


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_two_shot_zero_and_huge_blocks(ranks, world, fmt, seed):
    ok = ranks(world).run(_check_edge_values, seed, fmt)[0]
    assert all(ok.values()), f"seed {seed}: {ok}"


def _check_groups(seed: int) -> dict[str, bool]:
    """Subgroups of the world: ranks {0,1} and {2,3}, and groups of one (input returned as is)."""
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    singles = [dist.new_group([r]) for r in range(4)]
    xs = _inputs(seed, 4, (1000,))
    mine = xs[2 * (rank // 2):2 * (rank // 2) + 2]
    out = QuantizedAllReduce("int8")(xs[rank].clone(), pairs[rank // 2])
    ref, tol = _two_shot_reference(mine, "int8", 128)
    x = xs[rank].clone()
    return {
        "pair within bound": bool(((out.double() - ref).abs() <= tol).all()),
        "single quantised is identity": QuantizedAllReduce("fp8")(x, singles[rank]) is x,
        "single exact is identity": ExactAllReduce()(x, singles[rank]) is x,
        "single input untouched": torch.equal(x, xs[rank]),
    }


def test_subgroups_and_world_of_one(ranks, seed):
    for ok in ranks(4).run(_check_groups, seed):
        assert all(ok.values()), f"seed {seed}: {ok}"


# --- exact, auto, make_allreduce ------------------------------------------------------------------

def _sum_bound(xs: list[torch.Tensor]):
    """(exact sum in fp64, rounding bound) of len(xs) inputs summed in their own dtype in any order."""
    flat = [x.double() for x in xs]
    eps = torch.finfo(xs[0].dtype).eps
    return sum(flat), len(xs) * eps * sum(f.abs() for f in flat)


def _check_exact(seed: int) -> list[str]:
    ctx = _rank()
    bad = []
    for dtype, kind in [(d, k) for d in DTYPES for k in ("exact", "oneshot")]:  # oneshot: gloo on CPU
        exact = make_allreduce(kind)
        xs = _inputs(seed, ctx.size, (33, 77), dtype)
        x = xs[ctx.rank]
        ref, bound = _sum_bound(xs)  # independent of the backend: the sum of every rank's input
        expected = x.clone()
        dist.all_reduce(expected, group=ctx.group)
        out = exact(x.clone(), ctx.group)
        if not torch.equal(out, expected):
            bad.append(f"{kind} {dtype}")
        if not ((out.double() - ref).abs() <= bound).all():
            bad.append(f"{kind} {dtype}: not the sum of the ranks' inputs")
        # A transposed (non-contiguous) view goes through a contiguous copy. (Compare with that copy
        # reduced: gloo's ring sums each element in an order that depends on its position.)
        expected = x.t().contiguous()
        dist.all_reduce(expected, group=ctx.group)
        out = exact(x.clone().t(), ctx.group)
        if out.shape != (77, 33) or not torch.equal(out, expected):
            bad.append(f"{kind} {dtype} transposed")
        elif not ((out.t().double() - ref).abs() <= bound).all():
            bad.append(f"{kind} {dtype} transposed: not the sum of the ranks' inputs")
    return bad


@pytest.mark.parametrize("world", WORLDS)
def test_exact_is_bitwise_all_reduce(ranks, world, seed):
    for bad in ranks(world).run(_check_exact, seed):
        assert not bad, f"seed {seed}: differs from dist.all_reduce for {bad}"


def _check_auto(seed: int) -> dict[str, object]:
    ctx = _rank()
    auto = AutoAllReduce(threshold=1024, fmt="fp8")
    x = _inputs(seed, ctx.size, (256,))[ctx.rank]
    out = auto(x.clone(), ctx.group)
    return {
        # float32: 255 values are 1020 bytes, 256 are 1024.
        "picks": [auto.pick(torch.zeros(n, dtype=d)).name
                  for n, d in [(255, torch.float32), (256, torch.float32), (511, torch.bfloat16), (512, torch.bfloat16)]],
        "same as picked": torch.equal(out, auto.quantized(x.clone(), ctx.group)),
        "cpu default": AutoAllReduce().pick(torch.zeros(1 << 20)).name,
        "never": AutoAllReduce(threshold=math.inf).pick(torch.zeros(1 << 20)).name,
        "always": AutoAllReduce(threshold=0).pick(torch.zeros(1)).name,
        "calibrated": calibrate(ctx.group, [4096, 256], iters=2, warmup=1),  # real timings: any answer
    }


# Made-up timings (seconds) per message size: (exact, quantised) on rank 0; rank 1's quantised
# reduction is slower where noted, and calibrate must take the slowest rank's time.
CALIBRATION_CASES = {
    "quantised wins from 4096": ({256: (1, 2), 1024: (1, 2), 4096: (2, 1), 16384: (4, 1)}, {}, 4096),
    "wins everywhere": ({256: (2, 1), 1024: (2, 1)}, {}, 256),
    "never wins": ({256: (1, 2), 1024: (1, 2)}, {}, math.inf),
    "wins at small sizes only": ({256: (2, 1), 1024: (2, 1), 4096: (1, 2)}, {}, math.inf),
    "a loss between wins": ({256: (2, 1), 1024: (1, 2), 4096: (2, 1), 16384: (2, 1)}, {}, 4096),
    "a tie is no win": ({256: (1, 1), 1024: (2, 1)}, {}, 1024),
    "rank 1 slower at 1024": ({256: (1, 2), 1024: (2, 1), 4096: (2, 1)}, {1024: 3}, 4096),
}


def _check_calibrate(case: str) -> float:
    from megatron_ssm.comm import allreduce

    timings, slower_on_rank1, _ = CALIBRATION_CASES[case]
    ctx = _rank()
    original, seen = allreduce._time, []

    def fake_time(op, x, group, iters, warmup):
        size = x.numel() * x.element_size()
        seen.append((size, op.name))
        exact, quantised = timings[size]
        if op.name == "exact":
            return float(exact)
        return float(slower_on_rank1.get(size, quantised) if ctx.rank == 1 else quantised)

    allreduce._time = fake_time
    try:
        out = calibrate(ctx.group, list(reversed(timings)), iters=1, warmup=0)
    finally:
        allreduce._time = original
    assert sorted(seen) == sorted((s, n) for s in timings for n in ("exact", "int8")), seen
    return out


@pytest.mark.parametrize("case", list(CALIBRATION_CASES))
def test_calibrate_picks_the_smallest_size_from_which_quantised_always_wins(ranks, case):
    want = CALIBRATION_CASES[case][2]
    assert ranks(2).run(_check_calibrate, case) == [want, want], case


def test_auto_threshold_chooses(ranks, seed):
    results = ranks(2).run(_check_auto, seed)
    r = results[0]
    # below the threshold: the exact sum, one-shot where it can (CUDA), else NCCL/gloo
    assert r["picks"] == ["oneshot", "fp8", "oneshot", "fp8"]
    assert r["same as picked"]
    assert r["cpu default"] == "oneshot" and r["never"] == "oneshot" and r["always"] == "int8"
    assert r["calibrated"] in (256, 4096, math.inf)
    assert all(x["calibrated"] == r["calibrated"] for x in results), "ranks calibrated differently"


def test_threshold_table_lookup():
    table = {"H100": 8 << 20, "A6000": 1 << 20}
    assert threshold_by_name("NVIDIA H100 80GB HBM3", table) == 8 << 20
    assert threshold_by_name("NVIDIA RTX A6000", table) == 1 << 20
    assert threshold_by_name("NVIDIA GeForce RTX 4090", table) == math.inf
    by_world = {"H100": {4: 1 << 27}}
    assert threshold_by_name("NVIDIA H100 80GB HBM3", by_world, 4) == 1 << 27
    assert threshold_by_name("NVIDIA H100 80GB HBM3", by_world, 2) == math.inf


def test_make_allreduce_kinds():
    assert ALLREDUCE_CHOICES == ("exact", "oneshot", "int8", "fp8", "fp16", "int8-symm", "fp8-symm", "fp16-symm",
                                 "auto")
    for kind in ALLREDUCE_CHOICES:
        assert make_allreduce(kind).name == kind
    assert make_allreduce("fp8-symm").fmt == "fp8" and make_allreduce("int8-symm", capacity=4096).capacity == 4096
    for bad in ("int4-symm", "exact-symm", "-symm"):
        with pytest.raises(ValueError, match="unknown all-reduce kind"):
            make_allreduce(bad)
    assert make_allreduce("int8", block=64).block == 64
    assert make_allreduce("auto", threshold=4096).threshold == 4096
    for bad in ("int4", "EXACT", "", "nccl"):
        with pytest.raises(ValueError, match="exact"):
            make_allreduce(bad)
    with pytest.raises(ValueError, match="block"):
        make_allreduce("int8", block=0)


# --- one-shot and started (async) reductions on CPU ---------------------------------------------------

def _check_oneshot_and_start(seed: int) -> dict[str, object]:
    """Started reductions (start().wait()) against the sum of every rank's inputs: within the
    two-shot bound for int8, within rounding for exact; and equal, bit for bit, to the called ones."""
    from megatron_ssm.comm.oneshot import symmetric_buffer

    ctx = _rank()
    xs = _inputs(seed, ctx.size, (4099,))
    x = xs[ctx.rank]
    q = QuantizedAllReduce("int8")
    started_q = q.start(x.clone(), ctx.group).wait()
    started_exact = ExactAllReduce().start(x.clone(), ctx.group).wait()
    ref_q, tol_q = _two_shot_reference(xs, "int8", 128)
    ref, bound = _sum_bound(xs)
    return {
        # no symmetric memory for CPU tensors: every rank agrees on None (and nobody hangs)
        "buffer": symmetric_buffer(64, torch.float32, torch.device("cpu"), ctx.group),
        "started int8 within bound": bool(((started_q.double() - ref_q).abs() <= tol_q).all()),
        "started exact is the sum": bool(((started_exact.double() - ref).abs() <= bound).all()),
        "started int8 == called": torch.equal(started_q, q(x.clone(), ctx.group)),
        "started exact == called": torch.equal(started_exact, ExactAllReduce()(x.clone(), ctx.group)),
    }


def test_oneshot_setup_agrees_and_started_reductions_equal_called_ones(ranks, seed):
    for r in ranks(2).run(_check_oneshot_and_start, seed):
        assert r == {"buffer": None, "started int8 within bound": True, "started exact is the sum": True,
                     "started int8 == called": True, "started exact == called": True}, seed


def test_oneshot_size_limits():
    from megatron_ssm.comm import OneShotAllReduce

    auto = OneShotAllReduce()
    assert (auto.limit(2), auto.limit(4), auto.limit(8)) == (64 << 10, 512 << 10, 256 << 10)
    assert OneShotAllReduce(max_bytes=1024).limit(4) == 1024
    assert not auto.takes(torch.zeros(8), 2)  # a CPU tensor always goes to the backend


def test_qmax_and_code_dtype_are_each_formats_largest_code():
    """The code range the fused Triton kernels scale onto (read from qmax there): int8's 127 (-128 is
    the NaN code), e4m3's 448, fp16's 65504; an unknown format is refused by name."""
    from megatron_ssm.comm.quantize import qmax

    assert [qmax(f) for f in ("int8", "fp8", "fp16")] == [127.0, 448.0, 65504.0]
    assert [code_dtype(f) for f in ("int8", "fp8", "fp16")] == [torch.int8, torch.float8_e4m3fn, torch.float16]
    for fn in (qmax, code_dtype):
        with pytest.raises(ValueError, match="unknown quantisation format 'int4'"):
            fn("int4")


def _quantize_kernels_for_sm90() -> list[str]:
    """Compile the three quantise kernels, local and peer-reading (int64 addresses cast to pointers),
    for sm_90 without a GPU."""
    from interpreter import compile_for_sm90

    from megatron_ssm.comm import triton_quantize as tq

    def types(codes):
        def of(a):
            if a == "peers_ptr":
                return "*i64"
            if a.endswith("scales_ptr"):
                return "*fp32"
            if a.endswith("codes_ptr") or a == "codes_ptr":
                return codes
            if a in ("x_ptr", "out_ptr"):
                return "*bf16"
            return "i64" if a == "offset" else "i32"
        return of

    done = []
    for fmt, codes in (("int8", "*u8"), ("fp8", "*u8"), ("fp16", "*fp16")):
        meta = tq._packed_meta(fmt, 128)
        done.append(compile_for_sm90(tq._quantize_pack_kernel, types(codes), dict(meta, QMAX=tq._torch.qmax(fmt))))
        for peers in (False, True):
            done.append(compile_for_sm90(tq._reduce_requantise_kernel, types(codes),
                                         dict(meta, QMAX=tq._torch.qmax(fmt), PARTS=4, PEERS=peers)))
            done.append(compile_for_sm90(tq._unpack_dequantise_kernel, types(codes), dict(meta, PEERS=peers)))
    return done


def test_quantize_kernels_compile_for_sm90(tmp_path):
    import os

    from interpreter import run_without_interpreter

    out = run_without_interpreter("import test_comm as t; print('\\n'.join(t._quantize_kernels_for_sm90()))",
                                  tmp_path, os.path.dirname(__file__))
    assert len(out) == 15, out
