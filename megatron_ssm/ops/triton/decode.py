"""Mamba-2's decode chain (conv update, SSD state update, gated norm) in one launch.

A program takes BLOCK_D channels of x, all within one B/C group. It convolves them (and shifts
their conv state), convolves its group's B and C itself from the same inputs, updates its channels'
SSM state and writes y, or y * silu(z). Two things need the whole group, not one program's block:

- B and C's conv state: every program of the group reads it, so none may shift it until all have
  read it.
- the gated norm: its mean runs over the group's channels/g channels.

So each program, when done, adds one to its (row, group) counter, and the one that brings it to the
group's program count (the last to finish) shifts B and C's conv state, sums the partial sums of
squares that the others left in a workspace (in a fixed order: the result does not depend on which
program came last), normalises the group's y in place, and resets the counter to zero for the next
launch. The release/acquire atomic orders every program's reads and writes before the last one's.
With the norm deferred (`defer_norm`), each program writes its channels' y silu(z) w at once and
the last one only writes the group's 1/rms, which out_proj applies after its product: no program
then walks the whole group.

The counters and partial sums live in a workspace kept per device, shared by every layer: layers
run one after another on one stream. CUDA-graph safe: the counters are back at zero after every
launch, and the workspace is allocated before capture (on the eager warm-up call).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .pdl import enter as pdl_enter
from .scan import _block_d, _dt

# State elements per program, as for the plain state update (ops/triton/scan.py).
UPDATE_BLOCK = 2048
NORM_BLOCK = 2048  # channels the last program normalises per iteration
NUM_WARPS = 4


@triton.jit
def _conv_state(cs_ptr, cw_ptr, row, ch, mask, scs_b, scs_c, scs_k, scw_c, scw_k,
                K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Channels `ch`'s conv state (columns 0..K-2 of the window) and the conv's weights: what does
    not depend on this token, loaded before anything needs it."""
    offs_k = tl.arange(0, BLOCK_K)
    old = tl.load(cs_ptr + row * scs_b + ch[:, None] * scs_c + offs_k[None, :] * scs_k,
                  mask=mask[:, None] & (offs_k < K - 1)[None, :], other=0.0)
    w = tl.load(cw_ptr + ch[:, None] * scw_c + offs_k[None, :] * scw_k,
                mask=mask[:, None] & (offs_k < K)[None, :], other=0.0)
    return old, w


