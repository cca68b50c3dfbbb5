"""The reference ops' signatures, routed to the fastest implementation for the tensors at hand.

CUDA tensors go to our Triton kernels (`megatron_ssm.ops.triton`), except Mamba-2's chunked scan:
that takes mamba-ssm's Triton `mamba_chunk_scan_combined` when installed, else the torch reference,
whose chunked matrix form beat our Triton recurrence at n = 128 on an H100 (2.9 ms vs 4.5 ms for
2048 tokens of Mamba2-2.7B; mamba-ssm 0.76 ms; docs/benchmarks.md); and packed causal attention
(a hybrid's packed prefill), which takes torch's own flash varlen kernel in fp16/bf16 where torch
has it (ops/attention.py). Anything else (CPU tensors, no
triton) runs the torch reference, which defines the numbers every kernel is tested against.
`MEGATRON_SSM_KERNELS=torch` forces the reference everywhere, for A/B checks; it is read at each
call, so a test or a benchmark can flip it.

`linear` takes our skinny-GEMM kernel only for decode-sized inputs (at most `GEMV_MAX_ROWS` rows of
x: batch x tokens); batched and prefill GEMMs stay with cuBLAS. `MEGATRON_SSM_LINEAR=torch` sends
just this op back to F.linear (the A/B of the kernel alone); `=triton` takes the kernel for CPU
tensors too, which only Triton's interpreter (TRITON_INTERPRET=1) runs: the model tests' way in.

mamba-ssm's scan is called below its autograd wrapper (`_mamba_chunk_scan_combined_fwd`): inference
needs no saved tensors, and the wrapper's Python cost (~0.6 ms a layer on an H200's host) was most
of a short prompt's prefill time.

A kernel not yet run on a GPU (`VERIFY_FIRST`) is checked against the reference on its first call
per input signature and replaced by it where it fails.

Nothing here imports triton or mamba-ssm until a CUDA tensor arrives.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
from typing import Callable

import torch

# From the submodules, not the package, so that the package may itself export this module's ops.
from . import attention as _attention, conv1d as _conv, decode as _decode, norm as _norm, reduce as _reduce, rope as _rope
from . import ssd as _ssd
from .linear import linear as _ref_linear
from .selective_scan import selective_scan as _ref_selective_scan
from .selective_scan import selective_state_update as _ref_selective_state_update
from .varlen import check_packed, seq_index

log = logging.getLogger(__name__)

ENV = "MEGATRON_SSM_KERNELS"
LINEAR_ENV = "MEGATRON_SSM_LINEAR"
GEMV_MAX_ROWS = 16  # above this, cuBLAS's tiles beat a weight-streaming kernel (and tensor cores pay)

_REFERENCE: dict[str, Callable] = {
    "causal_conv1d": _conv.causal_conv1d,
    "causal_conv1d_update": _conv.causal_conv1d_update,
    "rms_norm": _norm.rms_norm,
    "add_rms_norm": _norm.add_rms_norm,
    "add_rms_norm_linear": _norm.add_rms_norm_linear,
    "linear_into_entry": _norm.linear_into_entry,
    "gated_rms_norm": _norm.gated_rms_norm,
    "linear": _ref_linear,
    "selective_scan": _ref_selective_scan,
    "selective_state_update": _ref_selective_state_update,
    "ssd_chunk_scan": _ssd.ssd_chunk_scan,
    "ssd_state_update": _ssd.ssd_state_update,
    "mamba1_decode_step": _decode.mamba1_decode_step,
    "mamba2_decode_step": _decode.mamba2_decode_step,
    "mamba2_step_into_entry": _decode.mamba2_step_into_entry,
    "packed_causal_attention": _attention.packed_causal_attention,
    "rotary_embedding": _rope.rotary_embedding,
    "decode_attention": _attention.decode_attention,
    "row_max": _reduce.row_max,
}

# Which mixers call their *_decode_step op at decode instead of the unfused chain of ops, read at
# each call. `MEGATRON_SSM_FUSED_DECODE` is a comma list of mixers ("mamba1,mamba2"), "1" for all or
# "0" for none. The default is what measured faster on the H200 (docs/benchmarks.md, "Fused decode
# steps"): Mamba-1's fused update (4.75 vs 5.03 ms a falcon-mamba-7b step at b1), and Mamba-2's kernel
# up to MAMBA2_FUSED_ROWS rows: with its loads first and its norm deferred to out_proj it beats the
# three kernels it replaces at b1 (a mamba2-2.7b step 2.252 vs 2.286 ms, session 11; before, 2.537 vs
# 2.343), not at b16 (6.38 vs 3.85 ms: each of a row's programs convolves the group's B and C again).
FUSED_DECODE_ENV = "MEGATRON_SSM_FUSED_DECODE"
FUSED_DECODE_DEFAULT = ("mamba1", "mamba2")
MIXERS = ("mamba1", "mamba2")

# Up to how many batch rows Mamba-1's fused decode also runs dt_proj inside the state update's launch
# (mamba1_decode_step's dt_weight): each program then reads its channels' rows of dt_proj once per
# batch row, which beats a projection kernel's launch only while rows are few. On the H200, a
# falcon-mamba-7b graphed step: 4.404 vs 4.477 ms at b1, 4.803 vs 4.578 at b4 (docs/benchmarks.md,
# session 9). `MEGATRON_SSM_FOLD_ROWS` overrides it; 0 turns it off.
FOLD_ROWS_ENV = "MEGATRON_SSM_FOLD_ROWS"
FOLD_ROWS_DEFAULT = 1

# Up to how many batch rows Mamba-2 takes its fused step where FUSED_DECODE selects it (above: why 1).
# `MEGATRON_SSM_MAMBA2_FUSED_ROWS` overrides it; 0 turns the fused step off.
MAMBA2_FUSED_ROWS_ENV = "MEGATRON_SSM_MAMBA2_FUSED_ROWS"
MAMBA2_FUSED_ROWS_DEFAULT = 1


# Up to how many rows a block's entry (residual add + RMS norm) runs inside its first projection's
# skinny-GEMM launch (add_rms_norm_linear): every program of that launch then reads its rows' whole
# stream once for the norm's scale and writes its slice of the normed x before its K loop. Off by
# default: on the H200 that costs each program more than the entry's own launch costs the step
# (graphed, same process: falcon-mamba-7b b1 4.682 vs 4.286 ms, mamba2-2.7b b1 2.766 vs 2.310;
# docs/benchmarks.md, session 10). `MEGATRON_SSM_ENTRY_ROWS=N` turns it on up to N rows.
ENTRY_ROWS_ENV = "MEGATRON_SSM_ENTRY_ROWS"
ENTRY_ROWS_DEFAULT = 0

# Up to how many rows a block's entry (residual add, the norm's sum of squares, the norm's weight)
# runs in the epilogue of the projection before it (linear_into_entry: a row-parallel output at TP 1,
# out_proj of the block before), its first projection then applying the norm's 1/rms after its
# product, so that a decode step has no entry kernel of its own. On the H200 (graphed steps, session
# 14) it saved 0.46 us a layer of mamba2-2.7b at b1 and 0.10-1.40 of falcon-mamba-7b b1 (two calls),
# and cost 0.34 at mamba2-2.7b b16; rows between were not measured. `MEGATRON_SSM_EXIT_ROWS=N` takes
# it up to N rows.
EXIT_ROWS_ENV = "MEGATRON_SSM_EXIT_ROWS"
EXIT_ROWS_DEFAULT = 1

# Whether Mamba-2's fused decode step leaves its gated norm's 1/rms to out_proj (one factor per row,
# applied after the product: mamba2_decode_step's defer_norm), where a rank's channels form one norm
# group; else the step's last program normalises the whole group itself. `MEGATRON_SSM_DEFER_NORM=0`
# turns it off.
DEFER_NORM_ENV = "MEGATRON_SSM_DEFER_NORM"


def defer_norm() -> bool:
    return os.environ.get(DEFER_NORM_ENV, "1").strip() != "0"


# Whether Mamba-2's one-row decode step with its norm deferred runs inside out_proj's launch, with
# the next block's entry (mamba2_step_into_entry), where out_proj's output goes to that entry (TP 1).
# Off: slower on the H200 (a mamba2-2.7b b1 graphed step 2.32 ms at its best tile against 2.19-2.20
# apart, docs/benchmarks.md, session 17). `MEGATRON_SSM_STEP_INTO_EXIT=1` turns it on.
STEP_INTO_EXIT_ENV = "MEGATRON_SSM_STEP_INTO_EXIT"


def step_into_exit() -> bool:
    return os.environ.get(STEP_INTO_EXIT_ENV, "0").strip() == "1"


def fold_rows() -> int:
    return _row_count(FOLD_ROWS_ENV, os.environ.get(FOLD_ROWS_ENV), FOLD_ROWS_DEFAULT)


def exit_rows() -> int:
    return _row_count(EXIT_ROWS_ENV, os.environ.get(EXIT_ROWS_ENV), EXIT_ROWS_DEFAULT)


def entry_rows() -> int:
    return _row_count(ENTRY_ROWS_ENV, os.environ.get(ENTRY_ROWS_ENV), ENTRY_ROWS_DEFAULT)


def mamba2_fused_rows() -> int:
    return _row_count(MAMBA2_FUSED_ROWS_ENV, os.environ.get(MAMBA2_FUSED_ROWS_ENV), MAMBA2_FUSED_ROWS_DEFAULT)


@functools.lru_cache(maxsize=None)
def _row_count(env: str, value: str | None, default: int) -> int:
    """A row-count variable's value; parsed once per value (eager decode asks per layer)."""
    if value is None or not value.strip():
        return default
    if not value.strip().isdigit():
        raise ValueError(f"{env}={value!r}: expected a whole number of rows (0: never)")
    return int(value)


