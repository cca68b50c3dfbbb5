"""Session 18 probe: out_proj with its weight slab copied to shared memory before its PDL wait, in a
chain in_proj -> Mamba-2 step -> out_proj (mamba2-2.7b shapes, 64 layers of distinct weights, graphed)."""
import os, sys, time, json
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import staged
from megatron_ssm.ops.triton import gemv as G, decode as D, pdl

dev = torch.device("cuda")
torch.manual_seed(0)
L = int(os.environ.get("LAYERS", 64))
d_model, d_inner, n, heads, K = 2560, 5120, 128, 80, 4
conv_ch = d_inner + 2 * n
n_in = 2 * d_inner + 2 * n + heads
bf = torch.bfloat16
sms = torch.cuda.get_device_properties(dev).multi_processor_count
cfg = staged.plan(d_model, d_inner, sms)
print("plan", cfg, "sms", sms, flush=True)

# correctness first
w = torch.randn(d_model, d_inner, device=dev, dtype=bf) / 64
x = torch.randn(1, d_inner, device=dev, dtype=bf)
part = torch.empty(cfg[1], d_model, device=dev, dtype=torch.float32)
locks = torch.zeros(4096, device=dev, dtype=torch.int32)
want = (x.float() @ w.float().t())
for nw_, mr in ((4, None), (2, None), (8, None)):
    y = torch.empty(1, d_model, device=dev, dtype=bf)
    k = staged.tma_gemv(x, w, y, part, locks, cfg, num_warps=nw_, maxnreg=mr)
    err = (y.float() - want).abs().max().item()
    print(f"tma warps={nw_} maxnreg={mr}: max err {err:.3e} regs {getattr(k, 'n_regs', '?')}", flush=True)
    assert err < 0.05, err
for we in ():
    for nw in (4, 2, 8):
        y = torch.empty(1, d_model, device=dev, dtype=bf)
        k = staged.staged_gemv(x, w, y, part, locks, cfg, wait_each=we, num_warps=nw)
        err = (y.float() - want).abs().max().item()
        print(f"staged wait_each={we} warps={nw}: max err {err:.3e} (|y| {want.abs().max().item():.2f})"
              f" regs {getattr(k, 'n_regs', '?')} shared {getattr(getattr(k, 'metadata', None), 'shared', '?')}", flush=True)
        assert err < 0.05, err

W_in = [torch.randn(n_in, d_model, device=dev, dtype=bf) / 50 for _ in range(L)]
W_out = [torch.randn(d_model, d_inner, device=dev, dtype=bf) / 70 for _ in range(L)]
conv_w = [torch.randn(conv_ch, K, device=dev, dtype=bf) / 2 for _ in range(L)]
conv_b = [torch.randn(conv_ch, device=dev, dtype=bf) / 10 for _ in range(L)]
conv_s = [torch.randn(1, conv_ch, K - 1, device=dev, dtype=bf) for _ in range(L)]
ssm_s = [torch.randn(1, heads, 64, n, device=dev, dtype=torch.float32) / 10 for _ in range(L)]
A = [-torch.rand(heads, device=dev) - 0.5 for _ in range(L)]
Dv = [torch.randn(heads, device=dev) for _ in range(L)]
dtb = [torch.randn(heads, device=dev) / 4 for _ in range(L)]
nw = [torch.rand(d_inner, device=dev, dtype=bf) + 0.5 for _ in range(L)]
h0 = torch.randn(1, d_model, device=dev, dtype=bf)
part = torch.empty(cfg[1], d_model, device=dev, dtype=torch.float32)


def step(i, h):
    zx = G.linear(h, W_in[i])
    z, xbc, dt = zx[:, :d_inner], zx[:, d_inner:d_inner + conv_ch], zx[:, d_inner + conv_ch:]
    y, rstd = D.mamba2_decode_step(xbc, z, dt, conv_s[i], conv_w[i], conv_b[i], ssm_s[i], A[i], Dv[i], dtb[i],
                                   (0.0, float("inf")), nw[i], 1e-5, defer_norm=True)
    return y


