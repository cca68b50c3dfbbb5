#!/usr/bin/env python3
"""Throughput and latency of tensor-parallel generation, on synthetic weights at real shapes.

    torchrun --nproc_per_node N tools/benchmark.py --config configs/mamba2-2.7b.yaml \
        --batch 1,16,64 --prompt 512 --new 128 --json-out bench.jsonl

Runs through the same Engine users get (batched prefill, CUDA-graph decode). For each workload:
TTFT (prefill of the whole batch to its first tokens), inter-token latency (mean decode step),
generated and total tokens/s, peak GPU memory, and for decode the fraction of the HBM floor
(weights + states read and written once per step, over the copy bandwidth measured at start).
Rank 0 prints a line per workload and appends JSON lines to --json-out.

    # context-parallel prefill: TTFT of one 128k-token prompt on TP2 x CP2 (4 GPUs)
    torchrun --nproc_per_node 4 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1 \
        --prompt 131072 --new 16 --context-parallel-size 2 --max-total-tokens 200000
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import yaml


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def load_config(path: str):
    from megatron_ssm.config import SSMConfig

    spec = yaml.safe_load(Path(path).read_text())
    return spec["name"], SSMConfig.from_hf(spec["hf_config"])


@torch.no_grad()
def random_weights_(model, seed: int) -> None:
    """Synthetic weights of realistic scale (NaN-free, decays in range); the same on every rank's
    shard is not needed for speed."""
    g = torch.Generator(device=model.embeddings.weight.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.rand(p.shape, generator=g, device=p.device) * 15 + 1))
        elif name.endswith(".D") or "norm" in name:
            p.fill_(1.0)
        elif name.endswith("dt_bias") or name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(p.shape, generator=g, device=p.device) * (math.log(0.1) - math.log(1e-3))
                           + math.log(1e-3))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        else:
            p.normal_(0.0, 0.02, generator=g)


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    src = torch.empty(1 << 28, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        dst.copy_(src)
    torch.cuda.synchronize()
    return 2 * src.nbytes * 20 / (time.perf_counter() - t)


def allreduce_latency(tp, shape, dtype, device, op) -> float:
    """Seconds per all-reduce of `shape` on the TP group by `op` (the model's row-parallel
    reduction), replayed from a CUDA graph."""
    if tp.size == 1:
        return 0.0
    x = torch.randn(shape, dtype=dtype, device=device)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            op(x, tp.group)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(50):
            op(x, tp.group)
    g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 250


def reductions_per_step(model) -> int:
    """TP all-reduces in one forward: every row-parallel output (a block's own, and a shared block's
    at each position that applies it), plus Mamba-2's norm-group reduction where a group spans ranks."""
    from megatron_ssm.model.layers import RowParallelLinear

    def rows(module) -> int:
        return sum(isinstance(m, RowParallelLinear) for m in module.modules())

    count = 0
    for layer in model.layers:
        count += rows(layer) + (rows(layer.shared) if hasattr(layer, "shared") else 0)
        mixer = getattr(layer, "mixer", None)
        count += getattr(mixer, "shared_group", None) is not None
    return count