def fused_decode(mixer: str) -> bool:
    """Whether this mixer ("mamba1" or "mamba2") takes its one *_decode_step op per decode token."""
    if mixer not in MIXERS:
        raise ValueError(f"unknown mixer {mixer!r}; expected one of {MIXERS}")
    return mixer in _fused_mixers(os.environ.get(FUSED_DECODE_ENV))


@functools.lru_cache(maxsize=None)
def _fused_mixers(value: str | None) -> frozenset[str]:
    """The mixers a value of FUSED_DECODE_ENV fuses; parsed once per value (eager decode asks per
    layer and token)."""
    if value is None:
        return frozenset(FUSED_DECODE_DEFAULT)
    value = value.strip()
    if value == "0":
        return frozenset()
    if value == "1":
        return frozenset(MIXERS)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in MIXERS]
    if unknown:
        raise ValueError(f"{FUSED_DECODE_ENV}={value!r}: unknown mixer(s) {unknown}; expected 0, 1 or a comma list of {MIXERS}")
    return frozenset(chosen)


@functools.lru_cache(maxsize=None)
def _triton_ops():
    """Our kernels, or None where triton is not installed."""
    try:
        from . import triton as ops
    except ImportError:
        return None
    return ops


@functools.lru_cache(maxsize=None)
def _mamba_chunk_scan_combined():
    """mamba-ssm's Triton SSD scan (its forward below the autograd wrapper), or None.

    `mamba_ssm/__init__.py` imports the CUDA extension selective_scan_cuda, so importing any
    submodule fails where mamba-ssm was installed without its extensions (MAMBA_SKIP_CUDA_BUILD) -
    the only way it installs on a machine without a matching compiler. The SSD kernels themselves
    are pure Triton. So when the normal import fails, load the package as a bare namespace (its
    __init__ not run), import the Triton submodule, and take the bare package out of sys.modules
    again so that anyone else's `import mamba_ssm` behaves as it would have without us.
    """
    name = "mamba_ssm.ops.triton.ssd_combined"
    try:
        return importlib.import_module(name)._mamba_chunk_scan_combined_fwd
    except ImportError:
        pass
    try:
        spec = importlib.util.find_spec("mamba_ssm")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.submodule_search_locations is None:
        return None
    bare = importlib.util.module_from_spec(spec)
    sys.modules["mamba_ssm"] = bare
    try:
        return importlib.import_module(name)._mamba_chunk_scan_combined_fwd
    except Exception:  # noqa: BLE001 - any failure here just means "not available"
        return None
    finally:
        if sys.modules.get("mamba_ssm") is bare:
            del sys.modules["mamba_ssm"]


