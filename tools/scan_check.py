#!/usr/bin/env python3
"""The Mamba-1 prefill kernels (selective scan, causal conv1d) on one GPU, as a plain script (no
pytest start-up, for a short device call):

    python3 tools/scan_check.py --check            # kernels vs the torch reference at model sizes
    python3 tools/scan_check.py --bench --sweep    # timings: before/after, then a config sweep
        [--json-out FILE]

--check runs our Triton kernels against the torch reference ops (tests/test_ops.py's check_op:
every output and final state, NaN-poisoned outputs) at falcon-mamba-7b's width (8192 channels,
n = 16), a width that no block divides, one token, packed sequences, an initial state, no z / no
D, and the Mamba-2 use of the same kernel (n = 128, grouped B/C, clamped dt).
--bench times the scan and the conv at b1 x 2048, b8 x 512, b32 x 512 and 16 packed 512-token
prompts (and b1 x 16384 for the scan), bf16, against the kernels this branch started from when
megatron_ssm/ops/triton/_scan_before.py / _conv_before.py exist (tools/scan_check.sh puts main's
there in the device copy; they are not part of the package). --sweep times every SCAN_CONFIG
candidate and conv tile on the same cases. Floor: each input read once, each output written once,
at the copy bandwidth measured here.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_ops import TOL, check_op, conv_inputs, packed, scan_inputs, ssd_inputs  # noqa: E402

from megatron_ssm import ops as ref_ops  # noqa: E402
from megatron_ssm.ops import triton as kernels  # noqa: E402
from megatron_ssm.ops.triton import conv1d, scan  # noqa: E402

DEV = "cuda"
D_FM = 8192  # falcon-mamba-7b's d_inner at TP=1


def _no(kw, *names):
    return dict(kw, **{n: None for n in names})


def _forced(cfg, impl):
    """impl with SCAN_CONFIG[16] forced to the one candidate cfg."""
    def run(**kw):
        saved = scan.SCAN_CONFIG[16]
        scan.SCAN_CONFIG[16] = (cfg,)
        try:
            return impl(**kw)
        finally:
            scan.SCAN_CONFIG[16] = saved
    return run


def check(seed: int) -> int:
    torch.manual_seed(seed)
    failures = 0
    cases = []
    for dt in (torch.bfloat16, torch.float32):
        cases += [
            ("scan b2x1000 d8192 state+z", dt, kernels.selective_scan, scan_inputs(2, 1000, D_FM, 16, dt, DEV)),
            ("scan b1x333 d8000 no z/D", dt, kernels.selective_scan,
             (lambda c: (c[0], _no(c[1], "D")))(scan_inputs(1, 333, 8000, 16, dt, DEV, state=False, gate=False))),
            ("scan b3x1 d8192 state", dt, kernels.selective_scan, scan_inputs(3, 1, D_FM, 16, dt, DEV)),
            ("scan b1x3000 d8192 (narrow blocks)", dt, kernels.selective_scan, scan_inputs(1, 3000, D_FM, 16, dt, DEV)),
            ("scan packed [700,1,300,23] d8192", dt, kernels.selective_scan,
             packed(scan_inputs(1, 1024, D_FM, 16, dt, DEV, state=False), [700, 1, 300, 23])),
            ("scan packed [1,5,64,2,1] d4100 n12", dt, kernels.selective_scan,
             packed(scan_inputs(1, 73, 4100, 12, dt, DEV, state=False), [1, 5, 64, 2, 1])),
            ("ssd (ours) b2x300 h80p64 n128 state", dt, kernels.ssd_chunk_scan,
             ssd_inputs(2, 300, 80, 64, 1, 128, 256, dt, DEV)),
            ("ssd (ours) b1x300 h16p64 g4 n128 limit", dt, kernels.ssd_chunk_scan,
             ssd_inputs(1, 300, 16, 64, 4, 128, 256, dt, DEV, state=False, dt_limit=(0.001, 0.08))),
            ("ssd (ours) packed [200,1,99]", dt, kernels.ssd_chunk_scan,
             packed(ssd_inputs(1, 300, 80, 64, 1, 128, 256, dt, DEV, state=False), [200, 1, 99])),
            ("conv b2x1000 C8192 state", dt, kernels.causal_conv1d, conv_inputs(2, 1000, D_FM, 4, dt, DEV)),
            ("conv b8x512 C8192", dt, kernels.causal_conv1d, conv_inputs(8, 512, D_FM, 4, dt, DEV, state=False)),
            ("conv b1x2 C8000 state", dt, kernels.causal_conv1d, conv_inputs(1, 2, 8000, 4, dt, DEV)),
            ("conv packed [700,1,300,23] C8192", dt, kernels.causal_conv1d,
             packed(conv_inputs(1, 1024, D_FM, 4, dt, DEV, state=False), [700, 1, 300, 23])),
        ]
        op, kw = conv_inputs(2, 300, D_FM, 4, dt, DEV)
        kw["x"] = torch.randn(2, 300, 2 * D_FM, device=DEV).to(dt)[..., :D_FM]  # in_proj's x half, as the model
        cases.append(("conv strided x b2x300 C8192", dt, kernels.causal_conv1d, (op, kw)))
    # every layout the launcher may pick (and wider ones), compiled, at model width
    for cfg in ((4, 32, 1, 1), (2, 32, 1, 1), (2, 32, 1, 2), (1, 32, 1, 1), (1, 32, 1, 2), (2, 64, 2, 1), (1, 128, 4, 1),
                (1, 16, 1, 2), (1, 8, 1, 2), (1, 8, 1, 1)):
        cases.append((f"scan layout {cfg} b3x300", torch.bfloat16, _forced(cfg, kernels.selective_scan),
                      scan_inputs(3, 300, D_FM, 16, torch.bfloat16, DEV)))
        cases.append((f"scan layout {cfg} packed", torch.float32, _forced(cfg, kernels.selective_scan),
                      packed(scan_inputs(1, 1024, D_FM, 16, torch.float32, DEV, state=False), [700, 1, 300, 23])))
    for name, dt, impl, (op, kw) in cases:
        try:
            errs = check_op(impl, op, kw, TOL[dt], seed)
            print(f"ok   {name} {dt}: rel err {', '.join(f'{e:.1e}' for e in errs)}", flush=True)
        except AssertionError as e:
            failures += 1
            print(f"FAIL {name} {dt}: {e}", flush=True)
    print(f"check: {len(cases) - failures}/{len(cases)} ok (seed {seed})", flush=True)
    return failures


def _time(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # us


def _bytes(kw, out) -> int:
    n = sum(v.nbytes for v in kw.values() if isinstance(v, torch.Tensor))
    return n + sum(t.nbytes for t in (out if isinstance(out, tuple) else (out,)))


def _before(name):
    try:
        return importlib.import_module(f"megatron_ssm.ops.triton.{name}")
    except ImportError:
        return None


def _bench_cases():
    bf = torch.bfloat16
    cases = []
    for label, b, L, pack in (("b1x2048", 1, 2048, None), ("b8x512", 8, 512, None), ("b32x512", 32, 512, None),
                              ("packed16x512", 1, 16 * 512, [512] * 16), ("b1x16384", 1, 16384, None)):
        op, kw = scan_inputs(b, L, D_FM, 16, bf, DEV, state=False)
        xz = torch.randn(b, L, 2 * D_FM, device=DEV, dtype=bf)
        kw["z"] = xz[..., D_FM:]  # the model's z: in_proj's second half, a strided view
        cases.append((f"scan {label}", *(packed((op, kw), pack) if pack else (op, kw))))
        if label == "b1x16384":
            continue
        op, kw = conv_inputs(b, L, D_FM, 4, bf, DEV, state=False)
        kw["x"] = xz[..., :D_FM]
        cases.append((f"conv {label}", *(packed((op, kw), pack) if pack else (op, kw))))
    # Mamba-2's conv: mamba2-2.7b's x | B | C (5376 channels) inside in_proj's rows [z | xBC | dt]
    # (10576 wide), from the cache's state, as the 32k-prompt prefill runs it
    for L in (2048, 32768):
        op, kw = conv_inputs(1, L, 5376, 4, bf, DEV, state=True)
        kw["x"] = torch.randn(1, L, 10576, device=DEV, dtype=bf)[..., 5120:5120 + 5376]
        cases.append((f"conv m2-b1x{L}", op, kw))
    return cases


def bench(sweep: bool, rows: list, only: set[str] | None = None) -> None:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    bb = torch.empty_like(a)
    tbps = 2 * a.nbytes / (_time(lambda: bb.copy_(a)) * 1e-6) / 1e12
    del a, bb
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, copy {tbps:.2f} TB/s, "
          f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs", flush=True)
    before = {"selective_scan": _before("_scan_before"), "causal_conv1d": _before("_conv_before")}
    scan_default = (dict(scan.SCAN_CONFIG), scan.SCAN_UNROLL, scan.SCAN_WARPS_PER_SM)
    conv_default = (conv1d.CONV_BLOCK, conv1d.CONV_BLOCK_PACKED)

    def record(case, impl, fn, kw):
        out = fn()
        us = _time(fn)
        floor = _bytes(kw, out) / (tbps * 1e12) * 1e6
        rows.append(dict(case=case, impl=impl, us=round(us, 1), floor_us=round(floor, 1)))
        print(f"{case:22s} {impl:34s} {us:9.1f} us  floor {floor:7.1f} us  ({floor / us:4.0%} of copy speed)", flush=True)

    for case, op, kw in _bench_cases():
        if only and case.split()[-1] not in only:
            continue
        new = getattr(kernels, op)
        if before[op] is not None:
            record(case, "before (main)", lambda: getattr(before[op], op)(**kw), kw)
        record(case, "triton (default)", lambda: new(**kw), kw)
        if not sweep:
            continue
        if op == "selective_scan":
            for cfg in ((4, 32, 1, 1), (2, 32, 1, 1), (2, 32, 1, 2), (1, 32, 1, 1), (1, 32, 1, 2), (2, 64, 2, 1),
                        (1, 16, 1, 1), (1, 16, 1, 2), (1, 8, 1, 1), (1, 8, 1, 2)):
                for unroll in ((1, 2) if cfg in ((2, 32, 1, 1), (1, 32, 1, 1)) else (1,)):
                    scan.SCAN_CONFIG[16], scan.SCAN_UNROLL = (cfg,), unroll
                    record(case, f"triton P,W,warps,ahead={cfg} unroll={unroll}", lambda: new(**kw), kw)
            scan.SCAN_CONFIG.clear()
            scan.SCAN_CONFIG.update(scan_default[0])
            scan.SCAN_UNROLL = scan_default[1]
        else:
            for blk in ((32, 64, 4), (64, 128, 4), (64, 128, 8), (128, 128, 8), (32, 256, 4), (64, 256, 8), (16, 256, 4), (128, 64, 4), (256, 128, 8), (128, 256, 8), (16, 512, 4), (8, 1024, 8)):
                conv1d.CONV_BLOCK = conv1d.CONV_BLOCK_PACKED = blk
                record(case, f"triton L,C,warps={blk}", lambda: new(**kw), kw)
            conv1d.CONV_BLOCK, conv1d.CONV_BLOCK_PACKED = conv_default


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--cases", help="comma list of shapes to bench (b1x2048, b8x512, b32x512, packed16x512, b1x16384, "
                                    "m2-b1x2048, m2-b1x32768)")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    seed = int(os.environ.get("SEED", int.from_bytes(os.urandom(4), "little")))
    bad = 0
    rows: list = []
    with torch.inference_mode():
        if args.check:
            bad = check(seed)
        if args.bench:
            bench(args.sweep, rows, set(args.cases.split(",")) if args.cases else None)
    if args.json_out and rows:
        with open(args.json_out, "w") as f:
            for r in rows:
                f.write(json.dumps(dict(r, device=torch.cuda.get_device_name())) + "\n")
    sys.exit(1 if bad else 0)
