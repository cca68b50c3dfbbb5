"""Session 17 probe: out_proj 5120 -> 2560 at M=1 read by K-slice owners (each program holds its
y slice and streams its columns of W for all (or part of) N), against our tuned GEMV and cuBLAS.
Streaming only (partials stored, not reduced). us per call, weights cycled (HBM, not L2)."""
import itertools, json, os, sys
import torch, triton, triton.language as tl
import torch.nn.functional as F
from megatron_ssm.ops.triton import gemv

@triton.jit
def colgemv(w_ptr, y_ptr, part_ptr, N, K, KB: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
            DOT: tl.constexpr):
    pid = tl.program_id(0)
    s = pid // NSPLIT
    nh = pid % NSPLIT
    offs_k = s * KB + tl.arange(0, KB)
    n_per = N // NSPLIT
    if DOT:
        offs_m = tl.arange(0, 16)
        yv = tl.load(y_ptr + offs_k[:, None] + offs_m[None, :] * 0, mask=(offs_m == 0)[None, :], other=0.0)
    else:
        yv = tl.load(y_ptr + offs_k).to(tl.float32)
    for n0 in range(nh * n_per, (nh + 1) * n_per, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :])
        if DOT:
            acc = tl.sum(tl.dot(w, yv), axis=1)
        else:
            acc = tl.sum(w.to(tl.float32) * yv[None, :], axis=1)
        tl.store(part_ptr + s * N + offs_n, acc)

N, K = 2560, 5120
dev = "cuda"
W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
copies = [W] + [W.clone() for _ in range(7)]
y = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
out = open(os.path.join(os.environ.get("OUT", "."), "colgemv.jsonl"), "w")
def rec(**r):
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + "\n")
rec(kind="cublas", us=round(gemv._time(lambda w: F.linear(y, w), copies, reps=40), 2))
gemv.linear(y, W)  # tunes
for key, (cfg, log) in gemv.tuned().items():
    rec(kind="tuned", key=str(key), cfg=str(cfg), top=log[:3])
for cfg_s, us in list(gemv.tuned().values())[0][1][:1]:
    pass
rec(kind="ours-tuned", us=round(gemv._time(lambda w: gemv.linear(y, w), copies, reps=40), 2))
ref = (y.float() @ W.float().t())[0]
for KB, NSPLIT, BLOCK_N, warps, stages, dot in itertools.product((32, 64, 128), (1, 2, 4), (64, 128, 256), (4, 8), (2, 3, 4), (True, False)):
    progs = (K // KB) * NSPLIT
    if progs > 640 or BLOCK_N * KB > 32768:
        continue
    part = torch.empty(K // KB, N, device=dev, dtype=torch.float32)
    fn = lambda w: colgemv[(progs,)](w, y, part, N, K, KB=KB, NSPLIT=NSPLIT, BLOCK_N=BLOCK_N, DOT=dot,
                                     num_warps=warps, num_stages=stages)
    try:
        fn(W); err = (part.sum(0) - ref).abs().max().item()
        us = gemv._time(fn, copies, reps=40)
    except Exception as e:
        rec(kind="col", KB=KB, NSPLIT=NSPLIT, BLOCK_N=BLOCK_N, warps=warps, stages=stages, dot=dot, error=repr(e)[:120]); continue
    rec(kind="col", KB=KB, NSPLIT=NSPLIT, BLOCK_N=BLOCK_N, warps=warps, stages=stages, dot=dot, progs=progs,
        us=round(us, 2), err=round(err, 4))
