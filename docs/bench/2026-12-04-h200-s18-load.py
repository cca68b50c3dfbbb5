"""Session 18 probe 2: how fast can one program a SM pull a 218-230 KB slab of out_proj into shared memory
by TMA (no compute), by box shape, against our GEMV over the same weights (64 distinct 26 MB weights, graphed)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import staged
from megatron_ssm.ops.triton import gemv as G

dev = torch.device("cuda")
L = 64
W = [torch.randn(2560, 5120, device=dev, dtype=torch.bfloat16) for _ in range(L)]
x = torch.randn(1, 5120, device=dev, dtype=torch.bfloat16)
y = torch.empty(1 << 20, device=dev)


def timed(fn, reps=20):
    fn(); fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record(); b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / L


res = {"gemv (ours)": lambda: [G.linear(x, w) for w in W],
       "torch copy 26MB (r+w)": None}
buf = torch.empty(2560 * 5120, device=dev, dtype=torch.bfloat16)
res["torch copy 26MB (r+w)"] = lambda: [buf.copy_(w.view(-1)) for w in W]
for br, bc, sw in ((64, 64, 128), (32, 128, 0), (16, 256, 0), (64, 64, 0)):
    for nw in (4, 1):
        res[f"tma load-only box [{br},{bc}] swz{sw} warps{nw}"] = (
            lambda br=br, bc=bc, sw=sw, nw=nw: [staged.tma_load_only(w, y, br, bc, sw, num_warps=nw) for w in W])
for splits, rows in ((3, 64),):
    pass
for name, fn in res.items():
    try:
        print(f"{name:44s} {timed(fn):7.2f} us a 26 MB weight", flush=True)
    except Exception as e:  # noqa
        print(name, "failed", repr(e)[:300], flush=True)
