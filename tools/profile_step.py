#!/usr/bin/env python3
"""Where a decode step (or a prefill) spends its time: torch.profiler over a few eager steps.

    torchrun --nproc_per_node N tools/profile_step.py --config configs/mamba2-2.7b.yaml --batch 1
    torchrun --nproc_per_node 2 tools/profile_step.py --load CKPT --batch 4 --phase prefill --prompt 512

Synthetic weights at a config's shapes (as tools/benchmark.py) or a converted checkpoint. Runs the
model eagerly (no CUDA graph, so each kernel is visible), then rank 0 prints the top operators and
kernels by self time and the share of time in collectives. Optionally writes a Chrome trace.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="model YAML from configs/ (synthetic weights)")
    src.add_argument("--load", help="converted checkpoint")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--phase", choices=["decode", "prefill"], default="decode")
    ap.add_argument("--prompt", type=int, default=512, help="prefill length (and the context decode starts from)")
    ap.add_argument("--pack", type=int, default=0,
                    help="prefill as the engine packs it: the prompts end to end in forwards of at most this many "
                         "tokens (cu_seqlens), each sequence's state written to its own row (0: [batch, prompt])")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--trace", default=None, help="write a Chrome trace here (rank 0)")
    args = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.lm import MambaLM
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import init_distributed, shutdown

    tp = init_distributed()
    torch.set_grad_enabled(False)
    dtype = getattr(torch, args.dtype)
    if args.config:
        from benchmark import load_config, random_weights_

        _, cfg = load_config(args.config)
        model = MambaLM(cfg, tp, dtype=dtype).eval()
        random_weights_(model, seed=1234 + tp.rank)
    else:
        model = load_model(args.load, tp, dtype=dtype if tp.device.type == "cuda" else None)
    # a hybrid's KV cache holds the prompt plus every decode step profiled (and the warm-ups)
    cache = StateCache(model.state_shapes(args.prompt + args.steps + 4), args.batch, dtype=model.dtype, device=tp.device)
    states = cache.rows(0, args.batch)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.cfg.vocab_size, (args.batch, args.prompt), generator=g).to(tp.device)
    token = prompt[:, -1:]
    sync = torch.cuda.synchronize if tp.device.type == "cuda" else (lambda: None)

    from megatron_ssm.ops.varlen import cu_seqlens_of

    per_pack = max(1, args.pack // args.prompt) if args.pack else 0

    def step():
        if args.phase == "prefill":
            cache.reset(0, args.batch)
            if not per_pack:
                model(prompt, states, last_only=True)
            for first in range(0, args.batch if per_pack else 0, per_pack):
                last = min(first + per_pack, args.batch)
                ids = prompt[first:last].reshape(1, -1)
                model(ids, cache.rows(first, last), last_only=True,
                      cu_seqlens=cu_seqlens_of([args.prompt] * (last - first), tp.device))
        else:
            model(token, states)

    model(prompt, states, last_only=True)  # context for decode; also warms kernels up
    for _ in range(2):
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if tp.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        sync()
    if tp.is_first:
        on_gpu = tp.device.type == "cuda"
        key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
        events = prof.key_averages()
        total = sum(getattr(e, key) for e in events)
        comm = sum(getattr(e, key) for e in events if any(s in e.key.lower() for s in ("nccl", "all_reduce",
                                                                                        "allreduce", "all_gather", "gloo")))
        packed = f", packs of {per_pack} prompts" if per_pack and args.phase == "prefill" else ""
        print(f"{args.phase}, batch {args.batch}{packed}, TP={tp.size}, {args.steps} steps: "
              f"{total / args.steps / 1e3:.3f} ms self time per step, {100 * comm / max(total, 1):.1f}% in collectives")
        print(events.table(sort_by=key, row_limit=args.top))
        if args.trace:
            prof.export_chrome_trace(args.trace)
    shutdown()


if __name__ == "__main__":
    main()
