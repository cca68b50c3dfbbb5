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

import os

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
def _ssd_step(xwin, bwin, cwin, xw, bw, cw, cb_ptr, ch, b_ch, c_ch, cmask, nmask, dt_in, a, state, dt_bias_ptr,
              heads, dt_min, dt_max, act: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_DT_BIAS: tl.constexpr):
    """One token's conv of channels `ch` and of the group's B and C, and the SSD update of their
    state: (x after the conv, the new state h, C after the conv), for _ssd_out."""
    x = _conv_out(xwin, xw, cb_ptr, ch, cmask, act, HAS_CONV_BIAS)
    Bv = _conv_out(bwin, bw, cb_ptr, b_ch, nmask, act, HAS_CONV_BIAS)
    Cv = _conv_out(cwin, cw, cb_ptr, c_ch, nmask, act, HAS_CONV_BIAS)
    dt = _dt(dt_in, dt_bias_ptr, heads, cmask, dt_min, dt_max, HAS_DT_BIAS)
    h = state.to(tl.float32) * tl.exp(dt * a)[:, None] + (dt * x)[:, None] * Bv[None, :]
    return x, h, Cv


@triton.jit
def _ssd_out(x, h, Cv, D_ptr, heads, cmask, HAS_D: tl.constexpr):
    """y = C h + D x in fp32 (after the state is stored: h need not outlive the store)."""
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + heads, mask=cmask, other=0.0).to(tl.float32)
    return y


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

    # conv (this block's x channels, and its group's B and C: the same numbers in every program), SSD update
    x, h, Cv = _ssd_step(xwin, bwin, cwin, xw, bw, cw, cb_ptr, offs_c, b_ch, c_ch, cmask, nmask, dt_in, a, state,
                         dt_bias_ptr, heads, dt_min, dt_max, xbc_ptr.dtype.element_ty, HAS_CONV_BIAS, HAS_DT_BIAS)
    tl.store(s_ptrs, h.to(st_ptr.dtype.element_ty), mask=cn_mask)
    y = _ssd_out(x, h, Cv, D_ptr, heads, cmask, HAS_D)
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


# ---- the step, out_proj and the next block's entry in one launch (one row, one norm group) ---------
#
# A program takes one of NQ parts of a head: its HEADDIM / NQ channels for the step, and its N / NQ
# of out_proj's output rows for the projection (the head's columns: 128-byte rows at HEADDIM 64).
# Before its PDL wait it loads what in_proj does not write: its channels' SSM and conv states.
# Section 1, after the wait: its channels' step (the states written back at once: no other program
# reads them), y silu(z) w and its sum of squares to a workspace. The head's parts then wait for one
# another (a counter a head). Section 2: the head's y times the part's rows, as partials [heads, N].
# A grid barrier. Section 3: program i sums the partials of its N / programs outputs over the heads
# (in head order: deterministic), scales them by the norm's 1/rms (from every part's sum of squares)
# and writes the next block's entry parts, as linear_into_entry's epilogue does.
#
# The waits need every program resident at once, which `step_out_parts` makes sure of from the
# compiled kernel's registers and shared memory, and no other kernel holding the SMs (the engine
# runs one stream).
# Triton's interpreter runs programs one after another: there each section is a launch of its own.

STEP_OUT_WARPS = 4
# Out_proj rows a program takes a loop step. On the H200 (docs/benchmarks.md, session 17) a
# mamba2-2.7b b1 graphed step took 2.32 ms at these (256 rows, 3 stages, 4 warps), 2.62 at 2 stages;
# at 128 rows 2.35, and 2.56 / 2.94 at 4 stages / 8 warps; 2.38 with 64 rows hinted to L2 before the
# wait (a variant since removed); 2.19-2.20 with the step and out_proj apart. Hence off by default
# (ops.dispatch.step_into_exit).
STEP_OUT_ROW_BLOCK = 256
STEP_OUT_STAGES = 3
# Switches for the A/Bs: rows a step, warps, the loop's stages.
STEP_OUT_ROWS_ENV = "MEGATRON_SSM_STEP_OUT_ROWS"
STEP_OUT_WARPS_ENV = "MEGATRON_SSM_STEP_OUT_WARPS"
STEP_OUT_STAGES_ENV = "MEGATRON_SSM_STEP_OUT_STAGES"


