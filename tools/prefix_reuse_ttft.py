#!/usr/bin/env python3
"""TTFT with and without a prefix-state hit, through the engine.

    torchrun --nproc_per_node 2 tools/prefix_reuse_ttft.py --load CKPT --text held_out.txt

Each trial sends a prompt of --shared tokens of text plus a --tail of other tokens: once to an engine
that has never seen the shared part (miss), and once right after a different prompt with the same
shared part (hit: prefill starts from the saved state at the last block boundary). Prints the median
TTFT of each and checks the two give the same tokens.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--shared", type=int, default=1024)
    ap.add_argument("--tail", type=int, default=32)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()

    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import init_distributed, shutdown
    from megatron_ssm.tokenizer import Tokenizer

    tp = init_distributed()
    model = load_model(args.load, tp)
    ids = Tokenizer(args.load).encode(open(args.text).read())
    sync = torch.cuda.synchronize if tp.device.type == "cuda" else (lambda: None)

    def ttft(engine, prompt):
        engine.add_request(Request(prompt, 8))
        sync()
        t = time.perf_counter()
        first = engine.step()[0].token
        sync()
        elapsed = time.perf_counter() - t
        rest = [first] + [o.token for _ in range(20) if engine.has_work() for o in engine.step()]
        return elapsed, rest

    miss, hit = [], []
    cfg = EngineConfig(max_batch=2, prefix_block=args.block, prefix_cache_bytes=1 << 30, prefill_chunk=args.block)
    for trial in range(args.trials + 1):  # the first trial warms up
        start = trial * args.shared
        shared = ids[start:start + args.shared]
        tails = [ids[start + args.shared + k * args.tail: start + args.shared + (k + 1) * args.tail] for k in (0, 1)]
        t_miss, out_miss = ttft(Engine(model, cfg), shared + tails[1])
        warm = Engine(model, cfg)
        ttft(warm, shared + tails[0])
        t_hit, out_hit = ttft(warm, shared + tails[1])
        assert out_hit == out_miss, "a prefix hit must give the same tokens as a miss"
        assert warm.prefix.hits >= 1
        if trial:
            miss.append(t_miss)
            hit.append(t_hit)
    if tp.is_first:
        m, h = statistics.median(miss) * 1e3, statistics.median(hit) * 1e3
        print(f"TP={tp.size} prompt {args.shared}+{args.tail} tokens, block {args.block}: "
              f"TTFT miss {m:.1f} ms, hit {h:.1f} ms ({m / h:.1f}x), {args.trials} trials, same tokens")
    shutdown()


if __name__ == "__main__":
    main()
