#!/usr/bin/env python3
"""Latency and bus bandwidth of every all-reduce variant against message size, on GPUs.

    torchrun --nproc_per_node N tools/comm_benchmark.py [--sizes-kib 8,64,512,2048,8192,32768,131072]
        [--variants exact,int8,fp8,fp16,auto,int8:torch,int8-symm]

A variant is an `--allreduce` kind; FORMAT:torch is that quantised all-reduce on its plain torch
steps instead of the fused Triton kernels (the numbers both must give); FORMAT-symm moves the same
parts over symmetric memory instead of NCCL (checked bit for bit against it). Before timing, every
quantised format's fused result is checked bit for bit against the torch steps' at each size.
Each variant is timed two ways: launched eagerly (CUDA events around one call; median of --iters,
slowest rank), and replayed from a CUDA graph (as decode runs it: mean of --iters replays). Bus
bandwidth = 2 (N-1)/N x bytes / time, NCCL's convention. Rank 0 prints a markdown table and the
message size above which `auto` would pick int8 (calibrated here).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def eager_us(op, x, group, iters):
    times = []
    for _ in range(iters + 5):
        y = x.clone()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        op(y, group)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times[5:])[iters // 2]


def graph_us(op, x, group, iters):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            op(x.clone(), group)
    torch.cuda.current_stream().wait_stream(side)
    buf = x.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        op(buf, group)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / iters


def fused_matches_torch(fmt, x, group) -> bool:
    """On every rank, the fused kernels give the torch steps' bits (NaN payloads aside)."""
    from megatron_ssm.comm import QuantizedAllReduce

    a = QuantizedAllReduce(fmt)(x.clone(), group)
    b = QuantizedAllReduce(fmt, fused=False)(x.clone(), group)
    ints = {2: torch.int16, 4: torch.int32}[x.element_size()]
    same = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0).view(ints), b.nan_to_num(0.0).view(ints))
    flag = torch.tensor(float(same), device=x.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def oneshot_error(x, group) -> float:
    """Largest |oneshot - NCCL| relative to the sum's magnitude, slowest rank (both are exact sums;
    only the order of the additions differs)."""
    from megatron_ssm.comm import ExactAllReduce, OneShotAllReduce

    a = OneShotAllReduce()(x.clone(), group).float()
    b = ExactAllReduce()(x.clone(), group).float()
    return slowest(((a - b).abs().max() / b.abs().max()).item(), x.device)


def make_variant(name: str):
    from megatron_ssm.comm import QuantizedAllReduce, make_allreduce

    if name.endswith(":torch"):
        return QuantizedAllReduce(name.removesuffix(":torch"), fused=False)
    return make_allreduce(name)


def slowest(t: float, device) -> float:
    v = torch.tensor(t, device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return v.item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-kib", default="8,64,256,512,2048,8192,32768,131072")
    ap.add_argument("--variants", default="exact,oneshot,int8,fp8,fp16")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    from megatron_ssm.comm import QuantizedAllReduce, calibrate
    from megatron_ssm.parallel import init_distributed, shutdown

    tp = init_distributed()
    world, dev = tp.size, tp.device
    variants = args.variants.split(",")
    ops = {v: make_variant(v) for v in variants}
    if tp.is_first:
        print(f"{torch.cuda.get_device_name()} x{world}, bf16 messages; us per call (bus GB/s)")
        print("| KiB | " + " | ".join(f"{v} eager | {v} graph" for v in variants) + " |")
        print("|---|" + "---|---|" * len(variants))
    sizes = [int(k) for k in args.sizes_kib.split(",")]
    for kib in sizes:
        x = torch.randn(kib * 512, device=dev, dtype=torch.bfloat16) * (tp.rank + 1)
        for fmt in ("int8", "fp8", "fp16"):
            if not fused_matches_torch(fmt, x, tp.group) and tp.is_first:
                print(f"WARNING: {fmt} at {kib} KiB: the fused kernels and the torch steps differ", flush=True)
        for v in (v for v in variants if v.endswith("-symm")):  # the same bits as the NCCL transport
            same = torch.equal(ops[v](x.clone(), tp.group), QuantizedAllReduce(v.removesuffix("-symm"))(x.clone(), tp.group))
            if not slowest(float(not same), dev) == 0.0 and tp.is_first:
                print(f"WARNING: {v} at {kib} KiB differs from the NCCL two-shot's bits", flush=True)
        if "oneshot" in variants and (err := oneshot_error(x, tp.group)) > 1e-2 and tp.is_first:
            print(f"WARNING: oneshot at {kib} KiB differs from NCCL by {err:.2e} of the sum", flush=True)
        cells = []
        for v in variants:
            e = slowest(eager_us(ops[v], x, tp.group, args.iters), dev)
            g = slowest(graph_us(ops[v], x, tp.group, args.iters), dev)
            bw = lambda t: 2 * (world - 1) / world * x.nbytes / (t * 1e-6) / 1e9  # noqa: E731
            cells.append(f"{e:.1f} ({bw(e):.0f}) | {g:.1f} ({bw(g):.0f})")
        if tp.is_first:
            print(f"| {kib} | " + " | ".join(cells) + " |", flush=True)
    threshold = calibrate(tp.group, [k * 1024 for k in sizes], quantized=QuantizedAllReduce("int8"))
    if tp.is_first:
        print(f"auto: int8 above {threshold} bytes on this machine")
    shutdown()


if __name__ == "__main__":
    main()