def _mamba_ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_state=None,
                          dt_limit=(0.0, float("inf")), cu_seqlens=None):
    seq_idx = None
    if cu_seqlens is not None:
        check_packed(x, cu_seqlens, initial_state)
        seq_idx = seq_index(cu_seqlens, x.shape[1]).unsqueeze(0)
    out = _mamba_chunk_scan_combined()(
        x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state, seq_idx=seq_idx,
        cu_seqlens=cu_seqlens, dt_softplus=True, dt_limit=dt_limit)
    # (y, y before z, dt, dA_cumsum, chunk states, final state[, per-sequence states]). The
    # per-sequence states build on chunk states kept in the activations' dtype: for bf16 inputs
    # they carry one bf16 rounding that the unpacked final state does not.
    final = out[6].float() if cu_seqlens is not None else out[5]
    return out[0], final


def backend(op: str, like: torch.Tensor) -> str:
    """Which implementation `op` runs for tensors like `like`: 'mamba_ssm', 'triton', 'flash' (torch's
    own flash varlen attention) or 'torch'."""
    if os.environ.get(ENV, "").lower() == "torch":
        return "torch"
    if op in _GEMV_OPS and os.environ.get(LINEAR_ENV, "").lower() == "triton" and _rows(like) <= GEMV_MAX_ROWS:
        return "triton" if _triton_ops() is not None else "torch"  # CPU too: Triton's interpreter
    if not like.is_cuda:
        return "torch"
    if op == "packed_causal_attention":  # torch's own flash varlen kernel, not ours
        ok = like.dtype in (torch.float16, torch.bfloat16) and _attention.flash_works(like.device)
        return "flash" if ok else "torch"
    if op == "ssd_chunk_scan":
        return "mamba_ssm" if _mamba_chunk_scan_combined() is not None else "torch"
    if op in _GEMV_OPS and (os.environ.get(LINEAR_ENV, "").lower() == "torch" or _rows(like) > GEMV_MAX_ROWS):
        return "torch"
    return "triton" if _triton_ops() is not None else "torch"


