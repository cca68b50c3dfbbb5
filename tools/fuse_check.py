#!/usr/bin/env python3
"""The fused decode steps on one GPU, without pytest's start-up (a short device call):

1. the kernels against the references (the unfused chains of torch ops) at model sizes, outputs and
   states (the checks of tests/test_kernels_gpu.py's fused tests);
2. the Mamba-2 kernel replayed from a CUDA graph for several steps (its group counters must be back
   at zero after every launch);
3. per model (synthetic weights, as tools/benchmark.py): one eager decode step's logits fused,
   unfused (MEGATRON_SSM_FUSED_DECODE=0) and all-torch (MEGATRON_SSM_KERNELS=torch), then the
   graphed decode step timed fused and unfused in the same process (A/B on the same weights).

4. with --time-kernels: Mamba-2's fused kernel alone against the unfused chain of our kernels
   (conv update, state update, gated norm) at mamba2-2.7b's shape, each replayed from a CUDA graph
   over copies of the states (read from HBM as in a 64-layer model), for several block sizes and
   warp counts: which launch shape, if any, beats the chain it replaces.

    python3 tools/fuse_check.py [--models mamba2-2.7b,falcon-mamba-7b] [--batch-m2 1,16] [--batch-fm 1,32]
                                [--time-kernels] [--fused mamba1 --unfused 0]

--fused / --unfused: the two sides' MEGATRON_SSM_FUSED_DECODE (default both mixers / neither), so
one fusion can be measured against the same set without it. --fused-env / --unfused-env: more
variables for one side ("NAME=VALUE+NAME=VALUE"; unset on the other), for an A/B of another switch:
    --fused mamba1 --unfused mamba1 --fused-env MEGATRON_SSM_PREFETCH=bulk
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from test_decode_fused import mamba1_decode_inputs, mamba2_decode_inputs  # noqa: E402
from test_ops import TOL, check_op, rel_err  # noqa: E402

from megatron_ssm import ops as ref_ops  # noqa: E402
from megatron_ssm.ops import triton as kernels  # noqa: E402


def kernel_cases(dtype):
    dev = "cuda"
    return [
        ("mamba2-2.7b b1", kernels.mamba2_decode_step, mamba2_decode_inputs(1, 80, 64, 1, 128, 4, dtype, dev)),
        ("mamba2-2.7b b16", kernels.mamba2_decode_step, mamba2_decode_inputs(16, 80, 64, 1, 128, 4, dtype, dev)),
        ("codestral tp2 (4 groups) b4", kernels.mamba2_decode_step,
         mamba2_decode_inputs(4, 64, 64, 4, 128, 4, dtype, dev, dt_limit=(0.0, 0.1))),
        ("y*silu(z) b2", kernels.mamba2_decode_step, mamba2_decode_inputs(2, 80, 64, 1, 128, 4, dtype, dev, gate="silu")),
        ("y alone b2", kernels.mamba2_decode_step, mamba2_decode_inputs(2, 80, 64, 1, 128, 4, dtype, dev, gate=None)),
        ("falcon-mamba-7b b1", kernels.mamba1_decode_step, mamba1_decode_inputs(1, 8192, 16, dtype, dev, dt_rank=256)),
        ("falcon-mamba-7b b32", kernels.mamba1_decode_step, mamba1_decode_inputs(32, 8192, 16, dtype, dev, dt_rank=256)),
        ("mamba1 plain b4", kernels.mamba1_decode_step, mamba1_decode_inputs(4, 5120, 16, dtype, dev, norms=False)),
    ]


def check_kernels():
    for dtype in (torch.bfloat16, torch.float32):
        for name, impl, case in kernel_cases(dtype):
            errs = check_op(impl, *case, TOL[dtype])
            print(f"kernel {name} {dtype}: ok, relative errors {', '.join(f'{e:.1e}' for e in errs)}", flush=True)


def check_graph_replay(steps=4, gate="norm"):
    _, kw = mamba2_decode_inputs(16, 80, 64, 1, 128, 4, torch.bfloat16, "cuda", gate=gate)
    ref = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    kernels.mamba2_decode_step(**dict(kw, conv_state=kw["conv_state"].clone(), ssm_state=kw["ssm_state"].clone()))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.mamba2_decode_step(**kw)
    # capture does not run the kernel: the states are as before; each replay is one step
    for step in range(steps):
        for k in ("xbc", "z", "dt"):
            new = torch.randn_like(kw[k], dtype=torch.float32).to(kw[k].dtype)
            kw[k].copy_(new), ref[k].copy_(new)
        graph.replay()
        want = ref_ops.mamba2_decode_step(**ref)
        outs, wants = (out, want) if isinstance(out, tuple) else ((out,), (want,))  # deferred: (y, 1/rms)
        errs = [rel_err(o, w) for o, w in zip(outs, wants)]
        errs += [rel_err(kw["conv_state"], ref["conv_state"]), rel_err(kw["ssm_state"], ref["ssm_state"])]
        assert max(errs) < TOL[torch.bfloat16], f"graph replay step {step}: {errs}"
    print(f"graph replay: {steps} steps ok, last relative errors {', '.join(f'{e:.1e}' for e in errs)}", flush=True)


def _graph_time(fn, copies, replays=20):
    """us per call of fn(i) for i over the state copies, from a graph of one pass over them."""
    for i in range(len(copies)):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(len(copies)):
            fn(i)
    return _replay_ms(graph, replays, warmup=1) * 1e3 / len(copies)


def _replay_ms(graph, replays: int, warmup: int) -> float:
    """ms per replay of a captured graph, after `warmup` untimed replays."""
    for _ in range(warmup):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def time_kernels(batches=(1, 16), layers=48):
    from megatron_ssm.ops.triton import decode as fused

    for b in batches:
        for gate in ("norm", "silu"):
            _, kw = mamba2_decode_inputs(b, 80, 64, 1, 128, 4, torch.bfloat16, "cuda", gate=gate)
            kw["ssm_state"] = kw["ssm_state"].to(torch.bfloat16)
            copies = [(kw["conv_state"].clone(), kw["ssm_state"].clone()) for _ in range(layers)]
            h, p, n = kw["ssm_state"].shape[1:]
            ch = h * p

            def chain(i):
                xbc = kernels.causal_conv1d_update(kw["xbc"], copies[i][0], kw["conv_weight"], kw["conv_bias"])
                x, B, C = xbc.split([ch, n, n], dim=-1)
                y = kernels.ssd_state_update(copies[i][1], x.reshape(b, h, p), kw["dt"], kw["A"], B.reshape(b, 1, n),
                                             C.reshape(b, 1, n), kw["D"], kw["dt_bias"], kw["dt_limit"]).reshape(b, ch)
                if gate == "norm":
                    return kernels.gated_rms_norm(y, kw["z"], kw["norm_weight"], 1e-5, ch)
                return y * torch.nn.functional.silu(kw["z"])

            line = [f"chain {_graph_time(chain, copies):.2f}"]
            saved = fused.UPDATE_BLOCK, fused.NUM_WARPS, fused.NORM_BLOCK
            # NORM_BLOCK: the last program normalises the group's y this many channels at a time
            # (mamba2-2.7b's one group is 5120 wide: 3 rounds at 2048, 1 at 8192)
            for block in (1024, 2048, 4096, 8192, 16384):
                for warps in (4, 8):
                    for norm_block in ((2048, 8192) if gate == "norm" else (saved[2],)):
                        fused.UPDATE_BLOCK, fused.NUM_WARPS, fused.NORM_BLOCK = block, warps, norm_block
                        t = _graph_time(lambda i: kernels.mamba2_decode_step(
                            **dict(kw, conv_state=copies[i][0], ssm_state=copies[i][1])), copies)
                        line.append(f"{block}/{warps}w{f'/norm{norm_block}' if gate == 'norm' else ''} {t:.2f}")
            fused.UPDATE_BLOCK, fused.NUM_WARPS, fused.NORM_BLOCK = saved
            print(f"mamba2-2.7b b{b} {gate}: us per layer: {', '.join(line)}", flush=True)


def _env(**values):
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# The fused side takes Mamba-2's fused step at every batch (its default stops at one row).
MODES = {"fused": dict(MEGATRON_SSM_FUSED_DECODE="1", MEGATRON_SSM_KERNELS=None, MEGATRON_SSM_MAMBA2_FUSED_ROWS="4096"),
         "unfused": dict(MEGATRON_SSM_FUSED_DECODE="0", MEGATRON_SSM_KERNELS=None, MEGATRON_SSM_MAMBA2_FUSED_ROWS=None),
         "torch": dict(MEGATRON_SSM_FUSED_DECODE=None, MEGATRON_SSM_KERNELS="torch", MEGATRON_SSM_MAMBA2_FUSED_ROWS=None)}


@torch.no_grad()
def check_model(config: str, batches: list[int], tp, prompt=64, replays=100):
    from benchmark import load_config, random_weights_

    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.inference.cuda_graphs import GraphedDecode
    from megatron_ssm.model.lm import MambaLM

    name, cfg = load_config(config)
    model = MambaLM(cfg, tp, dtype=torch.bfloat16).eval()
    random_weights_(model, seed=1234)
    for b in batches:
        cache = StateCache(model.state_shapes(prompt + 8), b, dtype=model.dtype, device=tp.device)
        g = torch.Generator().manual_seed(b)
        ids = torch.randint(0, cfg.vocab_size, (b, prompt + 1), generator=g).to(tp.device)
        _env(**MODES["fused"])
        model(ids[:, :prompt], cache.rows(0, b), last_only=True)
        saved = [{k: v.clone() for k, v in layer.items()} for layer in cache.layers]
        logits, states = {}, {}
        for mode, env in MODES.items():
            for layer, keep in zip(cache.layers, saved):
                for k, v in keep.items():
                    layer[k].copy_(v)
            _env(**env)
            logits[mode] = model(ids[:, prompt:], cache.rows(0, b))[:, -1].float()
            states[mode] = [{k: v.clone() for k, v in layer.items()} for layer in cache.layers]
        # Synthetic weights through 64 layers can overflow a few bf16 logits: compare the finite ones.
        finite = torch.isfinite(logits["torch"])
        for mode in ("fused", "unfused"):
            same = torch.isfinite(logits[mode]).eq(finite).all().item()
            err = rel_err(logits[mode][finite], logits["torch"][finite])
            # layer 0 sees the same input in every mode: its states are the sharp check; deeper
            # layers also carry the bf16 differences of the layers before
            first = {k: rel_err(states[mode][0][k], states["torch"][0][k]) for k in states[mode][0]}
            deep = max(rel_err(a[k], r[k]) for a, r in zip(states[mode], states["torch"]) for k in a)
            print(f"{name} b{b} {mode} vs torch: logits {err:.2e} ({(~finite).sum().item()} non-finite, same places "
                  f"{same}), layer-0 states {', '.join(f'{k} {e:.1e}' for k, e in first.items())}, "
                  f"all layers' states <= {deep:.1e}", flush=True)
            if not (same and err < 3e-2 and max(first.values()) < 1e-2):
                print(f"MISMATCH {name} b{b} {mode}", flush=True)
        print(f"{name} b{b} fused vs unfused: logits {rel_err(logits['fused'][finite], logits['unfused'][finite]):.2e}",
              flush=True)
        if tp.device.type != "cuda":  # (a CPU dry run of this script: the references only)
            continue
        times = {}
        for mode in ("unfused", "fused", "unfused", "fused"):  # twice each, interleaved
            _env(**MODES[mode])
            graphed = GraphedDecode(model, cache, buckets=(b,))
            times.setdefault(mode, []).append(_replay_ms(graphed.graphs[b], replays, warmup=5))
            del graphed
        best = {m: min(t) for m, t in times.items()}
        print(f"{name} b{b} graphed decode step: fused {best['fused']:.3f} ms, unfused {best['unfused']:.3f} ms "
              f"({100 * (1 - best['fused'] / best['unfused']):.1f}% less)", flush=True)
        del cache
    _env(**{name: None for name in MODES["fused"]})
    del model
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fused", default="1", help="MEGATRON_SSM_FUSED_DECODE of the 'fused' side ('+' for ',')")
    ap.add_argument("--unfused", default="0", help="MEGATRON_SSM_FUSED_DECODE of the 'unfused' side")
    ap.add_argument("--models", default="mamba2-2.7b,falcon-mamba-7b")
    ap.add_argument("--batch-m2", default="1,16")
    ap.add_argument("--batch-fm", default="1,32")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--time-kernels", action="store_true")
    ap.add_argument("--fused-env", default="", help="NAME=VALUE+... set on the 'fused' side only")
    ap.add_argument("--unfused-env", default="", help="NAME=VALUE+... set on the 'unfused' side only")
    args = ap.parse_args()
    MODES["fused"]["MEGATRON_SSM_FUSED_DECODE"] = args.fused.replace("+", ",")
    MODES["unfused"]["MEGATRON_SSM_FUSED_DECODE"] = args.unfused.replace("+", ",")
    for side, other, extra in (("fused", "unfused", args.fused_env), ("unfused", "fused", args.unfused_env)):
        for name, value in (item.split("=", 1) for item in filter(None, extra.split("+"))):
            MODES[side][name] = value
            MODES[other].setdefault(name, None)
            MODES["torch"].setdefault(name, None)
    print(f"fused: {MODES['fused']}, unfused: {MODES['unfused']}", flush=True)
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    if args.time_kernels:
        time_kernels()
    if not args.skip_kernels and torch.cuda.is_available():
        check_kernels()
        check_graph_replay()
    from megatron_ssm.parallel import init_distributed

    tp = init_distributed()
    batches = {"mamba2-2.7b": args.batch_m2, "falcon-mamba-7b": args.batch_fm}
    for m in filter(None, args.models.split(",")):
        path = m if m.endswith(".yaml") else str(ROOT / "configs" / f"{m}.yaml")
        check_model(path, [int(b) for b in batches.get(m, "1").split(",")], tp)
    if torch.cuda.is_available():  # what the GEMV's tuner chose per shape (with a norm: its signature after bias)
        from megatron_ssm.ops.triton import gemv

        for key, (cfg, timed) in gemv.tuned().items():
            print(f"gemv tuned {key}: {cfg}; fastest {', '.join(f'{c} {t:.1f}us' for c, t in timed[:3])}"
                  f"{'; unfused/cublas ' + str(dict(timed).get('cublas')) if 'cublas' in dict(timed) else ''}", flush=True)
    print("fuse_check: all ok", flush=True)


if __name__ == "__main__":
    main()