def chain(variant):
    h = h0
    for i in range(L):
        y = step(i, h)
        if variant == "step":
            h = h0
            continue
        if variant == "base":
            h = G.linear(y, W_out[i])
        elif variant[0] == "tma":
            h = torch.empty(1, d_model, device=dev, dtype=bf)
            staged.tma_gemv(y, W_out[i], h, part, locks, cfg, pdl=pdl.use(dev), num_warps=variant[1], maxnreg=variant[2],
                            clocks=None if CLK is None else CLK[i])
        else:
            we, warps = variant
            h = torch.empty(1, d_model, device=dev, dtype=bf)
            staged.staged_gemv(y, W_out[i], h, part, locks, cfg, pdl=pdl.use(dev), wait_each=we, num_warps=warps)
    return h


CLK = None


def out_chain(variant):
    ys = [torch.randn(1, d_inner, device=dev, dtype=bf) for _ in range(2)]
    h = None
    for i in range(L):
        x_i = ys[i % 2]
        if variant == "base":
            h = G.linear(x_i, W_out[i])
        elif variant[0] == "tma":
            h = torch.empty(1, d_model, device=dev, dtype=bf)
            staged.tma_gemv(x_i, W_out[i], h, part, locks, cfg, pdl=pdl.use(dev), num_warps=variant[1], maxnreg=variant[2])
        else:
            we, warps = variant
            h = torch.empty(1, d_model, device=dev, dtype=bf)
            staged.staged_gemv(x_i, W_out[i], h, part, locks, cfg, pdl=pdl.use(dev), wait_each=we, num_warps=warps)
    return h


def timed(fn, arg, reps=30):
    fn(arg); fn(arg); torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            fn(arg)
    torch.cuda.current_stream().wait_stream(s)
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(reps):
        g.replay()
    t1.record(); t1.synchronize()
    return t0.elapsed_time(t1) * 1e3 / reps / L


print("pdl supported", pdl.supported(dev), flush=True)
res = {}
TMA = [("tma", 4, None), ("tma", 8, None), ("tma", 2, None)]
variants = [("base",), ("step",)] + [(t,) for t in TMA]
for rnd in range(2):
    for v in variants:
        v = v[0]
        res.setdefault(f"chain {v}", []).append(timed(chain, v))
    for v in ["base"] + TMA:
        res.setdefault(f"out-only {v}", []).append(timed(out_chain, v))
for k_, v in res.items():
    print(f"{k_:32s} us/layer: " + " ".join(f"{t:.2f}" for t in v), flush=True)
# check the graphed staged chain gives the base chain's output (states advance: compare one fresh eager pass each)

# when each staged program started, passed its wait and ended, against the others: were they resident
# during the step kernel before them (their copies in flight), or scheduled after it?
ctas = (d_model // cfg[0]) * cfg[1]
for v in TMA:
    CLK = torch.zeros(L, ctas, 4, device=dev, dtype=torch.int64)
    timed(chain, v, reps=1)
    c = CLK[1:].double()
    t0 = c[:, :, 0].min(dim=1, keepdim=True).values
    rel = (c[:, :, :3] - t0[:, :, None]) / 1e3  # us from the layer's first program start
    wait_ = rel[:, :, 1]
    first_wait = wait_.min(dim=1, keepdim=True).values
    early = (rel[:, :, 0] < first_wait - 1.0).double().mean().item()
    print(f"clocks {v}: start spread p50/p90 {rel[:, :, 0].median().item():.2f}/{rel[:, :, 0].quantile(0.9).item():.2f} us; "
          f"wait passed at {first_wait.median().item():.2f} us (first) .. {wait_.max(dim=1).values.median().item():.2f} (last); "
          f"programs started >1us before the first wait passed: {early:.0%}; end after wait p50 "
          f"{(rel[:, :, 2] - wait_).median().item():.2f} us, layer span {rel[:, :, 2].max(dim=1).values.median().item():.2f} us; "
          f"SMs used {len(set(CLK[1:, :, 3].flatten().tolist()))}", flush=True)
for name, fn_ in (("step", D._mamba2_decode_kernel), ("gemv", G._gemv_kernel), ("tma", staged.tma_gemv_kernel)):
    try:
        for dc in fn_.device_caches.values():
            for ck in dc[0].values():
                print(f"{name}: regs {ck.n_regs} shared {ck.metadata.shared} warps {ck.metadata.num_warps}", flush=True)
    except Exception as e:  # noqa
        print(name, "no cache info", e)