def make_engine(model, batch: int, prompt: int, args, cp=None):
    from megatron_ssm.inference.engine import Engine, EngineConfig

    chunk = max(256, args.prefill_tokens // batch)
    # max_sequence_length sizes a hybrid's KV cache: exactly what the workloads need
    return Engine(model, EngineConfig(max_batch=batch, prefill_chunk=chunk, max_prefill_tokens=batch * prompt,
                                      max_sequence_length=prompt + max(args.new), cuda_graphs=not args.no_graphs,
                                      pack_tokens=0 if args.no_pack else 8192,
                                      decode_ahead=args.decode_ahead,
                                      context_parallel_min_tokens=args.context_parallel_min_tokens), cp=cp)


def run_workload(engine, batch: int, prompt: int, new: int, seed: int) -> dict:
    from megatron_ssm.inference.engine import Request

    model = engine.model
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.vocab_size
    reqs = [Request(torch.randint(0, vocab, (prompt,), generator=g).tolist(), new) for _ in range(batch)]
    for r in reqs:
        engine.add_request(r)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # The plain path prefills the whole batch in one step; a context-parallel prefill takes a step
    # per cp x chunk tokens (and one prompt at a time): TTFT is when the last first token is out.
    firsts = set()
    while len(firsts) < batch:
        firsts.update(o.request_id for o in engine.step())
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    step = (total - ttft) / max(steps, 1)
    return dict(batch=batch, prompt=prompt, new=new, ttft_ms=ttft * 1e3, step_ms=step * 1e3,
                decode_tok_s=batch / step if steps else 0.0, gen_tok_s=batch * new / total,
                total_tok_s=batch * (prompt + new) / total, total_s=total)


def linear_variants(spec: str):
    """Yields each --linear variant with MEGATRON_SSM_LINEAR set for it (restored afterwards); ''
    yields None once and changes nothing."""
    from megatron_ssm.ops.dispatch import LINEAR_ENV

    pdl_env = "MEGATRON_SSM_PDL"  # megatron_ssm.ops.triton.pdl.ENV (that module imports triton)
    variants = {"torch": {LINEAR_ENV: "torch", pdl_env: "0"}, "kernel": {LINEAR_ENV: "", pdl_env: "0"},
                "kernel-pdl": {LINEAR_ENV: "", pdl_env: "1"}}
    names = [v for v in spec.split(",") if v]
    if not names:
        yield None
        return
    for name in names:
        if name not in variants:
            raise SystemExit(f"--linear takes {', '.join(variants)}, not {name!r}")
    before = {k: os.environ.get(k) for k in (LINEAR_ENV, pdl_env)}
    try:
        for name in names:
            os.environ.update(variants[name])
            yield name
    finally:
        for k, v in before.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", required=True, help="model YAML from configs/ (repeatable)")
    ap.add_argument("--batch", type=ints, default=[1, 8, 32, 64, 128])
    ap.add_argument("--prompt", type=ints, default=[512, 2048, 8192])
    ap.add_argument("--new", type=ints, default=[128, 256])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--prefill-tokens", type=int, default=32768, help="tokens per prefill forward (whole batch)")
    ap.add_argument("--allreduce", default="oneshot",
                    help="exact|oneshot|int8|fp8|fp16|auto|auto:BYTES (quantise from BYTES up)")
    ap.add_argument("--no-graphs", action="store_true", help="eager prefill and decode (no CUDA graphs)")
    ap.add_argument("--decode-ahead", action=argparse.BooleanOptionalAction, default=True,
                    help="launch each decode step before delivering the one before (EngineConfig.decode_ahead; "
                         "on by default, --no-decode-ahead for the plain loop)")
    ap.add_argument("--no-pack", action="store_true",
                    help="prefill equal-length prompts together, unpacked and eager (the pre-packing path)")
    ap.add_argument("--overlap-min-tokens", type=ints, default=[0],
                    help="prefill forwards from this many tokens overlap their all-reduces with compute "
                         "(0: never); a list times each setting on the same loaded model")
    ap.add_argument("--max-total-tokens", type=int, default=1 << 20,
                    help="skip workloads whose batch x (prompt + new) exceeds this")
    ap.add_argument("--context-parallel-size", type=int, default=1,
                    help="split long prompts' prefill over this many ranks along the sequence (world = TP x CP)")
    ap.add_argument("--context-parallel-min-tokens", type=int, default=1,
                    help="prompts from this many tokens take the context-parallel prefill (default 1: every "
                         "prompt, when CP > 1)")
    ap.add_argument("--linear", default="", help="A/B of the decode linears in one process: a list of 'kernel' "
                    "(the dispatch layer's choice), 'torch' (MEGATRON_SSM_LINEAR=torch: cuBLAS only) and "
                    "'kernel-pdl' (every decode kernel launched as a programmatic dependent in graphs), e.g. torch,kernel; each "
                    "builds its own engine (graphs captured with that choice)")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()

    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.lm import MambaLM
    from megatron_ssm.parallel import cp_context, init_distributed, shutdown

    tp = init_distributed(cp_size=args.context_parallel_size)
    cp = cp_context()
    if tp.device.type != "cuda":
        print("benchmark.py needs CUDA", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    bw = copy_bandwidth(tp.device)
    allreduce = None
    if args.allreduce != "exact":
        from megatron_ssm.comm import make_allreduce

        # "auto:BYTES": auto with its quantisation threshold set here instead of the device table
        kind, _, threshold = args.allreduce.partition(":")
        allreduce = make_allreduce(kind, **({"threshold": float(threshold)} if threshold else {}))
    for path in args.config:
        name, cfg = load_config(path)
        model = MambaLM(cfg, tp, dtype=dtype, allreduce=allreduce).eval()
        random_weights_(model, seed=1234 + tp.rank)
        weight_bytes = sum(p.nbytes for p in model.parameters())
        # a hybrid's KV cache at the longest workload's length (the floor then counts all of it)
        state_bytes = StateCache.bytes_per_sequence(model.state_shapes(max(args.prompt) + max(args.new)), dtype)
        reductions = reductions_per_step(model)
        if tp.is_first and cp.is_first:
            print(f"# {name}: TP={tp.size} CP={cp.size}, {weight_bytes / 1e9:.2f} GB weights and {state_bytes / 1e6:.1f} MB "
                  f"state per sequence per rank; copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
        for prompt in args.prompt:
            for batch in args.batch:
                if all(batch * (prompt + new) > args.max_total_tokens for new in args.new):
                    continue
                for linear in linear_variants(args.linear):
                    # One engine per shape: a warm-up at the timed shape compiles and autotunes kernels
                    # (Triton autotuners key on batch and length) and captures the prefill graphs it needs.
                    engine = make_engine(model, batch, prompt, args, cp)
                    run_workload(engine, batch, prompt, 4, seed=0)
                    for new in args.new:
                        if batch * (prompt + new) > args.max_total_tokens:
                            continue
                        for overlap in args.overlap_min_tokens:
                            model.overlap_min_tokens = overlap
                            torch.cuda.reset_peak_memory_stats()
                            r = run_workload(engine, batch, prompt, new, seed=prompt * 7 + batch)
                            r.update(linear=linear)
                            report(r, name, cfg, model, tp, args, bw, weight_bytes, state_bytes, reductions, cp)
                    del engine
        if tp.is_first and cp.is_first and "megatron_ssm.ops.triton.gemv" in sys.modules:
            for key, (chosen, timed) in sys.modules["megatron_ssm.ops.triton.gemv"].tuned().items():
                print(f"#   linear {key[0]:3d} x {key[2]:6d} -> {key[1]:6d}: {chosen} "
                      f"({', '.join(f'{c} {t:.1f} us' for c, t in timed[:3])})", flush=True)
        del model
        torch.cuda.empty_cache()
    shutdown()
    return 0


def report(r, name, cfg, model, tp, args, bw, weight_bytes, state_bytes, reductions, cp):
    """Add the derived figures to one workload's result; rank 0 prints it and appends it to --json-out."""
    batch = r["batch"]
    floor = (weight_bytes + 2 * state_bytes * batch) / bw
    from megatron_ssm.model.layers import RowParallelLinear

    row_parallel = next(m for m in model.modules() if isinstance(m, RowParallelLinear))
    per_call = allreduce_latency(tp, (batch, cfg.hidden_size), model.dtype, tp.device, row_parallel.allreduce)
    comm = per_call * reductions
    r.update(model=name, tp=tp.size, cp=cp.size, dtype=args.dtype, allreduce=args.allreduce, graphs=not args.no_graphs,
             packed=not args.no_pack, decode_ahead=args.decode_ahead,
             overlap_min_tokens=model.overlap_min_tokens, hbm_floor_ms=floor * 1e3,
             floor_fraction=floor * 1e3 / r["step_ms"], comm_est_ms=comm * 1e3,
             peak_mem_gb=torch.cuda.max_memory_allocated() / 1e9, copy_bw_tbs=bw / 1e12,
             device=torch.cuda.get_device_name(), tag=args.tag)
    if tp.is_first and cp.is_first:
        lin = f" linear={r['linear']}" if r.get("linear") else ""
        print(f"{name}{lin} tp={tp.size} cp={cp.size} b={batch:4d} p={r['prompt']:5d} n={r['new']:4d} ovl={model.overlap_min_tokens}  "
              f"ttft {r['ttft_ms']:8.1f} ms  step {r['step_ms']:6.2f} ms (floor {r['hbm_floor_ms']:5.2f}, "
              f"comm~{r['comm_est_ms']:5.2f})  gen {r['gen_tok_s']:9.0f} tok/s  total {r['total_tok_s']:9.0f} tok/s  "
              f"peak {r['peak_mem_gb']:5.1f} GB", flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.exit(main())
