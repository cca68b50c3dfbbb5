"""Session 17 probe 2: is out_proj's weight (26 MB) read faster from L2 than from HBM, and does a
prefetch into L2 during a latency-bound phase (a spin of T us standing in for the state update)
make the GEMV after it faster?  One graph per weight copy: [spin (+ prefetch of W)] -> [GEMV(W)]."""
import json, os
import torch, triton, triton.language as tl
import torch.nn.functional as F
from megatron_ssm.ops.triton import gemv

@triton.jit
def _now(x):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1)

@triton.jit
def spin(w_ptr, n_lines, ns, PREFETCH: tl.constexpr, PER: tl.constexpr):
    pid = tl.program_id(0)
    t0 = _now(pid)
    if PREFETCH:
        offs = pid * PER + tl.arange(0, PER)
        gemv._prefetch_l2(w_ptr + tl.minimum(offs, n_lines - 1).to(tl.int64) * 64)  # bf16: 64 elements a line
    t = _now(pid)
    while t - t0 < ns:
        t = _now(pid)

N, K = 2560, 5120
dev = "cuda"
W = torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.02
copies = [W] + [W.clone() for _ in range(7)]
y = torch.randn(1, K, device=dev, dtype=torch.bfloat16)
out = open(os.path.join(os.environ.get("OUT", "."), "l2.jsonl"), "w")
def rec(**r):
    print(json.dumps(r), flush=True); out.write(json.dumps(r) + "\n")
gemv.linear(y, W)  # tune
cfg = list(gemv.tuned().values())[0][0]
run = lambda w: gemv._launch(y, w, None, cfg)
rec(kind="gemv", cfg=str(cfg), hbm_us=round(gemv._time(run, copies, 40), 2), l2_hot_us=round(gemv._time(run, [W], 40), 2))
rec(kind="cublas", hbm_us=round(gemv._time(lambda w: F.linear(y, w), copies, 40), 2),
    l2_hot_us=round(gemv._time(lambda w: F.linear(y, w), [W], 40), 2))
n_lines = N * K * 2 // 128
progs = 264
per = triton.next_power_of_2(triton.cdiv(n_lines, progs))
def pair(w, ns, pf, with_gemv=True):
    spin[(progs,)](w, n_lines, ns, PREFETCH=pf, PER=per, num_warps=4)
    if with_gemv:
        run(w)
def graph_us(ns, pf, with_gemv=True):
    for w in copies: pair(w, ns, pf, with_gemv)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(4):
            for w in copies: pair(w, ns, pf, with_gemv)
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = 1e9
    for _ in range(5):
        s.record(); g.replay(); e.record(); e.synchronize()
        best = min(best, s.elapsed_time(e) * 1e3 / (4 * len(copies)))
    return best
for ns in (2000, 4000, 6000, 8000):
    base = graph_us(ns, False, False)
    pf_only = graph_us(ns, True, False)
    cold = graph_us(ns, False)
    warm = graph_us(ns, True)
    rec(kind="spin+gemv", spin_ns=ns, spin_us=round(base, 2), spin_prefetch_us=round(pf_only, 2),
        pair_us=round(cold, 2), pair_prefetch_us=round(warm, 2), gemv_after=round(cold - base, 2),
        gemv_after_prefetch=round(warm - pf_only, 2))