@triton.jit
def _spin_until(ptr, target):
    # polled by plain volatile loads (an atomic a poll would queue behind every other program's),
    # then one acquire to order what follows after the others' releases
    seen = tl.load(ptr, volatile=True)
    while seen < target:
        seen = tl.load(ptr, volatile=True)
    tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _arrive_and_wait(ptr, target):
    """Every program's stores before it are visible to every program of the `target` after it."""
    tl.debug_barrier()
    tl.atomic_add(ptr, 1, sem="release", scope="gpu")
    _spin_until(ptr, target)
    tl.debug_barrier()


@triton.jit
def _mamba2_step_out_kernel(
    xbc_ptr, z_ptr, dt_ptr, cs_ptr, cw_ptr, cb_ptr, st_ptr, A_ptr, D_ptr, dt_bias_ptr, nw_ptr,
    w_ptr, yw_ptr, part_ptr, sq_ptr, head_ptr, res_ptr, enw_ptr, stream_ptr, scaled_ptr, esq_ptr, bar_ptr,
    nchan, nstate, N, nheads, rows_per_part, outs_per_prog, dt_min, dt_max, eps, norm_width, alpha,
    sxbc_c, sz_c, sdt_h, scs_c, scs_k, scw_c, scw_k, sst_h, sst_p, sst_n, swn,
    HEADDIM: tl.constexpr, K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, HAS_D: tl.constexpr,
    HAS_DT_BIAS: tl.constexpr, SCALE: tl.constexpr, NQ: tl.constexpr, RB: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_O: tl.constexpr,
    FIRST: tl.constexpr, LAST: tl.constexpr,  # the sections this launch runs: 1..3 on a GPU
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    head = pid // NQ
    part = pid % NQ
    programs = nheads * NQ
    CPP: tl.constexpr = HEADDIM // NQ
    ch = head * HEADDIM + part * CPP + tl.arange(0, CPP)  # this part's channels
    cmask = ch < nchan
    heads = ch // HEADDIM
    hch = head * HEADDIM + tl.arange(0, HEADDIM)  # the head's, out_proj's columns
    offs_n = tl.arange(0, BLOCK_N)
    nmask = offs_n < nstate
    b_ch = nchan + offs_n
    c_ch = b_ch + nstate
    act = xbc_ptr.dtype.element_ty
    r0 = part * rows_per_part
    r_end = tl.minimum(r0 + rows_per_part, N)
    if FIRST == 1:
        # what in_proj does not write, before the wait
        s_ptrs = (st_ptr + head * sst_h + (part * CPP + tl.arange(0, CPP))[:, None] * sst_p
                  + offs_n[None, :] * sst_n)
        state = tl.load(s_ptrs, mask=nmask[None, :], other=0.0)
        a = tl.load(A_ptr + heads).to(tl.float32)
        xold, xw = _conv_state(cs_ptr, cw_ptr, 0, ch, cmask, 0, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
        bold, bw = _conv_state(cs_ptr, cw_ptr, 0, b_ch, nmask, 0, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
        cold, cw = _conv_state(cs_ptr, cw_ptr, 0, c_ch, nmask, 0, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
        nw = tl.load(nw_ptr + ch).to(tl.float32)
        pdl_enter(PDL)
        dt_in = tl.load(dt_ptr + heads * sdt_h)
        xwin = _window(xbc_ptr, xold, 0, ch, cmask, 0, sxbc_c, K, BLOCK_K)
        bwin = _window(xbc_ptr, bold, 0, b_ch, nmask, 0, sxbc_c, K, BLOCK_K)
        cwin = _window(xbc_ptr, cold, 0, c_ch, nmask, 0, sxbc_c, K, BLOCK_K)
        zv = tl.load(z_ptr + ch * sz_c).to(tl.float32)
        x, h, Cv = _ssd_step(xwin, bwin, cwin, xw, bw, cw, cb_ptr, ch, b_ch, c_ch, cmask, nmask, dt_in, a, state,
                             dt_bias_ptr, heads, dt_min, dt_max, act, HAS_CONV_BIAS, HAS_DT_BIAS)
        tl.store(s_ptrs, h.to(st_ptr.dtype.element_ty), mask=nmask[None, :])  # this program's alone
        y = _ssd_out(x, h, Cv, D_ptr, heads, cmask, HAS_D)
        g = y.to(act).to(tl.float32) * zv * tl.sigmoid(zv)  # rounded as mamba2_decode_step's deferred norm
        tl.store(yw_ptr + ch, (g * nw).to(w_ptr.dtype.element_ty).to(tl.float32))
        tl.store(sq_ptr + pid, tl.sum(g * g, axis=0))
        tl.debug_barrier()  # every thread's read of the old conv state (another may hold column k+1)
        _shift_state(cs_ptr, 0, ch, cmask, xwin, 0, scs_c, scs_k, K, BLOCK_K)
        if LAST >= 2:
            _arrive_and_wait(head_ptr + head, NQ)  # the head's other parts' y
    if FIRST <= 2 and LAST >= 2:
        # the head's y times the part's rows through tl.dot (y a column of a 16-wide tile): Triton
        # then pipelines the weight loads through shared memory, not registers
        yw = tl.load(yw_ptr + hch, cache_modifier=".cg")
        ywt = tl.where((tl.arange(0, 16) == 0)[None, :], yw[:, None], 0.0)
        if not (UPCAST or IEEE):
            ywt = ywt.to(w_ptr.dtype.element_ty)
        for r in range(r0, r_end, RB):
            rows = r + tl.arange(0, RB)
            ok = rows < r_end
            w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * swn + hch[None, :], mask=ok[:, None], other=0.0)
            if UPCAST:
                acc = tl.dot(w.to(tl.float32), ywt, input_precision="ieee")
            elif IEEE:
                acc = tl.dot(w, ywt, input_precision="ieee")
            else:
                acc = tl.dot(w, ywt)
            tl.store(part_ptr + head * N + rows, tl.sum(acc, axis=1), mask=ok)
        if LAST == 3:
            _arrive_and_wait(bar_ptr, programs)
    if LAST == 3:
        # every program has read B and C's conv state and passed its head's wait: the counters and
        # that state are free
        if pid == 0:
            bold2, _ = _conv_state(cs_ptr, cw_ptr, 0, b_ch, nmask, 0, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
            cold2, _ = _conv_state(cs_ptr, cw_ptr, 0, c_ch, nmask, 0, scs_c, scs_k, scw_c, scw_k, K, BLOCK_K)
            bwin2 = _window(xbc_ptr, bold2, 0, b_ch, nmask, 0, sxbc_c, K, BLOCK_K)
            cwin2 = _window(xbc_ptr, cold2, 0, c_ch, nmask, 0, sxbc_c, K, BLOCK_K)
            tl.debug_barrier()
            _shift_state(cs_ptr, 0, b_ch, nmask, bwin2, 0, scs_c, scs_k, K, BLOCK_K)
            _shift_state(cs_ptr, 0, c_ch, nmask, cwin2, 0, scs_c, scs_k, K, BLOCK_K)
        if FIRST == 1 and pid < nheads:
            tl.atomic_xchg(head_ptr + pid, 0, sem="relaxed", scope="gpu")
        # this program's outputs: the heads' partials summed in head order, then the entry's parts
        offs_o = tl.arange(0, BLOCK_O)
        outs = pid * outs_per_prog + offs_o
        omask = (offs_o < outs_per_prog) & (outs < N)
        offs_h = tl.arange(0, BLOCK_H)
        tile = tl.load(part_ptr + offs_h[:, None] * N + outs[None, :], mask=(offs_h < nheads)[:, None] & omask[None, :],
                       other=0.0, cache_modifier=".cg")
        offs_s = tl.arange(0, BLOCK_S)
        sq = tl.load(sq_ptr + offs_s, mask=offs_s < programs, other=0.0, cache_modifier=".cg")
        v = tl.sum(tile, axis=0) * tl.rsqrt(tl.sum(sq, axis=0) / norm_width + eps)
        if SCALE:
            v = v * alpha
        delta = v.to(w_ptr.dtype.element_ty).to(tl.float32)
        res = tl.load(res_ptr + outs, mask=omask, other=0.0).to(tl.float32)
        hst = (res + delta).to(stream_ptr.dtype.element_ty)
        tl.store(stream_ptr + outs, hst, mask=omask)
        hq = hst.to(scaled_ptr.dtype.element_ty).to(tl.float32)
        enw = tl.load(enw_ptr + outs, mask=omask, other=0.0).to(tl.float32)
        tl.store(scaled_ptr + outs, (hq * enw).to(scaled_ptr.dtype.element_ty), mask=omask)
        tl.store(esq_ptr + pid, tl.sum(tl.where(omask, hq * hq, 0.0), axis=0))
        if FIRST == 1:
            # the barrier's counters back to zero for the next launch, by the last program past it
            tl.debug_barrier()
            done = tl.atomic_add(bar_ptr + 1, 1, sem="acq_rel", scope="gpu")
            if done == programs - 1:
                tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
                tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed", scope="gpu")


_step_out_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _step_out_workspace(device: torch.device, floats: int, counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 scratch of at least `floats`, int32 counters of at least `counters`, all zero), shared
    by every layer as _workspace's; grown outside capture (the eager warm-up)."""
    have = _step_out_workspaces.get(device)
    if have is None or have[0].numel() < floats or have[1].numel() < counters:
        have = (torch.empty(max(floats, 1 << 20), device=device, dtype=torch.float32),
                torch.zeros(max(counters, 1024), device=device, dtype=torch.int32))
        _step_out_workspaces[device] = have
    return have


_PARTS: dict[tuple, int] = {}


def _resident_per_sm(kernel, warps: int, device: torch.device) -> int:
    """How many programs of a compiled kernel one SM holds at once: registers, shared memory, warps."""
    kernel._init_handles()
    per_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers are given to a warp 256 at a time
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    need = kernel.metadata.shared + 1024  # the driver's kilobyte a block
    return min(65536 // (per_warp * warps), smem // need, 64 // warps, 32)


def step_out_parts(heads: int, headdim: int, device: torch.device, compiled=None, warps: int = STEP_OUT_WARPS) -> int:
    """Parts a head's programs split into (programs = heads x parts): the most of 4, 2, 1 that divide
    headdim and keep every program resident at once. compiled(parts) gives the kernel compiled for
    that many (its registers and shared memory say how many an SM holds); without it, two an SM
    (eight warps of at most 255 registers fit an SM). 0 where the heads alone are too many."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    for parts in (4, 2, 1):
        if headdim % parts:
            continue
        bound = max(1, 8 // warps)  # eight warps of at most 255 registers fit in an SM's registers
        per_sm = bound
        if compiled is not None:
            try:
                per_sm = _resident_per_sm(compiled(parts), warps, device)
            except Exception:  # noqa: BLE001 - an older Triton without these attributes: the bound above
                per_sm = bound
        if heads * parts <= per_sm * sms:
            return parts
    return 0


def mamba2_step_into_entry(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, dt_limit,
                           norm_weight, norm_eps, out_weight, out_scale, residual, entry_norm_weight, entry_eps,
                           residual_dtype):
    """ops.decode.mamba2_step_into_entry in one launch for one row (see the note above the kernel);
    otherwise this module's step and the GEMV's linear_into_entry, as the model runs them apart."""
    from ..linear import RowRms
    from ..norm import EntryParts
    from .gemv import linear_into_entry

    b, conv_channels = xbc.shape
    _, h, p, n = ssm_state.shape
    nchan = h * p
    N = out_weight.shape[0]
    g = (conv_channels - nchan) // (2 * n)
    K = conv_weight.shape[-1]
    lead = residual.shape[:-1]
    fits = (b == 1 and g == 1 and p == triton.next_power_of_2(p) and p >= 16 and K >= 2
            and out_weight.dim() == 2 and out_weight.shape[1] == nchan and out_weight.stride(1) == 1
            and residual.numel() == N and tuple(entry_norm_weight.shape) == (N,)
            and entry_norm_weight.dtype == out_weight.dtype and xbc.dtype == out_weight.dtype
            and not isinstance(out_scale, torch.Tensor))

    def apart():
        y, rstd = mamba2_decode_step(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias,
                                     dt_limit, norm_weight, norm_eps, defer_norm=True)
        return linear_into_entry(y.view(*lead, nchan), out_weight, rstd.view(lead), residual, entry_norm_weight,
                                 entry_eps, residual_dtype, out_scale)

    if not fits:
        return apart()
    scratch, counters = _step_out_workspace(xbc.device, nchan + 4 * h + h * N, 2 + h)
    res = residual.reshape(N)
    if res.stride(0) != 1:
        res = res.contiguous()
    stream = torch.empty(N, device=xbc.device, dtype=residual_dtype)
    scaled = torch.empty(N, device=xbc.device, dtype=out_weight.dtype)
    D, dt_bias = (None if t is None else t.contiguous() for t in (D, dt_bias))
    A, norm_weight, entry_norm_weight = A.contiguous(), norm_weight.contiguous(), entry_norm_weight.contiguous()
    on = pdl.use(xbc.device)
    rb = int(os.environ.get(STEP_OUT_ROWS_ENV, STEP_OUT_ROW_BLOCK))
    stages = int(os.environ.get(STEP_OUT_STAGES_ENV, STEP_OUT_STAGES))
    warps = int(os.environ.get(STEP_OUT_WARPS_ENV, STEP_OUT_WARPS))

    def launch(parts, first, last, sum_sq, warmup=False):
        programs = h * parts
        rows_per_part = triton.cdiv(triton.cdiv(N, parts), rb) * rb
        outs_per_prog = triton.cdiv(N, programs)
        pdl_here = on and first == 1
        args = (xbc, z, dt, conv_state, conv_weight, conv_bias if conv_bias is not None else xbc, ssm_state, A,
                D if D is not None else A, dt_bias if dt_bias is not None else A, norm_weight, out_weight,
                scratch[:nchan], scratch[nchan + 4 * h:], scratch[nchan:nchan + programs], counters[2:], res,
                entry_norm_weight, stream, scaled, sum_sq, counters,
                nchan, n, N, h, rows_per_part, outs_per_prog, float(dt_limit[0]), float(dt_limit[1]), float(norm_eps),
                nchan, 1.0 if out_scale is None else float(out_scale),
                xbc.stride(1), z.stride(1), dt.stride(1), conv_state.stride(1), conv_state.stride(2),
                conv_weight.stride(0), conv_weight.stride(1), ssm_state.stride(1), ssm_state.stride(2),
                ssm_state.stride(3), out_weight.stride(0))
        meta = dict(
            HEADDIM=p, K=K, HAS_CONV_BIAS=conv_bias is not None, HAS_D=D is not None,
            HAS_DT_BIAS=dt_bias is not None, SCALE=out_scale is not None, NQ=parts,
            RB=rb,
            UPCAST=not xbc.is_cuda and out_weight.dtype != torch.float32, IEEE=out_weight.dtype == torch.float32,
            BLOCK_N=triton.next_power_of_2(n), BLOCK_K=triton.next_power_of_2(K), BLOCK_H=triton.next_power_of_2(h),
            BLOCK_S=triton.next_power_of_2(programs), BLOCK_O=triton.next_power_of_2(outs_per_prog),
            FIRST=first, LAST=last, PDL=pdl_here, num_warps=warps, num_stages=stages, **pdl.kwargs(pdl_here))
        if warmup:
            return _mamba2_step_out_kernel.warmup(*args, grid=(programs,), **meta)
        _mamba2_step_out_kernel[(programs,)](*args, **meta)

    key = (xbc.device, h, p, n, N, K, xbc.dtype, conv_bias is None, D is None, dt_bias is None, out_scale is None,
           rb, stages, warps, on)
    parts = _PARTS.get(key)
    if parts is None:
        probe = torch.empty(4 * h, device=xbc.device, dtype=torch.float32)
        compiled = (lambda q: launch(q, 1, 3, probe[:h * q], warmup=True)) if xbc.is_cuda else None
        parts = _PARTS[key] = step_out_parts(h, p, xbc.device, compiled, warps)
    if parts == 0:
        return apart()
    sum_sq = torch.empty(h * parts, device=xbc.device, dtype=torch.float32)
    for first, last in (((1, 1), (2, 2), (3, 3)) if not xbc.is_cuda else ((1, 3),)):
        launch(parts, first, last, sum_sq)
    return EntryParts(scaled.view(*lead, N), stream.view(*lead, N), RowRms(sum_sq.view(*lead, -1), N, float(entry_eps)))
