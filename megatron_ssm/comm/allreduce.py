"""The all-reduce applied to row-parallel outputs, behind one callable interface.

`make_allreduce(kind)` returns an object called as `allreduce(tensor, group) -> tensor`:
- "exact": torch.distributed.all_reduce (NCCL on GPU, gloo on CPU), in place;
- "int8" / "fp8" / "fp16": a two-shot block-quantised all-reduce (lossy, fewer bytes on the wire);
- "int8-symm" / ...: the same bits, its parts moved through symmetric memory instead of NCCL;
- "auto": exact for small messages (latency-bound: the extra kernels and collectives of the quantised
  path cost more than the bytes they save), quantised from a size threshold up.

`allreduce.start(tensor, group)` begins the same sum without waiting for it and returns a
`PendingAllReduce`; its `wait()` returns the result, ordered before whatever the caller runs next
on its stream. Prefill uses it to overlap one micro-chunk's reduction with the next one's compute.

Every rank of a group must make the same choice for the same call, or the collectives mismatch and
hang: the choice depends only on the message size and a threshold that is the same on every rank
(a per-device-kind table, or `calibrate`, which agrees on its timings across the group).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import torch
import torch.distributed as dist

from . import quantize
from .quantize import FORMATS

# "<fmt>-symm": the quantised two-shot over symmetric memory (symmetric.py), not NCCL.
ALLREDUCE_CHOICES = ("exact", "oneshot", "int8", "fp8", "fp16", "int8-symm", "fp8-symm", "fp16-symm", "auto")

# Message size (bytes) from which the quantised path is faster, by a substring of the CUDA device's
# name, then by group size (a plain number: every size). A device or size not listed (and every
# CPU) stays exact: run `calibrate` on a new machine. H100 SXM over NVLink (NCCL 2.28, torch 2.11,
# bf16, fused int8 kernels; docs/benchmarks.md, 2026-11-26): on 2 GPUs int8 is slower at every size;
# on 4 GPUs it beat NCCL by 5% at 128 MiB in isolation, but prefill with int8 from 1 MiB up was 2%
# slower end to end (kernels competing with the GEMMs), so H100s stay exact.
THRESHOLDS: Mapping[str, float | Mapping[int, float]] = MappingProxyType(
    {"H100 80GB HBM3": MappingProxyType({2: math.inf, 4: math.inf})})


class PendingAllReduce:
    """An all-reduce in flight. `wait()` returns the sum; on CUDA it only makes the current stream
    wait for it (no host sync), so later kernels on that stream see the result."""

    def __init__(self, result: torch.Tensor, work=None, stream: torch.cuda.Stream | None = None):
        self._result, self._work, self._stream = result, work, stream

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        if self._stream is not None:
            current = torch.cuda.current_stream(self._result.device)
            current.wait_stream(self._stream)
            # Allocated on the side stream: without this the allocator could hand its memory to the
            # side stream again while the current stream still reads it.
            self._result.record_stream(current)
        return self._result


class AllReduce:
    """Sum `tensor` over `group`; returns the result (same shape and dtype), maybe `tensor` itself."""

    name: str = "allreduce"

    def __call__(self, tensor: torch.Tensor, group) -> torch.Tensor:
        raise NotImplementedError

    def start(self, tensor: torch.Tensor, group) -> PendingAllReduce:
        """Begin the sum and return at once. On CUDA the whole reduction (kernels and collectives)
        runs on a side stream, overlapping the caller's next kernels; elsewhere it runs inline.
        Every rank must start the same reductions in the same order, as for `__call__`."""
        if not tensor.is_cuda or dist.get_world_size(group) == 1:
            return PendingAllReduce(self(tensor, group))
        side = _side_stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))
        with torch.cuda.stream(side):
            out = self(tensor, group)
        tensor.record_stream(side)
        return PendingAllReduce(out, stream=side)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class ExactAllReduce(AllReduce):
    name = "exact"

    def __call__(self, tensor: torch.Tensor, group) -> torch.Tensor:
        if dist.get_world_size(group) == 1:
            return tensor
        # Collectives need contiguous memory; a strided view is reduced through a copy.
        out = tensor if tensor.is_contiguous() else tensor.contiguous()
        dist.all_reduce(out, group=group)
        return out

    def start(self, tensor: torch.Tensor, group) -> PendingAllReduce:
        if dist.get_world_size(group) == 1:
            return PendingAllReduce(tensor)
        out = tensor if tensor.is_contiguous() else tensor.contiguous()
        # NCCL runs it on its own stream (gloo on its own thread); wait() orders the caller after it.
        return PendingAllReduce(out, work=dist.all_reduce(out, group=group, async_op=True))


class QuantizedAllReduce(AllReduce):
    """Two-shot all-reduce over block-quantised data.

    Each rank quantises its whole tensor and sends chunk j to rank j (reduce-scatter as an
    all-to-all, since NCCL cannot sum int8 codes with per-block scales); rank j dequantises the
    world_size pieces of its chunk, sums them in fp32, requantises the sum and all-gathers it. Every
    rank dequantises the same gathered bytes, so all ranks get bit-identical results. The codes and
    their scales travel in one uint8 buffer: two collectives per call rather than four, since small
    messages are latency-bound.

    The local work is three steps, quantize_pack / reduce_requantise / unpack_dequantise: plain torch
    in quantize.py (which defines the bits), one fused Triton kernel each on CUDA, so that the input,
    the packed buffers and the output are each touched about once and no fp32 copy reaches memory.
    """

    def __init__(self, fmt: str = "int8", block: int = 128, fused: bool = True):
        """fused: on CUDA, run the three steps as Triton kernels when Triton imports (else plain torch)."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown quantised all-reduce format {fmt!r}; expected one of {FORMATS}")
        if not isinstance(block, int) or block <= 0:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.fmt, self.block, self.name = fmt, block, fmt
        self.fused = fused
        self._kernels = None  # the module with this instance's CUDA quantise functions, found on first use

    def __repr__(self) -> str:
        return f"QuantizedAllReduce(fmt={self.fmt!r}, block={self.block})"

    def __call__(self, tensor: torch.Tensor, group) -> torch.Tensor:
        world = dist.get_world_size(group)
        if world == 1 or tensor.numel() == 0:
            return tensor
        ops = self._module(tensor)
        # Reduce-scatter: row j of `sent` is this rank's chunk j (quantised, codes then scales), row j
        # of `got` is rank j's copy of the chunk this rank owns. The input is read in place; the
        # zero padding up to whole chunks exists only in the kernels.
        sent = ops.quantize_pack(tensor, self.fmt, self.block, world)
        got = torch.empty_like(sent)
        dist.all_to_all_single(got, sent, group=group)

        # The owner's sum, requantised straight into its row of the all-gather buffer, which is then
        # gathered in place (NCCL and gloo both accept an input that is the output's own slot).
        gathered = torch.empty_like(sent)
        mine = gathered[dist.get_rank(group)]
        ops.reduce_requantise(got, self.fmt, self.block, mine)
        dist.all_gather_into_tensor(gathered.view(-1), mine, group=group)
        return ops.unpack_dequantise(gathered, self.fmt, self.block, tensor.shape, tensor.dtype)

    def _module(self, x: torch.Tensor):
        """Where the quantise functions come from for x: triton_quantize for CUDA tensors if Triton
        imports (never imported for CPU ones), else quantize. Both give the same bits."""
        if not (x.is_cuda and self.fused):
            return quantize
        if self._kernels is None:
            try:
                from . import triton_quantize as kernels
            except ImportError:
                kernels = quantize
            self._kernels = kernels
        return self._kernels