_GEMV_OPS = ("linear", "add_rms_norm_linear", "linear_into_entry")  # what LINEAR_ENV and GEMV_MAX_ROWS route


def _rows(x: torch.Tensor) -> int:
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return rows


def implementation(op: str, like: torch.Tensor) -> Callable:
    """The function `op` resolves to for tensors like `like` (see `backend`)."""
    which = backend(op, like)
    if which == "mamba_ssm":
        return _mamba_ssd_chunk_scan
    if which == "flash":
        return _attention.packed_causal_attention_flash
    if which == "triton":
        kernel = getattr(_triton_ops(), op)
        return functools.partial(_verified, op, kernel) if op in VERIFY_FIRST else kernel
    return _REFERENCE[op]


# Kernels not yet run on a GPU: each one's first call per (device, input shapes and dtypes) runs
# eagerly beside the reference, and a kernel that raises or disagrees is replaced by the reference
# there, with one warning, so that an unvalidated kernel cannot break a model that worked without it.
# An op leaves this set once the GPU suite has passed it (tests/test_kernels_gpu.py): rotary embedding
# and decode attention did in session 8, so none is in it now.
VERIFY_FIRST: set[str] = set()
VERIFY_RTOL = 2e-2  # of the reference's largest magnitude: bf16's rounding, not a wrong result
_VERIFIED: dict[tuple, bool] = {}


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else type(a) for a in args)


def _verified(op: str, kernel: Callable, *args):
    key = (op, _signature(args))
    ok = _VERIFIED.get(key)
    if ok is None:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return _REFERENCE[op](*args)  # never checked inside a capture (the engine's warm-up comes first)
        want = _REFERENCE[op](*args)
        try:
            got = kernel(*args)
            err = (got.float() - want.float()).abs().max().item()
            ok = bool(err <= VERIFY_RTOL * max(want.float().abs().max().item(), 1e-6))
            why = f"differs from the reference by {err:.3g}"
        except Exception as e:  # noqa: BLE001 - any failure: the reference keeps the model running
            ok, why = False, f"raised {type(e).__name__}: {e}"
        _VERIFIED[key] = ok
        if not ok:
            log.warning("the %s kernel %s for inputs %s: the reference runs there instead", op, why, key[1])
            return want
        return got
    return kernel(*args) if ok else _REFERENCE[op](*args)


# ---- the ops, with the references' signatures and docs ----------------------------------------

def causal_conv1d(x, weight, bias=None, initial_state=None, silu=True, cu_seqlens=None):
    return implementation("causal_conv1d", x)(x, weight, bias, initial_state, silu, cu_seqlens)


def causal_conv1d_update(x, conv_state, weight, bias=None, silu=True):
    return implementation("causal_conv1d_update", x)(x, conv_state, weight, bias, silu)


