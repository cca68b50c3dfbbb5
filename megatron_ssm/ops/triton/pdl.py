"""Programmatic dependent launch (Hopper): in a captured decode step, each kernel starts while the
one before it drains.

At batch 1 a decode step is ~6 kernels a layer, each a few microseconds, and each pays its launch,
its programs' scheduling and its first loads' latency after the kernel before has fully ended. With
PDL, a kernel's programs are scheduled as soon as the kernel before calls
griddepcontrol.launch_dependents (ours do, first thing), wait in griddepcontrol.wait until that
kernel has ended and its writes are visible, and only then read anything another kernel writes, so
the waiting replaces the launch gap. A kernel after one not launched this way (cuBLAS, a
torch op) starts when that one ends, as without PDL; transitively, every kernel still sees all the
writes of every kernel before it.

It is on by default inside CUDA-graph capture only (eager launches gain nothing from it);
`MEGATRON_SSM_PDL=0` turns it off. On the H200 it made a graphed decode step 9-16% shorter at batch 1
(mamba2-2.7b, falcon-mamba-7b) and 0-4% at b16/b32 (docs/benchmarks.md, session 7). The first use on
a Hopper device probes it eagerly: two chained PDL launches, then the same
captured in a graph and replayed, must give the right values; otherwise it stays off there (a
failure inside the engine's capture could not be undone).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

from .runtime import INTERPRETED

ENV = "MEGATRON_SSM_PDL"
EARLY_ENV = "MEGATRON_SSM_EARLY_LOADS"
_OK: dict[torch.device, bool] = {}


@triton.jit
def enter(PDL: tl.constexpr):
    """A kernel's first step: wait for the kernel before (PDL), then let the next one be scheduled."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def requested() -> bool:
    return os.environ.get(ENV, "1") != "0"


def use(device: torch.device) -> bool:
    """Whether a launch on `device` now is a programmatic dependent: requested, supported, and
    inside graph capture. Called eagerly first (the engine's warm-up step), which probes."""
    if not requested() or device.type != "cuda":
        return False
    if not torch.cuda.is_current_stream_capturing():
        supported(device)
        return False
    return _OK.get(device, False)


def early_loads(pdl: bool) -> bool:
    """Whether a decode-step kernel launched as a programmatic dependent issues the loads that do not
    depend on the kernel before (its own SSM and conv state, written by this kernel a step ago;
    weights) ahead of its griddepcontrol.wait, so they stream while the projection before it drains
    and only that projection's output is left to wait for. Safe: when a PDL kernel starts, the
    kernel before it has passed its own wait, so every kernel before that one has ended and its
    writes are visible. On the H200 it saved 0.34 / 0.47 us a layer of mamba2-2.7b / falcon-mamba-7b
    at b1 and 0.86 at mamba2-2.7b b16 (graphed steps, session 14). `MEGATRON_SSM_EARLY_LOADS=0`:
    every load after the wait, as before."""
    return pdl and os.environ.get(EARLY_ENV, "1") != "0"


def kwargs(pdl: bool) -> dict:
    """The launch argument for a programmatic dependent (Triton's `launch_pdl`)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def _probe_kernel(x_ptr, y_ptr, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
    enter(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0 + 1.0, mask=mask)


def _chain(x: torch.Tensor) -> torch.Tensor:
    y, z = torch.empty_like(x), torch.empty_like(x)
    for src, dst in ((x, y), (y, z)):  # the second reads what the first writes
        _probe_kernel[(triton.cdiv(x.numel(), 1024),)](src, dst, x.numel(), PDL=True, BLOCK=1024, **kwargs(True))
    return z


def supported(device: torch.device) -> bool:
    """Whether PDL launches work on `device` (found out once, eagerly, never during capture)."""
    ok = _OK.get(device)
    if ok is None:
        ok = False
        if (gdc_wait is not None and not INTERPRETED and device.type == "cuda"
                and torch.cuda.get_device_capability(device)[0] >= 9 and not torch.cuda.is_current_stream_capturing()):
            try:
                x = torch.randint(-1000, 1000, (1 << 16,), device=device).float()  # exact in fp32
                eager = _chain(x)
                side = torch.cuda.Stream(device)
                side.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(side):
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=side):
                        captured = _chain(x)
                    graph.replay()
                torch.cuda.current_stream(device).wait_stream(side)
                torch.cuda.synchronize(device)
                want = x * 4.0 + 3.0
                ok = bool(torch.equal(eager, want) and torch.equal(captured, want))
            except Exception:  # noqa: BLE001 - any failure means: no PDL here
                ok = False
        _OK[device] = ok
    return ok