class AutoAllReduce(AllReduce):
    """Exact below `threshold` bytes, quantised (`fmt`, `block`) from it up. The exact sums of
    small CUDA messages take the one-shot symmetric-memory kernel (oneshot.py), the rest NCCL.

    threshold None: looked up in THRESHOLDS by the tensor's device name; CPU tensors and unlisted
    devices stay exact. math.inf: always exact; 0: always quantised.
    """

    name = "auto"

    def __init__(self, threshold: float | None = None, fmt: str = "int8", block: int = 128,
                 table: Mapping[str, float] | None = None):
        if threshold is not None and threshold < 0:
            raise ValueError(f"threshold must be >= 0 bytes, got {threshold}")
        self.threshold = threshold
        self.table = THRESHOLDS if table is None else table
        from .oneshot import OneShotAllReduce  # imports this module

        self.exact = OneShotAllReduce()
        self.quantized = QuantizedAllReduce(fmt, block)
        # a device name query on every call adds up
        self._looked_up: dict[tuple[torch.device, int | None], float] = {}

    def __repr__(self) -> str:
        return f"AutoAllReduce(threshold={self.threshold}, quantized={self.quantized!r})"

    def threshold_for(self, device: torch.device, world: int | None = None) -> float:
        if self.threshold is not None:
            return self.threshold
        if (device, world) not in self._looked_up:
            self._looked_up[device, world] = table_threshold(device, self.table, world)
        return self._looked_up[device, world]

    def pick(self, tensor: torch.Tensor, world: int | None = None) -> AllReduce:
        nbytes = tensor.numel() * tensor.element_size()
        return self.quantized if nbytes >= self.threshold_for(tensor.device, world) else self.exact

    def __call__(self, tensor: torch.Tensor, group) -> torch.Tensor:
        return self.pick(tensor, dist.get_world_size(group))(tensor, group)

    def start(self, tensor: torch.Tensor, group) -> PendingAllReduce:
        return self.pick(tensor, dist.get_world_size(group)).start(tensor, group)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One stream per device for reductions started with `start`, so they queue behind each other
    (as every rank issues them) and beside the compute stream."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def table_threshold(device: torch.device, table: Mapping | None = None, world: int | None = None) -> float:
    """The table's threshold for `device` in a group of `world` ranks (math.inf: never quantise)."""
    if device.type != "cuda":
        return math.inf
    return threshold_by_name(torch.cuda.get_device_name(device), THRESHOLDS if table is None else table, world)


