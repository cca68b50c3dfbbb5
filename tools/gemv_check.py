"""The skinny-GEMM kernel (megatron_ssm/ops/triton/gemv.py) on a GPU, at the decode shapes of
mamba2-2.7b and falcon-mamba-7b: (1) correctness against F.linear (tuned configuration and every
candidate the tuner may pick, eager and replayed from a CUDA graph), (2) time per call against
cuBLAS at M = 1, 4, 16, each replayed from a CUDA graph of many calls that cycle over copies of the
weight (so it is read from HBM, as in a 64-layer model), reported in TB/s of weight read.

    python tools/gemv_check.py [--json-out FILE] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

from megatron_ssm.ops.triton import gemv, pdl

# (model, layer, N, K, bias)
SHAPES = [
    ("mamba2-2.7b", "in_proj", 10576, 2560, False),
    ("mamba2-2.7b", "out_proj", 2560, 5120, False),
    ("mamba2-2.7b", "lm_head", 50288, 2560, False),
    ("falcon-mamba-7b", "in_proj", 16384, 4096, False),
    ("falcon-mamba-7b", "out_proj", 4096, 8192, False),
    ("falcon-mamba-7b", "x_proj", 288, 8192, False),
    ("falcon-mamba-7b", "dt_proj", 8192, 256, True),
    ("falcon-mamba-7b", "lm_head", 65024, 4096, False),
]
ROWS = (1, 4, 16)
L2_BYTES = 3 * 60e6  # read 3x the H200's L2 between two reads of one copy


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def graph_time_us(fn, copies, reps=None):
    """Microseconds per call of fn(weight) replayed from one CUDA graph of `reps` calls."""
    reps = reps or max(20, 2 * len(copies))
    for w in copies[:2]:
        fn(w)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(copies[i % len(copies)])
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / reps)
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json-out")
    ap.add_argument("--quick", action="store_true", help="correctness of the tuned config only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    failures = 0
    rows_out = []
    for model, layer, n, k, has_bias in SHAPES:
        w = (torch.randn(n, k, device=dev) * k ** -0.5).to(torch.bfloat16)
        b = torch.randn(n, device=dev).to(torch.bfloat16) if has_bias else None
        nbytes = w.numel() * 2
        copies = [w] + [w.clone() for _ in range(max(0, int(L2_BYTES // nbytes)))]
        for m in ROWS:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            ref = F.linear(x, w, b)
            out = gemv.linear(x, w, b)  # tunes
            key = (gemv._m_bucket(m), n, k, torch.bfloat16, has_bias)
            cfg, log = gemv.tuned().get(key, (None, []))
            errs = {"tuned": rel_err(out, ref)}
            if not args.quick:
                for c in gemv._candidates(m, n, k, dev):
                    errs[str(c)] = rel_err(gemv.linear(x, w, b, config=c), ref)
                # fp32 too (tl.dot in ieee): the reference in fp32
                x32, w32 = x.float(), w.float()
                errs["fp32"] = rel_err(gemv.linear(x32, w32, None if b is None else b.float(),
                                                   config=gemv.heuristic(m, n, k, dev)), F.linear(x32, w32, None if b is None else b.float()))
            # replayed: a graph of the heuristic (split) configuration, fresh inputs before each replay
            xs = x.clone()
            g = torch.cuda.CUDAGraph()
            heur = gemv.heuristic(m, n, k, dev)
            gemv.linear(xs, w, b, config=heur)
            torch.cuda.synchronize()
            with torch.cuda.graph(g):
                ys = gemv.linear(xs, w, b, config=heur)
            for _ in range(3):
                xs.copy_(torch.randn_like(xs))
                g.replay()
                errs["graph"] = max(errs.get("graph", 0.0), rel_err(ys, F.linear(xs, w, b)))
            t_ours = graph_time_us(lambda wt: gemv.linear(x, wt, b), copies)
            t_cublas = graph_time_us(lambda wt: F.linear(x, wt, b), copies)
            t_pdl = float("nan")
            os.environ[pdl.ENV] = "1"
            try:  # the same graph with programmatic dependent launches (each call overlaps the one before)
                if pdl.supported(dev):
                    t_pdl = graph_time_us(lambda wt: gemv.linear(x, wt, b), copies)
                    with torch.cuda.graph(g := torch.cuda.CUDAGraph()):
                        xs.copy_(x)
                        yp = gemv.linear(xs, w, b)
                    g.replay()
                    errs["pdl graph"] = rel_err(yp, ref)
            finally:
                os.environ.pop(pdl.ENV)
            bad = {c: e for c, e in errs.items() if not e < (2e-5 if c == "fp32" else 1e-2)}
            failures += bool(bad)
            row = dict(model=model, layer=layer, m=m, n=n, k=k, bias=has_bias, config=str(cfg), us=round(t_ours, 2),
                       pdl_us=round(t_pdl, 2),
                       cublas_us=round(t_cublas, 2), tbps=round(nbytes / t_ours / 1e6, 3),
                       cublas_tbps=round(nbytes / t_cublas / 1e6, 3), max_err=max(errs.values()),
                       bad=bad, top=[(c, round(t, 2)) for c, t in log[:6]])
            rows_out.append(row)
            print(f"{model:16s} {layer:9s} M={m:2d} {n:6d}x{k:5d} {'bias' if has_bias else '    '} "
                  f"ours {t_ours:7.2f} us {row['tbps']:5.2f} TB/s [{cfg}]  cublas {t_cublas:7.2f} us "
                  f"{row['cublas_tbps']:5.2f} TB/s  x{t_cublas / t_ours:4.2f}  pdl {t_pdl:7.2f} us  err {row['max_err']:.1e}"
                  + (f"  BAD {bad}" if bad else ""), flush=True)
            print("    tuner:", " ".join(f"{c}={t:.1f}" for c, t in log[:6]), flush=True)
        del copies
    if args.json_out:
        with open(args.json_out, "a") as f:
            for row in rows_out:
                f.write(json.dumps(row) + "\n")
    print("programmatic dependent launch in graphs:", pdl._OK.get(dev, "not probed"))
    print("FAILURES" if failures else "all correct", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