def linear(x, weight, bias=None, scale=None, row_scale=None):
    return implementation("linear", x)(x, weight, bias, scale, row_scale)


def rms_norm(x, weight, eps):
    return implementation("rms_norm", x)(x, weight, eps)


def add_rms_norm_linear(residual, delta, norm_weight, eps, residual_dtype, weight, bias=None, scale=None):
    """One kernel up to entry_rows() rows; above, the two ops it is made of (each its own kernel)."""
    if _rows(residual) > entry_rows():
        normed, h = add_rms_norm(residual, delta, norm_weight, eps, residual_dtype)
        return linear(normed, weight, bias, scale), h
    return implementation("add_rms_norm_linear", residual)(residual, delta, norm_weight, eps, residual_dtype,
                                                           weight, bias, scale)


def linear_into_entry(x, weight, row_scale, residual, norm_weight, eps, residual_dtype, scale=None):
    return implementation("linear_into_entry", x)(x, weight, row_scale, residual, norm_weight, eps, residual_dtype,
                                                  scale)


def add_rms_norm(residual, delta, weight, eps, residual_dtype):
    return implementation("add_rms_norm", residual)(residual, delta, weight, eps, residual_dtype)


def gated_rms_norm(y, gate, weight, eps, group_size, reduce_sum_of_squares=None):
    return implementation("gated_rms_norm", y)(y, gate, weight, eps, group_size, reduce_sum_of_squares)


def selective_scan(u, dt, A, B, C, D=None, z=None, dt_bias=None, initial_state=None, cu_seqlens=None):
    return implementation("selective_scan", u)(u, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)


def selective_state_update(state, u, dt, A, B, C, D=None, z=None, dt_bias=None):
    return implementation("selective_state_update", u)(state, u, dt, A, B, C, D, z, dt_bias)


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_state=None,
                   dt_limit=(0.0, float("inf")), cu_seqlens=None):
    return implementation("ssd_chunk_scan", x)(x, dt, A, B, C, chunk_size, D, dt_bias, initial_state,
                                               dt_limit, cu_seqlens)


def ssd_state_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_limit=(0.0, float("inf"))):
    return implementation("ssd_state_update", x)(state, x, dt, A, B, C, D, dt_bias, dt_limit)


def mamba2_decode_step(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D=None, dt_bias=None,
                       dt_limit=(0.0, float("inf")), norm_weight=None, norm_eps=1e-5, defer_norm=False,
                       group_size=None, reduce_sum_of_squares=None):
    return implementation("mamba2_decode_step", xbc)(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A,
                                                     D, dt_bias, dt_limit, norm_weight, norm_eps, defer_norm,
                                                     group_size, reduce_sum_of_squares)


def mamba2_step_into_entry(xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, dt_limit,
                           norm_weight, norm_eps, out_weight, out_scale, residual, entry_norm_weight, entry_eps,
                           residual_dtype):
    return implementation("mamba2_step_into_entry", xbc)(
        xbc, z, dt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, dt_limit, norm_weight, norm_eps,
        out_weight, out_scale, residual, entry_norm_weight, entry_eps, residual_dtype)


def packed_causal_attention(q, k, v, cu_seqlens, scale=None):
    return implementation("packed_causal_attention", q)(q, k, v, cu_seqlens, scale)


def decode_attention(q, k_cache, v_cache, positions, scale=None):
    return implementation("decode_attention", q)(q, k_cache, v_cache, positions, scale)


def rotary_embedding(x, positions, inv_freq):
    return implementation("rotary_embedding", x)(x, positions, inv_freq)


def mamba1_decode_step(state, u, dt, A, B, C, D=None, z=None, dt_bias=None, norm_eps=None, dt_in=None,
                       dt_weight=None):
    return implementation("mamba1_decode_step", u)(state, u, dt, A, B, C, D, z, dt_bias, norm_eps, dt_in, dt_weight)


def row_max(x):
    return implementation("row_max", x)(x)


for _name, _ref in _REFERENCE.items():
    globals()[_name].__doc__ = _ref.__doc__

__all__ = list(_REFERENCE) + ["backend", "implementation", "ENV", "FUSED_DECODE_ENV", "fused_decode", "LINEAR_ENV",
                               "GEMV_MAX_ROWS"]