def threshold_by_name(device_name: str, table: Mapping, world: int | None = None) -> float:
    """The first entry whose key is part of the device's name (math.inf if none); an entry that maps
    group sizes to thresholds is looked up by `world` (math.inf if not there)."""
    entry = next((t for key, t in table.items() if key in device_name), math.inf)
    return entry.get(world, math.inf) if isinstance(entry, Mapping) else entry


def make_allreduce(kind: str, **kw) -> AllReduce:
    """kind in ALLREDUCE_CHOICES; kw go to the class (fmt/block for quantised, threshold for auto)."""
    if kind == "exact":
        return ExactAllReduce(**kw)
    if kind == "oneshot":
        from .oneshot import OneShotAllReduce

        return OneShotAllReduce(**kw)
    if kind in FORMATS:
        return QuantizedAllReduce(fmt=kind, **kw)
    if kind.endswith("-symm") and kind.removesuffix("-symm") in FORMATS:
        from .symmetric import SymmetricQuantizedAllReduce

        return SymmetricQuantizedAllReduce(fmt=kind.removesuffix("-symm"), **kw)
    if kind == "auto":
        return AutoAllReduce(**kw)
    raise ValueError(f"unknown all-reduce kind {kind!r}; expected one of {ALLREDUCE_CHOICES}")


def calibrate(group, sizes: Sequence[int], quantized: AllReduce | None = None,
              dtype: torch.dtype = torch.bfloat16, device: torch.device | None = None,
              iters: int = 20, warmup: int = 3) -> float:
    """Time exact and quantised all-reduces at each message size (bytes) and return the smallest size
    from which the quantised one is faster at every measured size (math.inf if none).

    Collective: every rank of `group` must call it with the same arguments. Each timing is the
    slowest rank's, so all ranks return the same threshold.
    """
    quantized = quantized or QuantizedAllReduce()
    exact = ExactAllReduce()
    if device is None:
        on_gpu = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    sizes = sorted(sizes)
    times = torch.zeros(len(sizes), 2, dtype=torch.float64)
    for i, size in enumerate(sizes):
        x = torch.randn(max(1, size // dtype.itemsize), dtype=dtype, device=device)
        for j, op in enumerate((exact, quantized)):
            times[i, j] = _time(op, x, group, iters, warmup)
    times = times.to(device)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    faster = (times[:, 1] < times[:, 0]).tolist()
    threshold = math.inf
    for size, wins in zip(reversed(sizes), reversed(faster)):
        if not wins:
            break
        threshold = size
    return threshold


def _time(op: AllReduce, x: torch.Tensor, group, iters: int, warmup: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        op(x.clone(), group)
    dist.barrier(group=group)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        # A fresh copy each time: the exact path works in place, and repeated sums would overflow.
        op(x.clone(), group)
    sync()
    return (time.perf_counter() - start) / iters
