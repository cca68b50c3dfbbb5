"""The reference ops against independent naive versions, and any implementation against the reference.

The naive versions (float64, one time step at a time, written from the equations) check the
references; `check_op` then holds any implementation with the reference's signature (our Triton
kernels, mamba-ssm's scan, the dispatch layer) to the reference on the same inputs. The input
builders and `check_op` are shared with tests/test_kernels_gpu.py, which runs them at model sizes.

Inputs are fresh random numbers on every run (the `seed` fixture of conftest.py; the seed is in each failure).
Without CUDA the Triton kernels run here in Triton's CPU interpreter (TRITON_INTERPRET=1, set by
conftest.py; triton is in the `test` extra), on tiny shapes; where the interpreter cannot run
(tests/interpreter.py says why) those tests skip.
"""
from __future__ import annotations

import inspect
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from megatron_ssm import ops as ref_ops
from megatron_ssm.ops import attention as attention_ops
from megatron_ssm.ops import dispatch

OPS = list(ref_ops.__all__)
INPLACE = {"causal_conv1d_update": ("conv_state",), "selective_state_update": ("state",), "ssd_state_update": ("state",),
           "mamba1_decode_step": ("state",), "mamba2_decode_step": ("conv_state", "ssm_state")}
# ‖out - ref‖ / ‖ref‖ allowed per activation dtype: fp32 math on both sides for fp32; one extra
# rounding of intermediates for the 16-bit types.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2, torch.float16: 5e-3}


# ---- input builders: (op, kwargs) at given sizes; shared with the GPU tests ------------------------

