"""A weight read into L2 while the latency-bound kernels before its projection run.

At batch 1 a decode step alternates between GEMVs that stream weights from HBM and the chains
between them (conv, state update, norms: a few microseconds of launch-bound kernels each) during
which HBM idles. Inside a CUDA-graph capture, `with l2_prefetch(weight):` forks a branch that reads
the start of `weight` (at most `L2_SHARE` of the L2) into L2 as soon as the kernels before the
block are done, runs beside the kernels inside the block, and joins before the block's end, so the
projection after it finds its weight, or its first part, in cache.

A hint: no value changes. Eagerly (where the launches cost more than the reads), off CUDA, or with
`MEGATRON_SSM_PREFETCH` unset or "0", the block just runs. "bulk": Hopper's TMA bulk prefetch;
"loads": a kernel of plain loads (kernels in `megatron_ssm.ops.triton.prefetch`).
"""
from __future__ import annotations

import contextlib
import os

import torch

PREFETCH_ENV = "MEGATRON_SSM_PREFETCH"
MODES = ("bulk", "loads")
L2_SHARE = 0.6  # of the L2 per prefetch: the projection's weight must not evict what it reads first

# Per device: the side stream and the loads kernel's sink, made on the eager warm-up call, before
# capture (a graph's kernels may not allocate outside its pool).
_SIDE: dict[torch.device, tuple[torch.cuda.Stream, torch.Tensor]] = {}


def prefetch_mode() -> str | None:
    mode = os.environ.get(PREFETCH_ENV, "0")
    if mode in ("", "0"):
        return None
    if mode not in MODES:
        raise ValueError(f"{PREFETCH_ENV}={mode!r}: expected one of {MODES} or 0")
    return mode


def prefetch_bytes(weight: torch.Tensor) -> int:
    """How much of `weight` one prefetch reads: a multiple of 16 within L2_SHARE of the L2."""
    l2 = torch.cuda.get_device_properties(weight.device).L2_cache_size
    return min(weight.numel() * weight.element_size(), int(L2_SHARE * l2)) // 16 * 16


def _usable(weight: torch.Tensor) -> bool:
    return weight.is_cuda and weight.is_contiguous() and weight.data_ptr() % 16 == 0


def _side(device: torch.device) -> tuple[torch.cuda.Stream, torch.Tensor]:
    side = _SIDE.get(device)
    if side is None:
        from .triton.prefetch import sink_size
        l2 = torch.cuda.get_device_properties(device).L2_cache_size
        slots = max(sink_size(l2, mode) for mode in MODES)
        side = _SIDE[device] = (torch.cuda.Stream(device), torch.zeros(slots, dtype=torch.int32, device=device))
    return side


@contextlib.contextmanager
def l2_prefetch(weight: torch.Tensor, enabled: bool = True):
    """enabled: False for a forward that gains nothing (prefill: its chain is long and not
    latency-bound), so that the same `with` serves both."""
    mode = prefetch_mode() if enabled else None
    if mode is None or not _usable(weight):
        yield
        return
    stream, sink = _side(weight.device)
    if not torch.cuda.is_current_stream_capturing():
        yield
        return
    from .triton.prefetch import prefetch

    main = torch.cuda.current_stream(weight.device)
    stream.wait_stream(main)
    with torch.cuda.stream(stream):
        prefetch(weight, prefetch_bytes(weight), mode, sink)
    try:
        yield
    finally:
        main.wait_stream(stream)