@triton.jit
def _window(xbc_ptr, old, row, ch, mask, sxbc_b, sxbc_c, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The conv window [state | x] with this token's inputs of channels `ch` (what the state shifts to)."""
    offs_k = tl.arange(0, BLOCK_K)
    xv = tl.load(xbc_ptr + row * sxbc_b + ch * sxbc_c, mask=mask, other=0.0).to(old.dtype)
    return tl.where((offs_k == K - 1)[None, :], xv[:, None], old)


@triton.jit
def _conv_out(window, w, cb_ptr, ch, mask, out_dtype: tl.constexpr, HAS_CONV_BIAS: tl.constexpr):
    """silu(conv) of the window, rounded to the activations' dtype as the reference's conv returns it."""
    acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_CONV_BIAS:
        acc += tl.load(cb_ptr + ch, mask=mask, other=0.0).to(tl.float32)
    acc = acc * tl.sigmoid(acc)
    return acc.to(out_dtype).to(tl.float32)


@triton.jit
def _shift_state(cs_ptr, row, ch, mask, window, scs_b, scs_c, scs_k, K: tl.constexpr, BLOCK_K: tl.constexpr):
    # Column k takes column k+1 (the window's column k+1).
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(cs_ptr + row * scs_b + ch[:, None] * scs_c + (offs_k[None, :] - 1) * scs_k, window,
             mask=mask[:, None] & ((offs_k >= 1) & (offs_k < K))[None, :])


@triton.jit
def _mamba2_decode_kernel(
    xbc_ptr, z_ptr, dt_ptr, cs_ptr, cw_ptr, cb_ptr, st_ptr, A_ptr, D_ptr, dt_bias_ptr, nw_ptr, y_ptr,
    count_ptr, part_ptr, norm_out_ptr,
    nchan, nstate, ngroups, progs_per_group, dt_min, dt_max, eps, norm_width,
    sxbc_b, sxbc_c, sz_b, sz_c, sdt_b, sdt_h,
    scs_b, scs_c, scs_k, scw_c, scw_k,
    sst_b, sst_h, sst_p, sst_n,
    sy_b,
    HEADDIM: tl.constexpr, K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr,
    GATE: tl.constexpr,  # 0: y; 1: y * silu(z); 2: gated RMS norm; 3: the norm deferred (y silu(z) w, 1/rms)
    OUT_SUM: tl.constexpr,  # GATE 3: write the group's sum of squares instead of 1/rms (a group across ranks)
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    NORM_BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
):
    # A programmatic dependent (ops/triton/pdl.py) like the kernels it replaces: the next kernel's
    # griddepcontrol.wait still waits for this whole grid, the last program's normalisation included.
    # EARLY: what in_proj does not write (the states, the weights) is loaded before the wait.
    if not EARLY:
        pdl_enter(PDL)
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    group = pid // progs_per_group
    group_width = nchan // ngroups
    offs_c = pid * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    cmask = offs_c < nchan
    nmask = offs_n < nstate
    cn_mask = cmask[:, None] & nmask[None, :]
    heads = offs_c // HEADDIM
    b_ch = nchan + group * nstate + offs_n
    c_ch = b_ch + ngroups * nstate

    # Every load first, none behind a store or a barrier: they are all in flight at once. (Loaded
    # after the conv and its state shift, the SSM state waited a round trip of its own, and the
    # fused step measured slower than the three kernels it replaces; session 11.)
    s_ptrs = (st_ptr + row * sst_b + heads[:, None] * sst_h + (offs_c % HEADDIM)[:, None] * sst_p
              + offs_n[None, :] * sst_n)
    state = tl.load(s_ptrs, mask=cn_mask, other=0.0)
    a = tl.load(A_ptr + heads, mask=cmask, other=0.0).to(tl.float32)
    xold, xw = _conv_state(cs_ptr, cw_ptr, row, offs_c, cmask, scs_b, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
    bold, bw = _conv_state(cs_ptr, cw_ptr, row, b_ch, nmask, scs_b, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
    cold, cw = _conv_state(cs_ptr, cw_ptr, row, c_ch, nmask, scs_b, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
    if GATE == 3:
        nw = tl.load(nw_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if EARLY:
        pdl_enter(PDL)
    dt_in = tl.load(dt_ptr + row * sdt_b + heads * sdt_h, mask=cmask, other=0.0)
    xwin = _window(xbc_ptr, xold, row, offs_c, cmask, sxbc_b, sxbc_c, K, BLOCK_K)
    bwin = _window(xbc_ptr, bold, row, b_ch, nmask, sxbc_b, sxbc_c, K, BLOCK_K)
    cwin = _window(xbc_ptr, cold, row, c_ch, nmask, sxbc_b, sxbc_c, K, BLOCK_K)
    if GATE != 0:
        zv = tl.load(z_ptr + row * sz_b + offs_c * sz_c, mask=cmask, other=0.0).to(tl.float32)

    # conv: this block's x channels, and its group's B and C (the same numbers in every program)
    act = xbc_ptr.dtype.element_ty
    x = _conv_out(xwin, xw, cb_ptr, offs_c, cmask, act, HAS_CONV_BIAS)
    Bv = _conv_out(bwin, bw, cb_ptr, b_ch, nmask, act, HAS_CONV_BIAS)
    Cv = _conv_out(cwin, cw, cb_ptr, c_ch, nmask, act, HAS_CONV_BIAS)

    # SSD state update
    dt = _dt(dt_in, dt_bias_ptr, heads, cmask, dt_min, dt_max, HAS_DT_BIAS)
    dA = tl.exp(dt * a)
    h = state.to(tl.float32) * dA[:, None] + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptrs, h.to(st_ptr.dtype.element_ty), mask=cn_mask)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + heads, mask=cmask, other=0.0).to(tl.float32)
    y = y.to(y_ptr.dtype.element_ty)  # the state update's output dtype, which the norm then reads

    y_ptrs = y_ptr + row * sy_b + offs_c
    if GATE >= 2:
        g = y.to(tl.float32) * zv * tl.sigmoid(zv)
    if GATE == 1:  # y * silu(z), each rounded as torch rounds them
        gate = (zv * tl.sigmoid(zv)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptrs, (y.to(tl.float32) * gate.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=cmask)
    elif GATE == 3:
        tl.store(y_ptrs, (g * nw).to(y_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(y_ptrs, y, mask=cmask)
    slot = row * ngroups + group
    if GATE >= 2:
        tl.store(part_ptr + slot * progs_per_group + pid % progs_per_group, tl.sum(g * g, axis=0))

    # x's conv state is this program's alone; another thread may hold column k+1 of a channel, so
    # every thread's read of the old state (all above) finishes before the first write.
    tl.debug_barrier()
    _shift_state(cs_ptr, row, offs_c, cmask, xwin, scs_b, scs_c, scs_k, K, BLOCK_K)
    # the last program of the group finishes what needs the whole group
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + slot, 1, sem="acq_rel", scope="gpu")
    if arrived == progs_per_group - 1:
        tl.debug_barrier()
        _shift_state(cs_ptr, row, b_ch, nmask, bwin, scs_b, scs_c, scs_k, K, BLOCK_K)
        _shift_state(cs_ptr, row, c_ch, nmask, cwin, scs_b, scs_c, scs_k, K, BLOCK_K)
        if GATE >= 2:
            offs_p = tl.arange(0, BLOCK_P)
            parts = tl.load(part_ptr + slot * progs_per_group + offs_p, mask=offs_p < progs_per_group, other=0.0,
                            cache_modifier=".cg")
            total = tl.sum(parts, axis=0)
            rstd = tl.rsqrt(total / norm_width + eps)
        if GATE == 3:
            tl.store(norm_out_ptr + slot, total if OUT_SUM else rstd)
        if GATE == 2:
            for start in range(0, group_width, NORM_BLOCK):
                offs = tl.arange(0, NORM_BLOCK)
                m = start + offs < group_width
                ch = group * group_width + start + offs
                yl = tl.load(y_ptr + row * sy_b + ch, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
                zl = tl.load(z_ptr + row * sz_b + ch * sz_c, mask=m, other=0.0).to(tl.float32)
                out = (yl * zl * tl.sigmoid(zl) * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
                out = out * tl.load(nw_ptr + ch, mask=m, other=0.0).to(tl.float32)
                tl.store(y_ptr + row * sy_b + ch, out.to(y_ptr.dtype.element_ty), mask=m)
        tl.atomic_xchg(count_ptr + slot, 0, sem="relaxed", scope="gpu")


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, counters: int, partials: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 counters, all zero; fp32 partial sums) with at least these many entries, per device.
    Grown (never shrunk) by allocation, so the same tensors serve every layer and graph after the
    first call at the largest batch."""
    have = _workspaces.get(device)
    if have is None or have[0].numel() < counters or have[1].numel() < partials:
        counters = max(counters, 1024, 0 if have is None else have[0].numel())
        partials = max(partials, 65536, 0 if have is None else have[1].numel())
        have = (torch.zeros(counters, device=device, dtype=torch.int32),
                torch.empty(partials, device=device, dtype=torch.float32))
        _workspaces[device] = have
    return have


def mamba2_decode_step(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D=None, dt_bias=None,
                       dt_limit=(0.0, float("inf")), norm_weight=None, norm_eps=1e-5, defer_norm=False,
                       group_size=None, reduce_sum_of_squares=None):
    """ops.decode.mamba2_decode_step in one launch (see the module docstring)."""
    b, conv_channels = xbc.shape
    _, h, p, n = ssm_state.shape
    nchan = h * p
    g = (conv_channels - nchan) // (2 * n)
    K = conv_weight.shape[-1]
    assert K >= 2, "a width-1 conv has no state"
    assert nchan + 2 * g * n == conv_channels and h % g == 0, "xbc is not x | B | C for this state"
    deferred = defer_norm and norm_weight is not None
    gate = 3 if deferred else 2 if norm_weight is not None else (1 if z is not None else 0)
    assert gate == 0 or z is not None, "the gated norm needs z"
    bn = triton.next_power_of_2(n)
    bd = _block_d(nchan, nchan // g, g, max(1, UPDATE_BLOCK // bn))
    # A block never straddles two groups (_block_d); with one group, it may overhang the end.
    progs_per_group = triton.cdiv(nchan // g, bd)
    counters, partials = _workspace(xbc.device, b * g, b * g * progs_per_group)
    y = torch.empty(b, nchan, device=xbc.device, dtype=xbc.dtype)
    norm_out = torch.empty(b, g, device=xbc.device, dtype=torch.float32) if deferred else y
    out_sum = deferred and reduce_sum_of_squares is not None
    norm_width = (group_size or nchan // g) if deferred else nchan // g  # what the norm's mean divides by
    D, dt_bias = (None if t is None else t.contiguous() for t in (D, dt_bias))
    A = A.contiguous()
    if norm_weight is not None:
        norm_weight = norm_weight.contiguous()
    zs = z.stride() if z is not None else (0, 0)
    on = pdl.use(xbc.device)
    _mamba2_decode_kernel[(g * progs_per_group, b)](
        xbc, z if z is not None else xbc, dt, conv_state, conv_weight, conv_bias if conv_bias is not None else xbc,
        ssm_state, A, D if D is not None else A, dt_bias if dt_bias is not None else A,
        norm_weight if norm_weight is not None else A, y, counters, partials, norm_out,
        nchan, n, g, progs_per_group, float(dt_limit[0]), float(dt_limit[1]), float(norm_eps),
        norm_width,
        *xbc.stride(), *zs, *dt.stride(), *conv_state.stride(), *conv_weight.stride(), *ssm_state.stride(),
        y.stride(0),
        HEADDIM=p, K=K, HAS_CONV_BIAS=conv_bias is not None, HAS_D=D is not None,
        HAS_DT_BIAS=dt_bias is not None, GATE=gate, OUT_SUM=out_sum,
        BLOCK_D=bd, BLOCK_N=bn, BLOCK_K=triton.next_power_of_2(K),
        BLOCK_P=triton.next_power_of_2(progs_per_group), NORM_BLOCK=min(NORM_BLOCK, triton.next_power_of_2(nchan // g)),
        PDL=on, EARLY=pdl.early_loads(on), num_warps=NUM_WARPS, **pdl.kwargs(on),
    )
    if not deferred:
        return y
    if out_sum:  # the group spans ranks: its whole sum of squares first
        norm_out = torch.rsqrt(reduce_sum_of_squares(norm_out) / norm_width + norm_eps)
    return y, norm_out