def _act(*shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _dt_bias(n, dtype, device):
    # Mamba's initialisation: softplus(dt_bias) spread log-uniformly over [1e-3, 1e-1].
    dt = torch.exp(torch.rand(n, device=device) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return (dt + torch.log(-torch.expm1(-dt))).to(dtype)


def conv_inputs(b, L, C, K, dtype, device, state=True, bias=True, silu=True):
    return "causal_conv1d", dict(
        x=_act(b, L, C, dtype=dtype, device=device), weight=_act(C, K, dtype=dtype, device=device, scale=0.5),
        bias=_act(C, dtype=dtype, device=device) if bias else None,
        initial_state=_act(b, C, K - 1, dtype=dtype, device=device) if state else None, silu=silu)


def conv_update_inputs(b, C, K, dtype, device, bias=True, silu=True):
    return "causal_conv1d_update", dict(
        x=_act(b, C, dtype=dtype, device=device), conv_state=_act(b, C, K - 1, dtype=dtype, device=device),
        weight=_act(C, K, dtype=dtype, device=device, scale=0.5),
        bias=_act(C, dtype=dtype, device=device) if bias else None, silu=silu)


def _mamba1_params(d, n, dtype, device):
    A = -torch.arange(1, n + 1, dtype=torch.float32, device=device).repeat(d, 1)  # Mamba-1's S4D-real init
    A = A * torch.exp(0.1 * torch.randn(d, n, device=device))
    return dict(A=A, D=_act(d, dtype=dtype, device=device), dt_bias=_dt_bias(d, dtype, device))


def scan_inputs(b, L, d, n, dtype, device, state=True, gate=True):
    return "selective_scan", dict(
        u=_act(b, L, d, dtype=dtype, device=device), dt=_act(b, L, d, dtype=dtype, device=device, scale=0.5),
        B=_act(b, L, n, dtype=dtype, device=device), C=_act(b, L, n, dtype=dtype, device=device),
        z=_act(b, L, d, dtype=dtype, device=device) if gate else None,
        initial_state=torch.randn(b, d, n, device=device) if state else None, **_mamba1_params(d, n, dtype, device))


def scan_update_inputs(b, d, n, dtype, device, gate=True):
    return "selective_state_update", dict(
        state=torch.randn(b, d, n, device=device), u=_act(b, d, dtype=dtype, device=device),
        dt=_act(b, d, dtype=dtype, device=device, scale=0.5), B=_act(b, n, dtype=dtype, device=device),
        C=_act(b, n, dtype=dtype, device=device), z=_act(b, d, dtype=dtype, device=device) if gate else None,
        **_mamba1_params(d, n, dtype, device))


def _mamba2_params(h, dtype, device):
    return dict(A=-(1 + 15 * torch.rand(h, device=device)), D=_act(h, dtype=dtype, device=device),
                dt_bias=_dt_bias(h, dtype, device))


def ssd_inputs(b, L, h, p, g, n, chunk_size, dtype, device, state=True, dt_limit=(0.0, float("inf"))):
    return "ssd_chunk_scan", dict(
        x=_act(b, L, h, p, dtype=dtype, device=device), dt=_act(b, L, h, dtype=dtype, device=device, scale=0.5),
        B=_act(b, L, g, n, dtype=dtype, device=device), C=_act(b, L, g, n, dtype=dtype, device=device),
        chunk_size=chunk_size, initial_state=torch.randn(b, h, p, n, device=device) if state else None,
        dt_limit=dt_limit, **_mamba2_params(h, dtype, device))


def ssd_update_inputs(b, h, p, g, n, dtype, device, dt_limit=(0.0, float("inf"))):
    return "ssd_state_update", dict(
        state=torch.randn(b, h, p, n, device=device), x=_act(b, h, p, dtype=dtype, device=device),
        dt=_act(b, h, dtype=dtype, device=device, scale=0.5), B=_act(b, g, n, dtype=dtype, device=device),
        C=_act(b, g, n, dtype=dtype, device=device), dt_limit=dt_limit, **_mamba2_params(h, dtype, device))


def rms_norm_inputs(lead, width, dtype, device, weight=True):
    return "rms_norm", dict(x=_act(*lead, width, dtype=dtype, device=device, scale=3.0),
                            weight=_act(width, dtype=dtype, device=device) if weight else None, eps=1e-5)


def add_norm_inputs(lead, width, dtype, device, residual_dtype=torch.float32, delta=True):
    return "add_rms_norm", dict(
        residual=_act(*lead, width, dtype=residual_dtype, device=device, scale=3.0),
        delta=_act(*lead, width, dtype=dtype, device=device) if delta else None,
        weight=_act(width, dtype=dtype, device=device), eps=1e-5, residual_dtype=residual_dtype)


def gated_norm_inputs(lead, width, group_size, dtype, device):
    return "gated_rms_norm", dict(
        y=_act(*lead, width, dtype=dtype, device=device, scale=3.0), gate=_act(*lead, width, dtype=dtype, device=device),
        weight=_act(width, dtype=dtype, device=device), eps=1e-5, group_size=group_size)


def linear_inputs(lead, n, k, dtype, device, bias=True, scale=None):
    """scale: None, "float" (one factor), "vector" (one per output feature, fp32) or "segments" (the
    model's Factors: runs of equal factor, one of them 1, with the per-feature tensor they make)."""
    kw = dict(x=_act(*lead, k, dtype=dtype, device=device),
              weight=_act(n, k, dtype=dtype, device=device, scale=k ** -0.5),
              bias=_act(n, dtype=dtype, device=device) if bias else None)
    if scale == "float":
        kw["scale"] = 0.5 + torch.rand(()).item()
    elif scale == "vector":
        kw["scale"] = 0.5 + torch.rand(n, device=device)
    elif scale == "segments":
        from megatron_ssm.model.layers import OutputFactors

        cut = sorted(torch.randperm(n - 1)[:2].add(1).tolist())
        widths = (cut[0], cut[1] - cut[0], n - cut[1])
        kw["scale"] = OutputFactors(widths, (0.5 + torch.rand(()).item(), 1.0, 0.5 + torch.rand(()).item()), device).scale
    return "linear", kw


def entry_linear_inputs(lead, n, k, dtype, device, residual_dtype=torch.float32, delta=True, bias=False, scale=None):
    """A block's entry (add_norm_inputs) and the projection that reads it (linear_inputs)."""
    _, norm = add_norm_inputs(lead, k, dtype, device, residual_dtype=residual_dtype, delta=delta)
    _, lin = linear_inputs(lead, n, k, dtype, device, bias=bias, scale=scale)
    return "add_rms_norm_linear", dict(residual=norm["residual"], delta=norm["delta"], norm_weight=norm["weight"],
                                       eps=norm["eps"], residual_dtype=residual_dtype, weight=lin["weight"],
                                       bias=lin["bias"], scale=lin.get("scale"))


def rope_inputs(b, L, heads, d, rotary_dim, dtype, device, theta=10000.0, start=0):
    """x [b, L, heads, d] as a view of a wider projection (as the model's q and k are), positions
    from `start` on per row (rows at different lengths), HF's frequencies."""
    from megatron_ssm.ops.rope import rope_frequencies

    wide = _act(b, L, heads * d + 8, dtype=dtype, device=device)
    x = wide[..., 4:4 + heads * d].view(b, L, heads, d)
    positions = start + torch.arange(L, device=device)[None, :] + 3 * torch.arange(b, device=device)[:, None]
    return "rotary_embedding", dict(x=x, positions=positions, inv_freq=rope_frequencies(theta, rotary_dim, device))


def packed(case, lengths):
    """An op's inputs (built at batch 1, total length sum(lengths), no initial state) as sequences of
    `lengths` packed in one row: cu_seqlens added (ops/varlen.py)."""
    op, kw = case
    assert kw.get("initial_state") is None
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=_device_of(kw))
    return op, dict(kw, cu_seqlens=cu)


def _device_of(kw):
    return next(v.device for v in kw.values() if isinstance(v, torch.Tensor))


# ---- comparing an implementation with the reference -----------------------------------------------

def _clone(kwargs):
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _outputs(op, result, kwargs):
    outs = list(result) if isinstance(result, tuple) else [result]
    outs.extend(kwargs[name] for name in INPLACE.get(op, ()))
    return outs


def _poison(like: list[torch.Tensor]) -> None:
    """Leave NaN in the blocks the caching allocator will hand out next for tensors of these sizes,
    so that an output element the kernel never writes shows up as NaN."""
    junk = [torch.full_like(t, float("nan")) for t in like if t.is_floating_point()]
    del junk


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_op(impl, op, kwargs, tol, seed=None, reference_dtype=None):
    """Run `impl` and the reference on copies of the same inputs; every output (and in-place state)
    must be finite where the reference is, of the same shape and dtype, and within `tol`.
    reference_dtype: the reference runs on the inputs' values cast to it (float64: the exact answer
    for those inputs, where a 16-bit reference's own rounding would be compared instead)."""
    ref_kwargs, impl_kwargs = _clone(kwargs), _clone(kwargs)
    if reference_dtype is not None:
        ref_kwargs = {k: v.to(reference_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                      for k, v in ref_kwargs.items()}
    ref = _outputs(op, getattr(ref_ops, op)(**ref_kwargs), ref_kwargs)
    _poison(ref)
    out = _outputs(op, impl(**impl_kwargs), impl_kwargs)
    errs = []
    for i, (o, r) in enumerate(zip(out, ref)):
        where = f"{op} output {i} (seed {seed})"
        same_dtype = reference_dtype is not None or o.dtype == r.dtype
        assert o.shape == r.shape and same_dtype, f"{where}: {o.shape}/{o.dtype} vs {r.shape}/{r.dtype}"
        assert torch.isfinite(o).eq(torch.isfinite(r)).all(), f"{where}: non-finite values (unwritten?)"
        err = rel_err(o, r)
        assert err < tol, f"{where}: relative error {err:.2e} >= {tol:.0e}"
        errs.append(err)
    return errs


# ---- naive versions, from the equations, float64 ----------------------------------------------------

def naive_conv(x, weight, bias, initial_state, silu):
    b, L, C = x.shape
    K = weight.shape[-1]
    prev = torch.zeros(b, C, K - 1, dtype=torch.float64) if initial_state is None else initial_state.double()
    seq = torch.cat([prev, x.double().transpose(1, 2)], dim=-1)  # [b, C, K-1+L]
    y = torch.zeros(b, C, L, dtype=torch.float64)
    for t in range(L):
        for k in range(K):
            y[:, :, t] += weight.double()[:, k] * seq[:, :, t + k]
    if bias is not None:
        y += bias.double()[:, None]
    if silu:
        y = y * torch.sigmoid(y)
    return y.transpose(1, 2), seq[:, :, L:]


def _softplus64(v):
    return torch.where(v > 20, v, torch.log1p(torch.exp(v)))


def naive_recurrence(x, dt, A, B, C, D, z, state, dt_limit=(0.0, float("inf"))):
    """One channel at a time would be clearer still but slow; this is per time step with every
    quantity broadcast to [b, channels, n]. x, dt, z [b, L, c]; A [c, n]; B, C [b, L, c, n]."""
    b, L, c = x.shape
    h = state.double().clone()
    ys = []
    for t in range(L):
        d = dt[:, t].double().clamp(*dt_limit)
        h = torch.exp(d[..., None] * A.double()) * h + (d * x[:, t].double())[..., None] * B[:, t].double()
        y = (h * C[:, t].double()).sum(-1)
        if D is not None:
            y = y + D.double() * x[:, t].double()
        if z is not None:
            y = y * F.silu(z[:, t].double())
        ys.append(y)
    return (torch.stack(ys, 1) if ys else h.new_zeros(b, 0, c)), h


def naive_mamba1(u, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None):
    b, L, d = u.shape
    n = A.shape[-1]
    dtf = _softplus64(dt.double() + (0 if dt_bias is None else dt_bias.double()))
    state = torch.zeros(b, d, n) if initial_state is None else initial_state
    expand = lambda t: t.double()[:, :, None, :].expand(b, L, d, n)  # noqa: E731
    return naive_recurrence(u, dtf, A, expand(B), expand(C), D, z, state)


def naive_mamba2(x, dt, A, B, C, chunk_size=None, D=None, dt_bias=None, initial_state=None,
                 dt_limit=(0.0, float("inf"))):
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    dtf = _softplus64(dt.double() + (0 if dt_bias is None else dt_bias.double()))  # [b, L, h]
    per_chan = lambda t: t.repeat_interleave(p, dim=-1)  # noqa: E731  head -> its p channels
    heads_bc = lambda t: t.double().repeat_interleave(h // g, dim=2).repeat_interleave(p, dim=2)  # noqa: E731
    state = torch.zeros(b, h, p, n) if initial_state is None else initial_state
    y, hT = naive_recurrence(x.reshape(b, L, h * p), per_chan(dtf), per_chan(A.double())[:, None].expand(h * p, n),
                             heads_bc(B), heads_bc(C), None if D is None else per_chan(D.double()), None,
                             state.reshape(b, h * p, n), dt_limit)
    return y.view(b, L, h, p), hT.view(b, h, p, n)


def naive_norm(x, gate, weight, eps, group_size):
    h = x.double() if gate is None else x.double() * F.silu(gate.double())
    hg = h.unflatten(-1, (-1, group_size))
    hg = hg / torch.sqrt(hg.pow(2).mean(-1, keepdim=True) + eps)
    out = hg.flatten(-2)
    return out if weight is None else out * weight.double()


def _close(out, ref, tol=1e-5):
    return rel_err(out, ref) < tol


# ---- the references against the naive versions -----------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 7, 16])
@pytest.mark.parametrize("state,bias,silu", [(True, True, True), (False, False, False), (True, False, True)])
def test_conv1d_reference(seed, L, state, bias, silu):
    _, kw = conv_inputs(2, L, 6, 4, torch.float64, "cpu", state=state, bias=bias, silu=silu)
    y, fin = ref_ops.causal_conv1d(**kw)
    ny, nfin = naive_conv(**kw)
    assert _close(y, ny) and _close(fin, nfin), seed


def test_conv1d_split_prefill_and_decode(seed):
    _, kw = conv_inputs(2, 13, 5, 4, torch.float64, "cpu")
    y, fin = ref_ops.causal_conv1d(**kw)
    cut = 5  # in two parts, the first's final state seeding the second
    y1, s1 = ref_ops.causal_conv1d(kw["x"][:, :cut], kw["weight"], kw["bias"], kw["initial_state"])
    y2, s2 = ref_ops.causal_conv1d(kw["x"][:, cut:], kw["weight"], kw["bias"], s1)
    assert _close(torch.cat([y1, y2], 1), y, 1e-12) and _close(s2, fin, 1e-12), seed
    # and token by token through the decode step
    state = kw["initial_state"].clone()
    steps = [ref_ops.causal_conv1d_update(kw["x"][:, t], state, kw["weight"], kw["bias"]) for t in range(13)]
    assert _close(torch.stack(steps, 1), y, 1e-12) and _close(state, fin, 1e-12), seed


def test_conv1d_keeps_the_activations_dtype_with_fp32_weights_and_state(seed):
    """bf16 activations with fp32 weights, bias and carried state (a model kept in fp32 serving bf16):
    outputs and the final state come back in bf16, the values within bf16 rounding of the float64
    loop; the same for the decode step, whose fp32 state stays fp32."""
    _, kw = conv_inputs(2, 7, 6, 4, torch.float32, "cpu")
    kw["x"] = kw["x"].bfloat16()
    y, fin = ref_ops.causal_conv1d(**kw)
    ny, nfin = naive_conv(**kw)
    assert (y.dtype, fin.dtype) == (torch.bfloat16, torch.bfloat16)
    assert _close(y, ny, 1e-2) and _close(fin, nfin, 1e-2), seed
    state = kw["initial_state"].clone()
    step = ref_ops.causal_conv1d_update(kw["x"][:, 0], state, kw["weight"], kw["bias"])
    assert step.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert _close(step, ny[:, 0], 1e-2), seed


@pytest.mark.parametrize("limit", [(0.0, float("inf")), (0.01, float("inf")), (0.0, 0.05), (0.01, 0.05)],
                         ids=["none", "lower", "upper", "both"])
def test_discretize_dt_clamps_to_each_bound_set(seed, limit):
    """softplus(dt + dt_bias) in float64, then min(max(., lo), hi) for the bounds that are set; the
    inputs span softplus values from 1e-4 to 10, so every bound bites."""
    from megatron_ssm.ops.selective_scan import discretize_dt

    g = torch.Generator().manual_seed(seed)
    dt = torch.linspace(-9.0, 10.0, 64, dtype=torch.float64)[torch.randperm(64, generator=g)]
    bias = 0.1 * torch.randn(64, generator=g, dtype=torch.float64)
    lo, hi = limit
    want = F.softplus(dt + bias).clamp(min=lo, max=hi)
    got = discretize_dt(dt.float(), bias.float(), limit)
    assert got.dtype == torch.float32 and _close(got, want, 1e-6), seed
    assert bool((got == lo).any()) == (lo > 0) and bool((got == torch.tensor(hi).float()).any()) == (hi < 1), seed


def test_selective_scan_dtypes_empty_and_ungated_packed(seed):
    """bf16 inputs: y in bf16 and the state in fp32 (also from an empty sequence, whose y is
    [b, 0, d] and state zeros); the decode step returns u's dtype; packed sequences without a gate
    (z None) equal each sequence alone."""
    _, kw = scan_inputs(2, 5, 6, 4, torch.bfloat16, "cpu", state=False)
    y, h = ref_ops.selective_scan(**kw)
    ny, nh = naive_mamba1(**kw)
    assert (y.dtype, h.dtype) == (torch.bfloat16, torch.float32) and _close(y, ny, 2e-2), seed
    empty = {k: (v[:, :0] if k in ("u", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    y0, h0 = ref_ops.selective_scan(**dict(empty, D=None, z=None))
    assert y0.shape == (2, 0, 6) and y0.dtype == torch.bfloat16
    assert h0.dtype == torch.float32 and torch.equal(h0, torch.zeros(2, 6, 4))
    _, ukw = scan_update_inputs(2, 6, 4, torch.bfloat16, "cpu")
    assert ref_ops.selective_state_update(**ukw).dtype == torch.bfloat16
    _, pkw = packed(scan_inputs(1, 7, 6, 4, torch.float32, "cpu", state=False, gate=False), (3, 4))
    y, h = ref_ops.selective_scan(**pkw)
    alone = [naive_mamba1(**{k: (v[:, s:e] if k in ("u", "dt", "B", "C") else v) for k, v in pkw.items()
                             if k != "cu_seqlens"}) for s, e in ((0, 3), (3, 7))]
    assert _close(y, torch.cat([a[0] for a in alone], 1)) and _close(h, torch.cat([a[1] for a in alone], 0)), seed


def test_packed_conv1d_without_silu_and_refusing_a_state(seed):
    """Packed sequences pass silu=False on to each sequence (the naive loop, per sequence, without
    the activation), and refuse an initial state like every packed op."""
    _, kw = packed(conv_inputs(1, 9, 6, 4, torch.float64, "cpu", state=False, silu=False), (4, 5))
    y, fin = ref_ops.causal_conv1d(**kw)
    parts = [naive_conv(kw["x"][:, s:e], kw["weight"], kw["bias"], None, False) for s, e in ((0, 4), (4, 9))]
    assert _close(y, torch.cat([p[0] for p in parts], 1)) and _close(fin, torch.cat([p[1] for p in parts], 0)), seed
    with pytest.raises(ValueError, match="zero states"):
        ref_ops.causal_conv1d(**dict(kw, initial_state=torch.zeros(2, 6, 3, dtype=torch.float64)))


@pytest.mark.parametrize("L", [1, 9])
@pytest.mark.parametrize("state,gate", [(True, True), (False, False)])
def test_selective_scan_reference(seed, L, state, gate):
    _, kw = scan_inputs(2, L, 6, 4, torch.float32, "cpu", state=state, gate=gate)
    y, hT = ref_ops.selective_scan(**kw)
    ny, nh = naive_mamba1(**kw)
    assert _close(y, ny) and _close(hT, nh), seed


def test_selective_scan_then_update_equals_longer_scan(seed):
    _, kw = scan_inputs(2, 12, 6, 4, torch.float32, "cpu")
    y, hT = ref_ops.selective_scan(**kw)
    cut = 8
    part = {k: (v[:, :cut] if k in ("u", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    y1, state = ref_ops.selective_scan(**part)
    steps = [ref_ops.selective_state_update(state, kw["u"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t],
                                            kw["C"][:, t], kw["D"], kw["z"][:, t], kw["dt_bias"])
             for t in range(cut, 12)]
    assert _close(torch.cat([y1, torch.stack(steps, 1)], 1), y) and _close(state, hT), seed


@pytest.mark.parametrize("L,chunk", [(1, 4), (5, 4), (16, 4), (23, 8), (23, 16), (40, 16)])
@pytest.mark.parametrize("state", [True, False])
def test_ssd_chunk_scan_reference(seed, L, chunk, state):
    _, kw = ssd_inputs(2, L, 4, 3, 2, 5, chunk, torch.float32, "cpu", state=state)
    y, hT = ref_ops.ssd_chunk_scan(**kw)
    ny, nh = naive_mamba2(**kw)
    assert _close(y, ny) and _close(hT, nh), seed


def test_ssd_dt_limit_reference(seed):
    _, kw = ssd_inputs(1, 11, 2, 3, 1, 4, 4, torch.float32, "cpu", dt_limit=(0.01, 0.05))
    y, hT = ref_ops.ssd_chunk_scan(**kw)
    ny, nh = naive_mamba2(**kw)
    assert _close(y, ny) and _close(hT, nh), seed


def test_ssd_packed_with_dt_limit_and_dtypes(seed):
    """Packed sequences pass dt_limit on to each sequence (the float64 recurrence per sequence, with
    the clamp) and refuse an initial state; the decode step returns x's dtype."""
    lengths = (5, 6)
    _, kw = packed(ssd_inputs(1, 11, 2, 3, 1, 4, 4, torch.float32, "cpu", state=False, dt_limit=(0.01, 0.05)),
                   lengths)
    y, hT = ref_ops.ssd_chunk_scan(**kw)
    alone = [naive_mamba2(**{k: (v[:, s:e] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()
                             if k != "cu_seqlens"}) for s, e in ((0, 5), (5, 11))]
    assert _close(y, torch.cat([a[0] for a in alone], 1)) and _close(hT, torch.cat([a[1] for a in alone], 0)), seed
    with pytest.raises(ValueError, match="zero states"):
        ref_ops.ssd_chunk_scan(**dict(kw, initial_state=torch.zeros(2, 2, 3, 4)))
    _, ukw = ssd_update_inputs(2, 2, 3, 1, 4, torch.bfloat16, "cpu")
    assert ref_ops.ssd_state_update(**ukw).dtype == torch.bfloat16


def test_ssd_chunk_scan_then_update_equals_longer_scan(seed):
    _, kw = ssd_inputs(2, 10, 4, 3, 2, 5, 4, torch.float32, "cpu", dt_limit=(0.0, 0.1))
    y, hT = ref_ops.ssd_chunk_scan(**kw)
    cut = 7
    part = {k: (v[:, :cut] if k in ("x", "dt", "B", "C") else v) for k, v in kw.items()}
    y1, state = ref_ops.ssd_chunk_scan(**part)
    steps = [ref_ops.ssd_state_update(state, kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t],
                                      kw["D"], kw["dt_bias"], kw["dt_limit"]) for t in range(cut, 10)]
    assert _close(torch.cat([y1, torch.stack(steps, 1)], 1), y) and _close(state, hT), seed


PACKED_LENGTHS = [(5,), (3, 1, 9), (4, 0, 6), (1, 1)]


@pytest.mark.parametrize("lengths", PACKED_LENGTHS, ids=str)
def test_packed_references_equal_each_sequence_alone(seed, lengths):
    """Packed sequences (cu_seqlens) each start from zeros and end in their own final state: the
    naive version run on each sequence alone, outputs concatenated and states stacked."""
    T = sum(lengths)
    cases = [(packed(conv_inputs(1, T, 6, 4, torch.float64, "cpu", state=False), lengths), naive_conv, ("x",)),
             (packed(scan_inputs(1, T, 6, 4, torch.float32, "cpu", state=False), lengths), naive_mamba1,
              ("u", "dt", "B", "C", "z")),
             (packed(ssd_inputs(1, T, 4, 3, 2, 5, 4, torch.float32, "cpu", state=False), lengths), naive_mamba2,
              ("x", "dt", "B", "C"))]
    for (op, kw), naive, timed in cases:
        y, final = getattr(ref_ops, op)(**kw)
        alone = dict(kw)
        del alone["cu_seqlens"]
        ys, finals = [], []
        for s, e in zip(kw["cu_seqlens"][:-1].tolist(), kw["cu_seqlens"][1:].tolist()):
            ny, nf = naive(**{k: (v[:, s:e] if k in timed and v is not None else v) for k, v in alone.items()})
            ys.append(ny)
            finals.append(nf)
        assert y.shape[1] == T and final.shape[0] == len(lengths), f"{op} (seed {seed})"
        assert _close(y, torch.cat(ys, 1)) and _close(final, torch.cat(finals, 0)), f"{op} (seed {seed})"


def test_packed_refuses_initial_state_and_batches():
    op, kw = packed(scan_inputs(1, 4, 3, 2, torch.float32, "cpu", state=False), [2, 2])
    with pytest.raises(ValueError, match="^packed sequences start from zero states: initial_state must be None "
                                         "with cu_seqlens$"):
        ref_ops.selective_scan(**dict(kw, initial_state=torch.zeros(2, 3, 2)))
    _, kw2 = conv_inputs(2, 4, 3, 4, torch.float32, "cpu", state=False)
    with pytest.raises(ValueError, match=r"^packed sequences \(cu_seqlens\) come as one row of tokens, got batch 2$"):
        ref_ops.causal_conv1d(**kw2, cu_seqlens=kw["cu_seqlens"])


@pytest.mark.parametrize("groups", [1, 4])
def test_gated_rms_norm_reference(seed, groups):
    _, kw = gated_norm_inputs((2, 3), 16, 16 // groups, torch.float64, "cpu")
    out = ref_ops.gated_rms_norm(**kw)
    assert _close(out, naive_norm(kw["y"], kw["gate"], kw["weight"], kw["eps"], kw["group_size"]), 1e-6), seed


@pytest.mark.parametrize("n_shards", [2, 4])
def test_gated_rms_norm_group_split_across_ranks(seed, n_shards):
    """One norm group over `n_shards` shards, as when n_groups < tp: each shard's norm, with a
    callback adding the other shards' sums of squares (float64, from the inputs) to the local one
    it is given ([..., 1]), equals the float64 norm of the whole group."""
    _, kw = gated_norm_inputs((3, 2), 24, 24, torch.float64, "cpu")
    want = naive_norm(kw["y"], kw["gate"], kw["weight"], kw["eps"], kw["group_size"])
    shards = [dict(kw, y=y, gate=g, weight=w) for y, g, w in
              zip(kw["y"].chunk(n_shards, -1), kw["gate"].chunk(n_shards, -1), kw["weight"].chunk(n_shards))]
    ss = [(s["y"] * F.silu(s["gate"])).pow(2).sum(-1, keepdim=True) for s in shards]

    def reduce_for(i):
        def reduce(local):
            assert local.shape == ss[i].shape
            return local + sum(x for j, x in enumerate(ss) if j != i)
        return reduce

    parts = [ref_ops.gated_rms_norm(**s, reduce_sum_of_squares=reduce_for(i)) for i, s in enumerate(shards)]
    assert _close(torch.cat(parts, -1), want, 1e-6), seed


def test_norms_return_the_dtypes_they_promise(seed):
    """rms_norm casts back to the input's dtype before the weight (HF's MambaRMSNorm: a bf16 weight
    on bf16 input gives bf16); gated_rms_norm returns y's dtype; add_rms_norm's stream is in
    residual_dtype whatever the residual and delta come in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 16, generator=g).bfloat16()
    w = (1 + 0.3 * torch.randn(16, generator=g)).bfloat16()
    xf = x.float()
    hf = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert torch.equal(ref_ops.rms_norm(x, w, 1e-5), hf), seed
    gate = torch.randn(3, 16, generator=g).bfloat16()
    out = ref_ops.gated_rms_norm(x, gate, w.float(), 1e-5, 8, reduce_sum_of_squares=lambda local: local * 2)
    assert out.dtype == torch.float32 and ref_ops.gated_rms_norm(x, gate, w, 1e-5, 8).dtype == torch.bfloat16
    for res_dtype, stream in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        residual = torch.randn(3, 16, generator=g).to(res_dtype)
        delta = torch.randn(3, 16, generator=g).to(res_dtype)
        _, h = ref_ops.add_rms_norm(residual, delta, w, 1e-5, stream)
        assert h.dtype == stream and torch.equal(h, (residual.to(stream) + delta).to(stream)), seed
        _, h0 = ref_ops.add_rms_norm(residual, None, w, 1e-5, stream)
        assert h0.dtype == stream and torch.equal(h0, residual.to(stream)), seed


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16], ids=["fp32-stream", "bf16-stream"])
def test_add_rms_norm_reference(seed, residual_dtype):
    """The fused entry equals the block it replaces: (residual + delta) kept in the stream's dtype,
    normalised from a copy in the weight's dtype."""
    _, kw = add_norm_inputs((2, 3), 16, torch.bfloat16, "cpu", residual_dtype=residual_dtype)
    normed, h = ref_ops.add_rms_norm(**kw)
    want_h = (kw["residual"] + kw["delta"]).to(residual_dtype)
    assert torch.equal(h, want_h), seed
    assert torch.equal(normed, ref_ops.rms_norm(want_h.to(torch.bfloat16), kw["weight"], kw["eps"])), seed
    first, h0 = ref_ops.add_rms_norm(**{**kw, "delta": None})
    assert torch.equal(h0, kw["residual"]) and torch.equal(first, ref_ops.rms_norm(
        kw["residual"].to(torch.bfloat16), kw["weight"], kw["eps"])), seed


@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_reference(seed, weight):
    _, kw = rms_norm_inputs((2, 3), 10, torch.float64, "cpu", weight=weight)
    assert _close(ref_ops.rms_norm(**kw), naive_norm(kw["x"], None, kw["weight"], kw["eps"], 10), 1e-6), seed


# ---- the dispatch layer ---------------------------------------------------------------------------

@pytest.mark.parametrize("op", OPS)
def test_dispatch_has_reference_signatures(op):
    def names_and_defaults(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]
    assert names_and_defaults(getattr(dispatch, op)) == names_and_defaults(getattr(ref_ops, op))


def test_dispatch_forwards_every_argument_in_order(seed):
    """Each public wrapper passes its arguments positionally to the implementation: on CPU that is the
    reference, so a wrapper that drops or swaps an argument (D and z, bias and state) gives other
    numbers than the reference called by keyword."""
    for op, kw in [conv_inputs(2, 5, 6, 4, torch.float32, "cpu"), conv_update_inputs(2, 6, 4, torch.float32, "cpu"),
                   scan_inputs(1, 5, 4, 3, torch.float32, "cpu"), scan_update_inputs(2, 4, 3, torch.float32, "cpu"),
                   ssd_inputs(1, 6, 2, 3, 1, 4, 4, torch.float32, "cpu", dt_limit=(0.0, 0.1)),
                   ssd_update_inputs(2, 2, 3, 1, 4, torch.float32, "cpu", dt_limit=(0.0, 0.1)),
                   rms_norm_inputs((2,), 8, torch.float32, "cpu"), gated_norm_inputs((2,), 8, 4, torch.float32, "cpu"),
                   add_norm_inputs((2,), 8, torch.float32, "cpu"), linear_inputs((2, 3), 5, 7, torch.float32, "cpu"),
                   rope_inputs(2, 3, 2, 8, 4, torch.float32, "cpu"),
                   decode_attention_inputs(3, 6, 4, 2, 8, torch.float32, "cpu", [0, 2, 9], scale=0.4),
                   # every trailing argument away from its default: silu off, packed rows, both dt bounds
                   # biting, a bf16 stream, a sum-of-squares callback
                   conv_inputs(2, 5, 6, 4, torch.float32, "cpu", silu=False),
                   conv_update_inputs(2, 6, 4, torch.float32, "cpu", silu=False),
                   packed(conv_inputs(1, 7, 6, 4, torch.float32, "cpu", state=False), (3, 4)),
                   packed(scan_inputs(1, 7, 4, 3, torch.float32, "cpu", state=False), (3, 4)),
                   packed(ssd_inputs(1, 7, 2, 3, 1, 4, 4, torch.float32, "cpu", state=False), (3, 4)),
                   ssd_update_inputs(2, 2, 3, 1, 4, torch.float32, "cpu", dt_limit=(0.02, 0.05)),
                   add_norm_inputs((2,), 8, torch.float32, "cpu", residual_dtype=torch.bfloat16),
                   ("gated_rms_norm", dict(gated_norm_inputs((2,), 8, 8, torch.float32, "cpu")[1],
                                           reduce_sum_of_squares=lambda local: 3 * local))]:
        check_op(getattr(dispatch, op), op, kw, tol=1e-12, seed=seed)


class _CudaLike:
    """Stands in for a CUDA tensor: `backend` looks only at `is_cuda` (and, for linear, the shape;
    for packed attention, the dtype)."""

    is_cuda = True
    dtype = torch.bfloat16
    device = torch.device("meta")  # what flash_works is asked about (tests replace it)

    def __init__(self, *shape):
        self.shape = shape or (1, 8)


@pytest.fixture
def fake_kernels(monkeypatch):
    """dispatch with stand-ins for our Triton package and mamba-ssm's scan, as on a GPU machine."""
    import types

    kernels = types.SimpleNamespace(**{op: (lambda *a, _op=op: ("triton", _op, a)) for op in OPS})
    calls = []
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: kernels)
    # mamba-ssm's forward returns (y, y before z, dt, dA_cumsum, chunk states, final state[, per-sequence states])
    monkeypatch.setattr(dispatch, "_mamba_chunk_scan_combined", lambda: lambda *a, **k: calls.append((a, k)) or (
        ("y", "out_x", "dt", "dA", "states", "final") + ((torch.ones(2),) if k.get("cu_seqlens") is not None else ())))
    monkeypatch.delenv(dispatch.ENV, raising=False)
    return kernels, calls


def test_dispatch_routes_cuda_to_kernels_unless_forced_to_torch(monkeypatch, fake_kernels):
    kernels, _ = fake_kernels
    cuda = _CudaLike()
    monkeypatch.setattr(attention_ops, "flash_works", lambda device: True)  # torch's own kernel, probed
    for op in OPS:
        want = {"ssd_chunk_scan": "mamba_ssm", "packed_causal_attention": "flash"}.get(op, "triton")
        assert dispatch.backend(op, cuda) == want, op
        assert dispatch.backend(op, torch.zeros(1)) == "torch", op
    assert dispatch.implementation("rms_norm", cuda) is kernels.rms_norm
    assert dispatch.implementation("ssd_chunk_scan", cuda) is dispatch._mamba_ssd_chunk_scan
    for forced in ("torch", "TORCH", "Torch"):  # read at every call
        monkeypatch.setenv(dispatch.ENV, forced)
        for op in OPS:
            assert dispatch.backend(op, cuda) == "torch", (forced, op)
            assert dispatch.implementation(op, cuda) is getattr(ref_ops, op), (forced, op)
    monkeypatch.setenv(dispatch.ENV, "")
    assert dispatch.backend("selective_scan", cuda) == "triton"


def test_dispatch_takes_the_gemv_kernel_only_for_decode_sized_inputs(monkeypatch, fake_kernels):
    """Few rows (batch x tokens <= GEMV_MAX_ROWS) on CUDA: the kernel; more rows, CPU, or either
    switch set: F.linear (cuBLAS keeps batched and prefill GEMMs)."""
    kernels, _ = fake_kernels
    top = dispatch.GEMV_MAX_ROWS
    for shape in [(1, 64), (1, 1, 64), (top, 64), (2, top // 2, 64), (3, 1, 64)]:
        assert dispatch.backend("linear", _CudaLike(*shape)) == "triton", shape
        assert dispatch.implementation("linear", _CudaLike(*shape)) is kernels.linear, shape
    for shape in [(top + 1, 64), (1, top + 1, 64), (2, top, 64), (512, 64)]:
        assert dispatch.backend("linear", _CudaLike(*shape)) == "torch", shape
        assert dispatch.implementation("linear", _CudaLike(*shape)) is ref_ops.linear, shape
    assert dispatch.backend("linear", torch.zeros(1, 64)) == "torch"
    monkeypatch.setenv(dispatch.LINEAR_ENV, "triton")  # the interpreter's way in: CPU too, still few rows
    assert dispatch.backend("linear", torch.zeros(top, 64)) == "triton"
    assert dispatch.backend("linear", torch.zeros(top + 1, 64)) == "torch"
    assert dispatch.backend("rms_norm", torch.zeros(1, 64)) == "torch"
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.backend("linear", torch.zeros(1, 64)) == "torch"
    monkeypatch.delenv(dispatch.ENV)
    monkeypatch.delenv(dispatch.LINEAR_ENV)
    for env in (dispatch.LINEAR_ENV, dispatch.ENV):
        monkeypatch.setenv(env, "torch")
        assert dispatch.backend("linear", _CudaLike(1, 64)) == "torch", env
        assert dispatch.backend("rms_norm", _CudaLike()) == ("torch" if env == dispatch.ENV else "triton"), env
        monkeypatch.delenv(env)


def test_dispatch_runs_a_blocks_entry_in_one_kernel_only_up_to_entry_rows(monkeypatch, fake_kernels):
    """add_rms_norm_linear: up to MEGATRON_SSM_ENTRY_ROWS rows its own kernel; above, and by default
    (0: slower on the H200), the two ops it is made of, each dispatched as it would be alone."""
    calls = []
    monkeypatch.setattr(dispatch, "add_rms_norm", lambda *a: calls.append("add_rms_norm") or ("normed", "stream"))
    monkeypatch.setattr(dispatch, "linear", lambda x, *a: calls.append(("linear", x)) or "y")
    rest = (None, torch.ones(4), 1e-5, torch.float32, torch.ones(3, 4))
    monkeypatch.delenv(dispatch.ENTRY_ROWS_ENV, raising=False)
    assert dispatch.entry_rows() == 0
    assert dispatch.add_rms_norm_linear(_CudaLike(1, 4), *rest) == ("y", "stream")
    assert calls == ["add_rms_norm", ("linear", "normed")]
    monkeypatch.setenv(dispatch.ENTRY_ROWS_ENV, "4")
    for rows in (1, 4):
        assert dispatch.add_rms_norm_linear(_CudaLike(rows, 4), *rest)[:2] == ("triton", "add_rms_norm_linear"), rows
    assert len(calls) == 2
    assert dispatch.add_rms_norm_linear(_CudaLike(5, 4), *rest) == ("y", "stream") and len(calls) == 4
    monkeypatch.setenv(dispatch.ENV, "torch")  # forced to the references: the reference op, on CPU tensors
    stream, w = torch.randn(1, 4), torch.randn(3, 4)
    y, h = dispatch.add_rms_norm_linear(stream, None, torch.ones(4), 1e-5, torch.float32, w)
    assert torch.equal(h, stream) and torch.equal(y, F.linear(ref_ops.rms_norm(stream, torch.ones(4), 1e-5), w))


def test_layers_project_through_dispatch_only_without_a_backward(monkeypatch, seed):
    """The parallel linears' forward goes to the dispatch layer's linear, except while a backward may
    run through it (the kernel has none): then F.linear, whose result carries a grad_fn."""
    from megatron_ssm.model import layers

    calls = []
    monkeypatch.setattr(layers, "linear", lambda x, w, b=None, s=None, r=None: calls.append(x.shape)
                        or ref_ops.linear(x, w, b, s, r))
    x, w, b = torch.randn(2, 5), torch.randn(3, 5), torch.randn(3)
    ref = F.linear(x, w, b)
    assert torch.equal(layers.project(x, w, b), ref) and calls == [(2, 5)], seed
    with torch.no_grad():
        assert torch.equal(layers.project(x, w.requires_grad_(), b), ref) and len(calls) == 2, seed
    assert layers.project(x, w, b).grad_fn is not None and len(calls) == 2
    assert layers.project(x.requires_grad_(), w.detach(), b).grad_fn is not None and len(calls) == 2
    # an output scale goes through both paths, after the bias
    s = torch.rand(3) + 0.5
    with torch.no_grad():
        assert torch.equal(layers.project(x, w, b, s), ref * s) and len(calls) == 3, seed
    assert torch.equal(layers.project(x, w, b, 2.0), ref * 2.0) and len(calls) == 3, seed
    # a factor per row of x, before the bias, through both paths
    r = torch.rand(2) + 0.5
    want = F.linear(x, w) * r[:, None] + b
    assert torch.allclose(layers.project(x, w, b, row_scale=r), want) and len(calls) == 3, seed
    with torch.no_grad():
        assert torch.allclose(layers.project(x, w, b, row_scale=r), want) and len(calls) == 4, seed


def test_linear_switched_to_triton_without_triton_stays_torch(monkeypatch):
    """MEGATRON_SSM_LINEAR=triton (the interpreter's way in) where triton is not installed: the
    reference, not a backend that is not there."""
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: None)
    monkeypatch.setenv(dispatch.LINEAR_ENV, "triton")
    assert dispatch.backend("linear", torch.zeros(1, 64)) == "torch"
    assert dispatch.implementation("linear", torch.zeros(1, 64)) is ref_ops.linear


def test_dispatch_without_triton_or_mamba_ssm_falls_back_to_torch(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: None)
    monkeypatch.setattr(dispatch, "_mamba_chunk_scan_combined", lambda: None)
    monkeypatch.delenv(dispatch.ENV, raising=False)
    assert all(dispatch.backend(op, _CudaLike()) == "torch" for op in OPS if op != "packed_causal_attention")


def test_mamba_ssm_scan_gets_our_arguments_under_its_names(fake_kernels):
    _, calls = fake_kernels
    x, dt, A, B, C, D, bias, h0 = (object() for _ in range(8))
    assert dispatch._mamba_ssd_chunk_scan(x, dt, A, B, C, 64, D, bias, h0, (0.0, 0.5)) == ("y", "final")
    (args, kwargs), = calls
    assert args == (x, dt, A, B, C, 64)
    assert kwargs == dict(D=D, dt_bias=bias, initial_states=h0, seq_idx=None, cu_seqlens=None, dt_softplus=True,
                          dt_limit=(0.0, 0.5))
    # packed: the sequence index of every token beside cu_seqlens, the per-sequence states back (fp32)
    calls.clear()
    xp, cu = torch.zeros(1, 5, 2, 3), torch.tensor([0, 2, 5], dtype=torch.int32)
    y, final = dispatch._mamba_ssd_chunk_scan(xp, dt, A, B, C, 64, D, bias, None, (0.0, 0.5), cu)
    (args, kwargs), = calls
    assert y == "y" and final.dtype == torch.float32 and kwargs["cu_seqlens"] is cu
    assert kwargs["seq_idx"].tolist() == [[0, 0, 1, 1, 1]] and kwargs["seq_idx"].dtype == torch.int32


# ---- the Triton kernels under the CPU interpreter ----------------------------------------------------

def _interpreted_kernels():
    from interpreter import interpreter_problem

    if problem := interpreter_problem():
        pytest.skip(problem)
    from megatron_ssm.ops import triton as kernels
    return kernels


def packed_attention_inputs(lengths, heads, kv_heads, d, dtype, device, scale=None):
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=device)
    T = sum(lengths)
    return "packed_causal_attention", dict(q=_act(T, heads, d, dtype=dtype, device=device),
                                           k=_act(T, kv_heads, d, dtype=dtype, device=device),
                                           v=_act(T, kv_heads, d, dtype=dtype, device=device), cu_seqlens=cu, scale=scale)


@pytest.mark.parametrize("lengths,heads,kv_heads,scale", [((5, 1, 9), 4, 2, None), ((3, 3), 2, 2, 0.3),
                                                          ((12,), 6, 1, None)], ids=["gqa", "scaled", "one-mqa"])
def test_packed_causal_attention_is_each_sequence_alone(seed, lengths, heads, kv_heads, scale):
    """The reference: each packed sequence's causal attention on its own (SDPA per sequence, keys and
    values repeated per query head), grouped-query and a custom scale included."""
    _, kw = packed_attention_inputs(lengths, heads, kv_heads, 8, torch.float64, "cpu", scale)
    out = ref_ops.packed_causal_attention(**kw)
    want, start = [], 0
    for n in lengths:
        q, k, v = (kw[x][start:start + n].transpose(0, 1) for x in "qkv")
        k, v = (t.repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
        want.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale).transpose(0, 1))
        start += n
    assert out.shape == (sum(lengths), heads, 8) and _close(out, torch.cat(want), 1e-10), seed


def test_packed_attention_takes_torch_flash_only_for_16_bit_cuda(monkeypatch):
    """On CUDA in fp16/bf16, where torch's flash varlen kernel passed its probe on that device: torch's
    kernel; in fp32, on CPU, where the probe failed, or forced to the references: the masked reference."""
    class Cuda(_CudaLike):
        def __init__(self, dtype):
            super().__init__()
            self.dtype = dtype

    asked = []
    monkeypatch.setattr(attention_ops, "flash_works", lambda device: asked.append(device) or True)
    assert dispatch.backend("packed_causal_attention", Cuda(torch.bfloat16)) == "flash"
    assert dispatch.backend("packed_causal_attention", Cuda(torch.float16)) == "flash"
    assert asked == [torch.device("meta")] * 2
    assert dispatch.backend("packed_causal_attention", Cuda(torch.float32)) == "torch"
    assert dispatch.backend("packed_causal_attention", torch.zeros(2, dtype=torch.bfloat16)) == "torch"
    assert dispatch.implementation("packed_causal_attention", Cuda(torch.bfloat16)) is \
        attention_ops.packed_causal_attention_flash
    monkeypatch.setenv(dispatch.ENV, "torch")
    assert dispatch.backend("packed_causal_attention", Cuda(torch.bfloat16)) == "torch"
    monkeypatch.delenv(dispatch.ENV)
    monkeypatch.setattr(attention_ops, "flash_works", lambda device: False)
    assert dispatch.backend("packed_causal_attention", Cuda(torch.bfloat16)) == "torch"


def test_flash_probe_keeps_the_reference_unless_the_kernel_runs_and_agrees(monkeypatch, caplog):
    """flash_works, with stand-ins for torch's kernel on the CPU: one that agrees (the reference itself)
    passes; one that is wrong, one that raises and a torch without it do not, with a warning naming
    why; each answer is kept per device (no second probe)."""
    cpu = torch.device("cpu")
    calls = []

    def agrees(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        calls.append((max_q, max_k, window_size))
        return attention_ops.packed_causal_attention(q, k, v, cu_q, scale)

    def wrong(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return torch.zeros_like(q)

    def raises(*a, **kw):
        raise RuntimeError("no kernel image for this device")

    for kernel, want, says in [(agrees, True, None), (wrong, False, "disagrees"), (raises, False, "no kernel image")]:
        monkeypatch.setattr(attention_ops, "_FLASH_WORKS", {})
        monkeypatch.setattr(attention_ops, "flash_varlen", lambda k=kernel: k)
        caplog.clear()
        with caplog.at_level("WARNING", logger=attention_ops.__name__):
            assert attention_ops.flash_works(cpu) is want, kernel.__name__
            assert attention_ops.flash_works(cpu) is want  # kept
        assert (says is None) == (not caplog.records) and (says is None or says in caplog.text), caplog.text
    assert calls == [(24, 24, (-1, 0))]  # causal, bounded by the pack's length; probed once
    monkeypatch.setattr(attention_ops, "_FLASH_WORKS", {})
    monkeypatch.setattr(attention_ops, "flash_varlen", lambda: None)
    assert attention_ops.flash_works(cpu) is False and attention_ops._FLASH_WORKS == {}


def _compile_for_sm90() -> list[str]:
    """The prefill conv with and without a state (only its first tile reads the state), and decode
    attention's two kernels as a graphed step launches them (PDL), compiled for sm_90."""
    from interpreter import compile_for_sm90

    from megatron_ssm.ops.triton import attention, conv1d

    def attention_types(a):
        if a.endswith("_ptr"):
            return {"pos_ptr": "*i64", "acc_ptr": "*fp32", "ml_ptr": "*fp32"}.get(a, "*bf16")
        return "fp32" if a == "scale_log2e" else "i32"

    decode = [compile_for_sm90(attention._split_kernel, attention_types, dict(
                  G=4, D=128, BLOCK_G=16, BLOCK_D=128, BLOCK_S=64, UPCAST=False, IEEE=False, PDL=True)),
              compile_for_sm90(attention._merge_kernel, attention_types, dict(
                  G=4, D=128, BLOCK_G=16, BLOCK_D=128, BLOCK_SPLITS=8, PDL=True))]

    def conv_types(a):
        return "*bf16" if a.endswith("_ptr") and a not in ("seq_ptr", "cu_ptr") else "*i32" if a.endswith("_ptr") else "i32"

    return [compile_for_sm90(conv1d._conv_fwd_kernel, conv_types, dict(
        K=4, HAS_BIAS=True, HAS_INIT=init, SILU=True, PACKED=not init, BLOCK_L=64, BLOCK_C=128, FAST_DIV=True))
        for init in (True, False)] + decode


def test_conv_and_decode_attention_compile_for_sm90(tmp_path):
    from interpreter import run_without_interpreter

    out = run_without_interpreter("import test_ops as t; print('\\n'.join(t._compile_for_sm90()))",
                                  tmp_path, os.path.dirname(__file__))
    assert len(out) == 4, out


def _gemv_compile_for_sm90() -> list[str]:
    """The skinny GEMM's split-K launches as decode captures them (PDL, tl.dot over padded rows),
    reducing one row and sixteen, plain and as a block's entry (an fp32 stream), with and without
    the weights' L2 hints before the wait (which must reach the PTX), compiled for sm_90:
    the partials' 3-D tile is a shape the interpreter runs whatever Triton's compiler would make of it."""
    from interpreter import compile_for_sm90

    from megatron_ssm.ops.triton import gemv

    def types(entry):
        fp32 = {"part_ptr", "s_ptr", "r_ptr", "e_res_ptr", "e_h_ptr", "e_sq_ptr"} | ({"x_ptr", "h_ptr"} if entry else set())
        return lambda a: ("*fp32" if a in fp32 else "*i32" if a == "lock_ptr" else "*bf16") if a.endswith("_ptr") \
            else "fp32" if a in ("alpha", "eps", "rs_width", "rs_eps") else "i32"

    out = []
    # the last two: a block's entry in the epilogue (EXIT, split K and not), 1/rms from parts (ROW_SCALE 2)
    for rows, splits, entry, lines, exit, row_scale, split in (
            (1, 16, False, 0, False, 0, True), (16, 8, False, 8, False, 1, True), (1, 16, True, 4, False, 0, True),
            (1, 16, False, 4, True, 2, True), (16, 1, False, 0, True, 2, False)):
        out.append(compile_for_sm90(gemv._gemv_kernel, types(entry), dict(
            EXIT=exit, BLOCK_T=64 if row_scale == 2 else 1, ROW_SCALE=row_scale,
            NORM=entry, HAS_DELTA=entry, NORM_ROWS=rows, NORM_BLOCK=4096, HAS_BIAS=False, SCALE=0, SPLIT=split,
            USE_DOT=True, IEEE=False, UPCAST=False, EVEN_K=True, PDL=True, PREFETCH_LINES=lines, LINE=64,
            BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, RED_ROWS=rows, RED_SPLITS=splits),
            ptx_has="prefetch.global.L2" if lines else ""))
    return out


def test_gemv_compiles_for_sm90(tmp_path):
    from interpreter import run_without_interpreter

    out = run_without_interpreter("import test_ops as t; print('\\n'.join(t._gemv_compile_for_sm90()))",
                                  tmp_path, os.path.dirname(__file__))
    assert len(out) == 5, out


def _tiny_cases(dtype):
    return [
        conv_inputs(2, 37, 70, 4, dtype, "cpu"), conv_inputs(1, 2, 5, 4, dtype, "cpu", bias=False),
        conv_inputs(1, 150, 20, 4, dtype, "cpu"),  # tiles past the first, which do not read the state
        conv_inputs(2, 3, 9, 3, dtype, "cpu", state=False, silu=False),
        conv_update_inputs(2, 300, 4, dtype, "cpu"), conv_update_inputs(1, 5, 3, dtype, "cpu", bias=False, silu=False),
        scan_inputs(1, 19, 10, 16, dtype, "cpu"), scan_inputs(1, 3, 5, 3, dtype, "cpu", state=False, gate=False),
        scan_update_inputs(2, 12, 16, dtype, "cpu"), scan_update_inputs(1, 5, 3, dtype, "cpu", gate=False),
        ssd_inputs(1, 19, 4, 4, 2, 16, 8, dtype, "cpu"), ssd_inputs(1, 5, 3, 4, 1, 6, 4, dtype, "cpu", state=False,
                                                                   dt_limit=(0.01, 0.05)),
        ssd_inputs(1, 3, 2, 4, 1, 128, 4, dtype, "cpu"),  # n = 128: the one-step-at-a-time configuration
        ssd_update_inputs(2, 4, 8, 2, 16, dtype, "cpu"), ssd_update_inputs(1, 3, 4, 1, 6, dtype, "cpu", dt_limit=(0.0, 0.05)),
        rms_norm_inputs((2, 3), 40, dtype, "cpu"), rms_norm_inputs((3,), 7, dtype, "cpu", weight=False),
        gated_norm_inputs((2, 3), 48, 12, dtype, "cpu"), gated_norm_inputs((4,), 10, 10, dtype, "cpu"),
        add_norm_inputs((2, 3), 40, dtype, "cpu"), add_norm_inputs((3,), 7, dtype, "cpu", residual_dtype=dtype),
        add_norm_inputs((2,), 24, dtype, "cpu", delta=False),
        linear_inputs((1,), 37, 70, dtype, "cpu"), linear_inputs((1, 3), 20, 33, dtype, "cpu", bias=False),
        # packed sequences (cu_seqlens), an empty one included
        packed(conv_inputs(1, 21, 70, 4, dtype, "cpu", state=False), [2, 13, 0, 6]),
        packed(scan_inputs(1, 21, 10, 16, dtype, "cpu", state=False), [2, 13, 0, 6]),
        packed(ssd_inputs(1, 21, 4, 4, 2, 16, 8, dtype, "cpu", state=False), [1, 17, 3]),
        packed(ssd_inputs(1, 6, 2, 4, 1, 128, 4, dtype, "cpu", state=False), [4, 2]),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernels_interpreted(seed, dtype):
    kernels = _interpreted_kernels()
    for op, kw in _tiny_cases(dtype):
        check_op(getattr(kernels, op), op, kw, TOL[dtype], seed)


def test_triton_gated_norm_split_callback_interpreted(seed):
    kernels = _interpreted_kernels()
    _, kw = gated_norm_inputs((3, 2), 24, 24, torch.float32, "cpu")
    full = ref_ops.gated_rms_norm(**kw)
    halves = [dict(kw, y=y, gate=g, weight=w) for y, g, w in
              zip(kw["y"].chunk(2, -1), kw["gate"].chunk(2, -1), kw["weight"].chunk(2))]
    total = sum((s["y"] * F.silu(s["gate"])).pow(2).sum(-1, keepdim=True) for s in halves)
    parts = [kernels.gated_rms_norm(**s, reduce_sum_of_squares=lambda local: total) for s in halves]
    assert rel_err(torch.cat(parts, -1), full) < 1e-5, seed


@pytest.mark.parametrize("lengths", [(5, 1, 7), (3, 0, 2), (2,)], ids=str)
def test_varlen_helpers_against_each_sequence_alone(seed, lengths):
    """cu_seqlens_of, seq_index and last_positions against the lengths written out."""
    from megatron_ssm.ops.varlen import cu_seqlens_of, last_positions, seq_index

    cu = cu_seqlens_of(list(lengths), "cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + list(itertools.accumulate(lengths))
    want_index = [i for i, n in enumerate(lengths) for _ in range(n)]
    got_index = seq_index(cu, sum(lengths))
    assert got_index.dtype == torch.int32 and got_index.tolist() == want_index
    if all(lengths):
        assert last_positions(cu).tolist() == [s - 1 for s in itertools.accumulate(lengths)]


def test_validate_packed_refuses_what_the_kernels_would_overrun():
    """Each refusal by its message, at its boundary; good boundaries pass."""
    from megatron_ssm.ops.varlen import validate_packed

    def cu(*v, dtype=torch.int32):
        return torch.tensor(v, dtype=dtype)

    validate_packed(cu(0, 3, 5), 5)
    validate_packed(cu(0, 3, 5), 5, states=2)
    validate_packed(cu(0, 1), 1, states=1)
    shape = r"cu_seqlens must be a 1-D int32 tensor \[nseq \+ 1\], got "
    for bad, said in [(cu(0, 3, 5, dtype=torch.int64), shape + r"\(3,\) torch.int64"), (cu(0), shape + r"\(1,\) torch.int32"),
                      (torch.zeros(1, 3, dtype=torch.int32), shape + r"\(1, 3\) torch.int32")]:
        with pytest.raises(ValueError, match=said):
            validate_packed(bad, 5)
    with pytest.raises(ValueError, match="cu_seqlens holds 2 sequences for 3 state rows"):
        validate_packed(cu(0, 3, 5), 5, states=3)
    rises = "cu_seqlens must rise strictly from 0 to the 5 packed tokens, got "
    for bad in [(1, 3, 5), (0, 3, 4), (0, 3, 6), (0, 3, 3, 5), (0, 4, 3, 5)]:
        with pytest.raises(ValueError, match=rf"{rises}\[{', '.join(map(str, bad))}\]$"):
            validate_packed(cu(*bad), 5)
    # more than 8 boundaries: the first 8, then an ellipsis; 8 exactly: all of them
    for n, tail in [(11, r"\.\.\."), (9, r"\.\.\."), (8, "")]:
        with pytest.raises(ValueError, match=rf"got \[0, 1, 2, 3, 4, 5, 6, 7\]{tail}$"):
            validate_packed(cu(*range(n)), 99)


def test_varlen_helpers_stay_on_the_inputs_device():
    """Everything the packed kernels index by is built on cu_seqlens' device, so a packed
    forward needs no host copy and can be captured in a CUDA graph; the meta device stands in for
    the GPU (an index built on the CPU by default would not mix with it)."""
    from megatron_ssm.ops.varlen import cu_seqlens_of, last_positions, seq_index

    cu = cu_seqlens_of([3, 2, 4], "meta")
    assert cu.device.type == "meta" and cu.dtype == torch.int32
    assert seq_index(cu, 9).device.type == "meta" and last_positions(cu).device.type == "meta"


def _without(case, *names):
    op, kw = case
    return op, dict(kw, **{n: None for n in names})


# Every prefill-scan layout (ops/triton/scan.py, SCAN_CONFIG's (P, W, num_warps, AHEAD)): P channels
# per thread; W = 32 lanes per warp, or fewer so that a channel's states split over 2 or 4 lanes;
# loads 1 or 2 steps ahead.
@pytest.mark.parametrize("cfg", [(4, 32, 1, 1), (2, 32, 1, 1), (1, 16, 1, 2), (1, 8, 1, 1), (2, 4, 1, 2)],
                         ids=lambda c: "P{}W{}w{}ahead{}".format(*c))
def test_triton_scan_layouts_interpreted(seed, cfg, monkeypatch):
    """Channel counts no block divides (70, 40, 33), packed sequences of lengths 1, odd and long, an
    initial state, z / no z, D / no D, n = 16 and n = 12 (masked states), and Mamba-2's use of the
    kernel (headdim 4, grouped B/C, clamped dt): each against the torch reference."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import scan

    for n in (12, 16, 8):
        monkeypatch.setitem(scan.SCAN_CONFIG, n, (cfg,))
    f32 = torch.float32
    cases = [
        scan_inputs(1, 9, 70, 16, f32, "cpu"),
        _without(scan_inputs(1, 6, 33, 12, f32, "cpu", state=False, gate=False), "D"),
        _without(scan_inputs(2, 1, 40, 16, f32, "cpu"), "dt_bias"),
        packed(scan_inputs(1, 30, 40, 16, f32, "cpu", state=False), [1, 7, 19, 1, 0, 2]),
        ssd_inputs(1, 7, 6, 4, 2, 8, 4, f32, "cpu", dt_limit=(0.01, 0.3)),
        packed(ssd_inputs(1, 12, 4, 4, 1, 8, 4, f32, "cpu", state=False), [5, 1, 6]),
    ]
    for op, kw in cases:
        check_op(getattr(kernels, op), op, kw, TOL[f32], seed)
    op, kw = scan_inputs(1, 11, 40, 16, torch.bfloat16, "cpu")
    check_op(kernels.selective_scan, op, kw, TOL[torch.bfloat16], seed)


def test_triton_scan_block_choice():
    """The launcher's (P, W, num_warps): the widest candidate that still fills the SMs, a block
    never wider than a B/C group, and the narrowest when nothing fills them."""
    pytest.importorskip("triton")
    from megatron_ssm.ops.triton import scan

    cpu = torch.device("cpu")
    want = scan._sm_count(cpu) * scan.SCAN_WARPS_PER_SM
    first = scan.SCAN_CONFIG[16][0]
    rows = -(-want // ((8192 // (first[0] * first[1])) * first[2]))  # enough rows for the widest
    assert scan._scan_block(16, 8192, 8192, 1, rows, cpu) == first
    assert scan._scan_block(16, 64, 64, 1, 1, cpu) == scan.SCAN_CONFIG[16][-1]
    p, w, _, _ = scan._scan_block(128, 64, 16, 4, 1000, cpu)  # groups of 16 channels
    assert 16 % (p * w) == 0


def test_gemv_every_configuration_interpreted(seed):
    """The skinny-GEMM kernel against F.linear in fp32 and bf16 at odd sizes (N and K not multiples
    of the tiles), M = 1 (elementwise path), 3 and 16 (tl.dot path), with and without bias, for every
    configuration the tuner may pick at a small shape (split K included) and the heuristic one. The
    split launches' arrival counters must be back at zero after each (a replayed graph reuses them)."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import gemv

    cases = []
    for n, k, every in [(45, 200, 3), (40, 256, 8)]:  # K off the tiles (masked loads), and on them (unmasked)
        configs = [None, gemv.Config(16, 64, 3, 4, dot=False), gemv.Config(32, 16, 5, 4)] + \
            [c for c in gemv._candidates(1, n, k, torch.device("cpu")) if c.block_n and c.block_k <= 256][::every]
        cases += [(n, k, configs)]
    for (n, k, configs), dtype in itertools.product(cases, (torch.float32, torch.bfloat16)):
        for m, bias in [(1, True), (3, False), (16, True)]:
            _, kw = linear_inputs((m,), n, k, dtype, "cpu", bias=bias)
            ref = F.linear(**kw)
            # Config(64, 16, 7, 4): more splits than the reducing program loads at once at 16 rows
            for cfg in configs if m == 1 else configs[:3] + [gemv.Config(64, 32, 2, 4), gemv.Config(64, 16, 7, 4)]:
                where = f"{m}x{k} @ {n}x{k} bias {bias} {dtype} config {cfg} (seed {seed})"
                out = kernels.linear(**kw, config=cfg)
                assert out.shape == ref.shape and out.dtype == ref.dtype, where
                err = rel_err(out, ref)
                assert err < TOL[dtype], f"{where}: relative error {err:.2e}"
                locks = gemv._LOCKS.get(torch.device("cpu"))
                assert locks is None or not locks.any(), f"{where}: arrival counters left non-zero"


def test_pdl_only_inside_capture_on_cuda(monkeypatch):
    """Programmatic dependent launch is on unless MEGATRON_SSM_PDL=0, never asked for off CUDA (the
    kernels' interpreted tests all run with it off), and its launch argument is Triton's."""
    from interpreter import interpreter_problem

    if interpreter_problem():
        pytest.skip(interpreter_problem())
    from megatron_ssm.ops.triton import pdl

    for value in (None, "1", "0"):
        if value is None:
            monkeypatch.delenv(pdl.ENV, raising=False)
        else:
            monkeypatch.setenv(pdl.ENV, value)
        assert pdl.requested() == (value != "0") and not pdl.use(torch.device("cpu"))
    assert not pdl.supported(torch.device("cpu"))
    assert pdl.kwargs(True) == {"launch_pdl": True} and pdl.kwargs(False) == {}


def test_linear_scale_is_the_output_times_it(seed):
    """The reference's scale: after the bias, per output feature or one float, in the output's dtype."""
    for scale in ("float", "vector"):
        _, kw = linear_inputs((2, 3), 7, 5, torch.float64, "cpu", scale=scale)
        out = ref_ops.linear(**kw)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out, F.linear(kw["x"], kw["weight"], kw["bias"]) * kw["scale"], rtol=1e-12, atol=0)
    _, kw = linear_inputs((4,), 6, 8, torch.bfloat16, "cpu", scale="vector")
    assert ref_ops.linear(**kw).dtype == torch.bfloat16  # an fp32 scale keeps the activations' dtype


def test_linear_segment_factors_are_the_per_feature_ones(seed):
    """Factors' runs, each multiplied by its scalar, give exactly what its per-feature tensor gives
    (the product in fp32, rounded once to bf16), in place on the projection's output or on a copy
    of an input the caller keeps (an adapter's delta); the run whose factor is 1 is not among them."""
    from megatron_ssm.ops.linear import scale_output

    for dtype in (torch.float32, torch.bfloat16):
        _, kw = linear_inputs((3, 5), 41, 16, dtype, "cpu", scale="segments")
        factors = kw["scale"]
        (start0, end0, f0), (start1, end1, f1) = factors.segments
        assert start0 == 0 and end1 == 41 and start1 > end0 and f0 != 1.0 and f1 != 1.0  # the middle run (1) left out
        unscaled = F.linear(kw["x"], kw["weight"], kw["bias"])
        want = (unscaled.float() * factors.per_feature).to(dtype)
        assert torch.equal(ref_ops.linear(**kw), want), dtype
        assert torch.equal(ref_ops.linear(**{**kw, "scale": factors.per_feature}), want), dtype
        for scale in (factors, factors.per_feature):  # not in place: the caller's tensor is left as it was
            kept = unscaled.clone()
            assert torch.equal(scale_output(kept, scale), want) and torch.equal(kept, unscaled), (dtype, type(scale))
        # training (out= has no backward): the same values, in the output's dtype, with a gradient
        grad = unscaled.clone().requires_grad_()
        out = scale_output(grad, factors.per_feature)
        assert out.dtype == dtype and out.requires_grad and torch.equal(out.detach(), want), dtype


def test_add_rms_norm_linear_interpreted(seed):
    """A block's entry inside the skinny GEMM (add_rms_norm_linear) against the reference ops it is
    made of: an fp32 stream exactly, the output within the dtype's tolerance. fp32 and bf16 weights, an
    fp32 and a bf16 stream, the first block (no delta), bias and scale; one row (tl.dot and
    elementwise), 3 and 16 rows (the norm's sums over several tiles of K at 16); split K, where only
    the first column tile's programs write the stream; K off the tiles; the heuristic configuration."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import gemv

    bf, f32 = torch.bfloat16, torch.float32
    cases = [(1, False, True, "vector"), (1, True, False, None), (3, False, False, "float"), (16, False, True, None)]
    for (dtype, stream), (m, first, bias, scale), (n, k) in itertools.product(
            [(f32, f32), (bf, f32), (bf, bf)], cases, [(45, 200), (40, 512)]):
        _, kw = entry_linear_inputs((m,), n, k, dtype, "cpu", residual_dtype=stream, delta=not first, bias=bias,
                                    scale=scale)
        want_y, want_h = ref_ops.add_rms_norm_linear(**kw)
        configs = [None, gemv.Config(16, 64, 3, 4), gemv.Config(32, 128, 1, 4)] + \
            ([gemv.Config(16, 64, 3, 4, dot=False)] if m == 1 else [])
        for cfg in configs:
            where = f"{m} rows, {n}x{k}, {dtype} stream {stream}, first {first}, bias {bias}, scale {scale}, {cfg} (seed {seed})"
            y, h = kernels.add_rms_norm_linear(**kw, config=cfg)
            # exact in fp32; a bf16 stream one rounding apart (the interpreter's fp32 -> bf16 truncates)
            assert h.dtype == stream, where
            torch.testing.assert_close(h, want_h, rtol=0 if stream == f32 else 2 ** -7, atol=0, msg=lambda e: f"{where}: {e}")
            assert y.dtype == dtype and rel_err(y, want_y) < TOL[dtype], f"{where}: relative error {rel_err(y, want_y):.2e}"


def row_max_inputs(rows, v, dtype, device):
    """Logits-like rows with the cases an argmax gets wrong: the max repeated in two blocks (the
    first index must win), a row all -inf (a rank holding only vocabulary padding: index 0), a row
    with +inf, and a max in the last, partial block."""
    x = torch.randn(rows, v, device=device).to(dtype)
    top = x.float().abs().max().item() + 1.0
    for r in range(rows):
        i = torch.randint(0, max(1, v // 2), ()).item()
        j = torch.randint(v // 2, v, ()).item()  # another block, where v spans several
        x[r, j] = top
        if r:
            x[r, i] = top
    if rows > 1:
        x[1] = float("-inf")
    if rows > 2:
        x[2, v // 3] = float("inf")
    if rows > 3:
        x[3, v - 1] = top + 1
    return x


def check_row_max(impl, rows, v, dtype, device, seed=None):
    x = row_max_inputs(rows, v, dtype, device)
    val, idx = impl(x.clone())
    want_val, want_idx = ref_ops.row_max(x)
    where = f"row_max {rows} x {v} {dtype} (seed {seed})"
    assert idx.dtype == torch.long and val.dtype == x.dtype, where
    assert torch.equal(idx, want_idx), f"{where}: indices {idx.tolist()[:8]} vs {want_idx.tolist()[:8]}"
    assert torch.equal(val, want_val), where


@pytest.mark.parametrize("rows,v", [(1, 5000), (5, 5000), (4, 37)])
def test_row_max_interpreted(seed, rows, v):
    """The logits' argmax kernel (blocks of 2048, the last program to arrive reducing) against torch,
    ties across blocks included; interpreted on CPU."""
    kernels = _interpreted_kernels()
    check_row_max(kernels.row_max, rows, v, torch.float32, "cpu", seed)


def test_gemv_prefetch_lines(monkeypatch):
    """How many 128-byte lines of each weight row a program hints to L2 before its PDL wait: the
    environment's bytes, never past the program's K slice, a power of two for tl.arange; 0 turns it off."""
    from megatron_ssm.ops.triton import gemv

    monkeypatch.setattr(gemv, "INTERPRETED", False)
    monkeypatch.delenv(gemv.PREFETCH_ENV, raising=False)
    assert gemv._prefetch_lines(1024, 2) == gemv.PREFETCH_DEFAULT // 128
    for env, per, size, want in [("0", 1024, 2, 0), ("300", 1024, 2, 4), ("4096", 128, 2, 2), ("4096", 96, 2, 2),
                                 ("1", 8, 4, 1), ("65536", 5120, 2, 128)]:
        monkeypatch.setenv(gemv.PREFETCH_ENV, env)
        assert gemv._prefetch_lines(per, size) == want, (env, per, size)


def test_gemv_tuner_where_only_cublas_fits(monkeypatch):
    """K below every tile (the GPU model tests' 4-wide projections): the tuner has only cuBLAS to
    time, and a block's entry, which needs our kernel, then takes the heuristic configuration (the
    tuner raised there on the H200, session 10's call 5). Times stand in for the GPU's."""
    from megatron_ssm.ops.triton import gemv

    monkeypatch.setattr(gemv, "_time", lambda fn, weights, reps=20: 1.0)
    for table in ("_TUNED", "_TUNED_KERNEL", "_TUNE_LOG"):
        monkeypatch.setattr(gemv, table, {})
    x, w = torch.randn(4, 4), torch.randn(128, 4)
    key = (16, 128, 4, torch.float32, False)
    assert gemv._candidates(4, 128, 4, x.device) == [gemv.CUBLAS]
    assert gemv._tune(key, x, w, None) == gemv.CUBLAS and key not in gemv._TUNED_KERNEL
    gemv._TUNED[key] = gemv.CUBLAS
    assert gemv._kernel_config(4, 4, w, None) == gemv.heuristic(4, 128, 4, x.device)


def test_gemv_row_scale_interpreted(seed):
    """One factor per row of x (a deferred norm's 1/rms), before the bias and the output scale,
    split K and not, against the reference."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import gemv

    for m, cfg, bias in itertools.product((1, 3), [gemv.Config(16, 64, 1, 4), gemv.Config(16, 64, 3, 4)], (False, True)):
        _, kw = linear_inputs((m, 1), 45, 200, torch.float32, "cpu", bias=bias, scale="vector")
        # factors below 0.6 or above 1.5, so every row's factor shows (one near 1 once hid it)
        small, large = 0.1 + 0.5 * torch.rand(m, 1), 1.5 + 1.5 * torch.rand(m, 1)
        rows = torch.where(torch.rand(m, 1) < 0.5, small, large)
        want = ref_ops.linear(**kw, row_scale=rows)
        assert rel_err(want, ref_ops.linear(**kw)) > 0.05  # the factors show
        err = rel_err(kernels.linear(**kw, row_scale=rows, config=cfg), want)
        assert err < TOL[torch.float32], f"m {m} bias {bias} {cfg}: relative error {err:.2e} (seed {seed})"


def test_linear_into_entry_is_the_entry_it_replaces(seed):
    """The reference: the projection, the residual add and the next projection with the norm's 1/rms
    after its product (RowRms from the parts) give what add_rms_norm then linear give, in fp32."""
    m, k, n, n2 = 3, 40, 24, 17
    x, w = torch.randn(m, k), torch.randn(n, k) / k ** 0.5
    residual, norm_w, w2 = torch.randn(m, n), 0.5 + torch.rand(n), torch.randn(n2, n)
    rows = 0.5 + torch.rand(m)
    entry = ref_ops.linear_into_entry(x, w, rows, residual, norm_w, 1e-5, torch.float32, scale=0.7)
    delta = ref_ops.linear(x, w, scale=0.7, row_scale=rows)
    normed, h = ref_ops.add_rms_norm(residual, delta, norm_w, 1e-5, torch.float32)
    assert torch.allclose(entry.stream, h, atol=1e-6), seed
    got = ref_ops.linear(entry.scaled, w2, row_scale=entry.row_rms)
    assert rel_err(got, ref_ops.linear(normed, w2)) < 1e-6, seed


def test_gemv_into_entry_interpreted(seed):
    """The projection's epilogue writing the next block's entry (stream, scaled stream, the column
    tiles' sums of squares) and the next projection summing those parts for its 1/rms, split K and
    not, tl.dot and elementwise, fp32 and bf16 (a bf16 stream and an fp32 one), against the references."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import gemv

    configs = [gemv.Config(16, 64, 1, 4), gemv.Config(16, 64, 3, 4), gemv.Config(16, 64, 3, 4, dot=False)]
    for (m, dtype, residual_dtype, rows), cfg in itertools.product(
            [(1, torch.float32, torch.float32, True), (3, torch.float32, torch.float32, False),
             (1, torch.bfloat16, torch.float32, True), (2, torch.bfloat16, torch.bfloat16, False)], configs):
        if m > 1 and not cfg.dot:
            continue
        k, n, n2 = 200, 45, 30
        x = torch.randn(m, k, dtype=dtype)
        w = (torch.randn(n, k) / k ** 0.5).to(dtype)
        residual = torch.randn(m, n, dtype=residual_dtype)
        norm_w = (0.5 + torch.rand(n)).to(dtype)
        w2 = torch.randn(n2, n, dtype=dtype)
        row_scale = 0.5 + torch.rand(m) if rows else None
        want = ref_ops.linear_into_entry(x, w, row_scale, residual, norm_w, 1e-5, residual_dtype, scale=0.7)
        got = kernels.linear_into_entry(x, w, row_scale, residual, norm_w, 1e-5, residual_dtype, scale=0.7, config=cfg)
        where = f"m {m} {dtype} stream {residual_dtype} {cfg} (seed {seed})"
        assert got.stream.dtype == residual_dtype and got.scaled.dtype == dtype, where
        assert got.row_rms.sum_sq.shape == (m, -(-n // cfg.block_n)), where
        for name, a, b in (("stream", got.stream, want.stream), ("scaled", got.scaled, want.scaled),
                           ("1/rms", got.row_rms.value(), want.row_rms.value())):
            err = rel_err(a, b)
            assert err < TOL[dtype], f"{name}: relative error {err:.2e}, {where}"
        nxt = kernels.linear(got.scaled, w2, row_scale=got.row_rms, config=cfg)
        err = rel_err(nxt, ref_ops.linear(want.scaled, w2, row_scale=want.row_rms))
        assert err < TOL[dtype], f"next projection: relative error {err:.2e}, {where}"


def test_gemv_scale_epilogue_interpreted(seed):
    """The skinny-GEMM kernel's scale (one float or one factor per output feature, after the bias)
    against the reference, split K and not, tl.dot and elementwise, at odd sizes."""
    kernels = _interpreted_kernels()
    from megatron_ssm.ops.triton import gemv

    configs = [gemv.Config(16, 64, 1, 4), gemv.Config(16, 64, 3, 4), gemv.Config(16, 64, 3, 4, dot=False)]
    for (m, bias, scale), cfg in itertools.product([(1, True, "vector"), (1, False, "float"), (3, True, "float"),
                                                     (16, False, "vector"), (2, True, "segments")], configs):
        if m > 1 and not cfg.dot:
            continue
        _, kw = linear_inputs((m,), 45, 200, torch.float32, "cpu", bias=bias, scale=scale)
        err = rel_err(kernels.linear(**kw, config=cfg), ref_ops.linear(**kw))
        assert err < TOL[torch.float32], f"m {m} bias {bias} {scale} scale, {cfg}: relative error {err:.2e} (seed {seed})"


def test_rotary_embedding_rotates_pairs_by_position(seed):
    """The reference: channel j < half and j + half turn by position * inv_freq[j] (a rotation:
    norms kept, position 0 the identity), channels past rotary_dim pass through."""
    _, kw = rope_inputs(2, 5, 3, 12, 8, torch.float64, "cpu")
    kw["positions"][0, 0] = 0
    out = ref_ops.rotary_embedding(**kw)
    x, pos, f = kw["x"], kw["positions"], kw["inv_freq"].double()
    angle = pos[..., None, None].double() * f  # [b, L, 1, half]
    x1, x2 = x[..., :4], x[..., 4:8]
    # The reference takes the angles and their cos/sin in fp32, as HF does: against float64 math it
    # is exact to fp32's precision (~1e-7 of |x|, which float64's default tolerance sometimes misses).
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out[..., :4], x1 * angle.cos() - x2 * angle.sin(), **close)
    torch.testing.assert_close(out[..., 4:8], x2 * angle.cos() + x1 * angle.sin(), **close)
    assert torch.equal(out[..., 8:], x[..., 8:]) and torch.allclose(out[0, 0], x[0, 0])


@pytest.mark.parametrize("d,rotary_dim", [(8, 8), (12, 8), (64, 32)], ids=["full", "partial", "partial-wide"])
def test_rotary_embedding_kernel_interpreted(seed, d, rotary_dim):
    """The kernel against the reference: strided views, rows at different positions, partial rotary."""
    kernels = _interpreted_kernels()
    for dtype in (torch.float32, torch.bfloat16):
        check_op(kernels.rotary_embedding, *rope_inputs(2, 3, 3, d, rotary_dim, dtype, "cpu", start=1000), TOL[dtype], seed)


def decode_attention_inputs(b, S, heads, kv_heads, d, dtype, device, positions, scale=None):
    return "decode_attention", dict(q=_act(b, heads, d, dtype=dtype, device=device),
                                    k_cache=_act(b, S, kv_heads, d, dtype=dtype, device=device),
                                    v_cache=_act(b, S, kv_heads, d, dtype=dtype, device=device),
                                    positions=torch.tensor(positions, device=device), scale=scale)


def test_decode_attention_is_each_row_over_its_keys(seed):
    """The reference: row i's query over keys 0..positions[i] alone (all of them past the cache),
    keys and values repeated per query head."""
    _, kw = decode_attention_inputs(4, 9, 4, 2, 8, torch.float64, "cpu", [0, 3, 8, 20], scale=0.3)
    out = ref_ops.decode_attention(**kw)
    for i, p in enumerate([0, 3, 8, 20]):
        k = kw["k_cache"][i, :p + 1].repeat_interleave(2, dim=1)  # [n, heads, d]
        v = kw["v_cache"][i, :p + 1].repeat_interleave(2, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", kw["q"][i], k) * 0.3, dim=-1)
        torch.testing.assert_close(out[i], torch.einsum("hn,nhd->hd", w, v))


@pytest.mark.parametrize("S,heads,kv_heads,d", [(9, 4, 2, 8), (700, 6, 1, 16), (40, 3, 3, 12)],
                         ids=["gqa", "mqa-splits", "mha-odd"])
def test_decode_attention_kernel_interpreted(seed, S, heads, kv_heads, d):
    """The kernel against the reference: positions at 0, mid-cache, the last and past the cache, a
    cache long enough for several splits, head dims off the tiles."""
    kernels = _interpreted_kernels()
    positions = [0, S // 2, S - 1, S + 5]
    for dtype in (torch.float32, torch.bfloat16):
        check_op(kernels.decode_attention, *decode_attention_inputs(4, S, heads, kv_heads, d, dtype, "cpu", positions),
                 TOL[dtype], seed)


def test_unvalidated_kernels_are_checked_against_the_reference_first(seed, caplog):
    """A kernel in VERIFY_FIRST runs beside the reference on its first call per input signature:
    kept when it agrees, replaced by the reference (one warning) when it disagrees or raises; the
    decision is kept, so later calls run one implementation only."""
    _, kw = rope_inputs(2, 3, 2, 8, 8, torch.float32, "cpu")
    calls = []

    def off_by(factor):  # a kernel whose every value is the reference's times factor
        def kernel(*a):
            calls.append(factor)
            return ref_ops.rotary_embedding(*a) * factor
        kernel.factor = factor
        return kernel

    def kernel_factor(kernel):
        return kernel.factor

    def flipped(*a):
        calls.append("flipped")
        return ref_ops.rotary_embedding(*a).flip(-1)

    def raising(*a):
        calls.append("raising")
        raise RuntimeError("no kernel here")

    tiny = (kw["x"] * 1e-3, kw["positions"], kw["inv_freq"])  # outputs far below 1: the bound is relative
    args = (kw["x"], kw["positions"], kw["inv_freq"])
    for kernel, inputs, kept, why in ((off_by(1 + 1e-4), args, True, None), (off_by(1.01), args, True, None),
                                      (off_by(1.03), args, False, "differs from the reference by"),
                                      (off_by(1.5), tiny, False, "differs from the reference by"),
                                      (flipped, args, False, "differs from the reference by"),
                                      (raising, args, False, "raised RuntimeError: no kernel here")):
        dispatch._VERIFIED.clear()
        want = ref_ops.rotary_embedding(*inputs)
        expect = want * kernel_factor(kernel) if kept else want
        calls.clear()
        with caplog.at_level("WARNING", logger="megatron_ssm.ops.dispatch"):
            caplog.clear()
            first = dispatch._verified("rotary_embedding", kernel, *inputs)
            second = dispatch._verified("rotary_embedding", kernel, *inputs)
        for out in (first, second):
            torch.testing.assert_close(out, expect)
        assert len(calls) == (2 if kept else 1), calls  # a refused kernel is not called again
        assert (len(caplog.records) == 0) == kept
        if not kept:
            message = caplog.records[0].getMessage()
            assert message.startswith(f"the rotary_embedding kernel {why}") and "(2, 3, 2, 8)" in message, message
            assert message.endswith(": the reference runs there instead"), message
    dispatch._VERIFIED.clear()


def test_rope_frequencies_are_hfs():
    """theta^(-2j / rotary_dim): 10000 over 8 channels gives 1, 0.1, 0.01, 0.001."""
    from megatron_ssm.ops.rope import rope_frequencies

    f = rope_frequencies(10000.0, 8)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, torch.tensor([1.0, 0.1, 0.01, 0.001]), rtol=1e-6, atol=0)
