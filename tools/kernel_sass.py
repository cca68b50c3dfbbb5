#!/usr/bin/env python3
"""Compile the Mamba prefill kernels for a Hopper GPU here, without one, and show what their inner
loop costs: registers, spills, and per-iteration instructions, shuffles, shared-memory traffic and
SFU (MUFU) ops, read from the SASS (Triton's own ptxas and cuobjdump).

    python3 tools/kernel_sass.py scan 4,32,1,1 1,8,1,2    # _scan_kernel, (P, W, num_warps, AHEAD), n = 16
    python3 tools/kernel_sass.py scan-m2 1,8,1,1          # the same kernel as Mamba-2 uses it (n = 128)
    python3 tools/kernel_sass.py conv 64,128,8            # _conv_fwd_kernel, (BLOCK_L, BLOCK_C, num_warps)
    python3 tools/kernel_sass.py scan 2,32,1,1 --json     # one JSON line per config

The kernels are compiled with the strides and alignments the model passes (bf16 activations,
unit channel strides, other strides and sizes divisible by 16, as at falcon-mamba-7b's shapes). Triton picks register layouts from the memory
accesses a kernel makes, and its tie-breaks change between versions; a layout that splits a
channel's states over lanes shows up here as SHFL/STS/LDS in the scan's loop. Must run with
TRITON_INTERPRET unset (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

COUNTED = ("SHFL", "STS", "LDS", "BAR", "MUFU", "LDG", "STG")


def _sass(cubin: bytes) -> tuple[str, str]:
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return usage, sass


def _summary(usage: str, sass: str) -> dict:
    """Registers, stack, and the counts of the longest backward branch's body (the hot loop)."""
    out = dict(regs=int(re.search(r"REG:(\d+)", usage).group(1)), stack=int(re.search(r"STACK:(\d+)", usage).group(1)))
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    best = None
    for addr, ins in lines:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)
        if m and int(m.group(1), 16) < addr and (best is None or addr - int(m.group(1), 16) > best[1] - best[0]):
            best = (int(m.group(1), 16), addr)
    body = [ins for addr, ins in lines if best and best[0] <= addr <= best[1]]
    out["instructions"] = len(lines)
    out["loop_instructions"] = len(body)  # 0: no loop
    for k in COUNTED:
        out[f"loop_{k.lower()}"] = sum(re.search(rf"\b{k}\b", ins) is not None for ins in body)
    return out


def _compile(fn, constexprs: dict, unit: set, pointers: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, cons, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], cons[name] = "constexpr", constexprs[name]
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in unit:
            sig[name], cons[name] = "constexpr", 1
        elif name in ("dt_min", "dt_max"):
            sig[name] = "fp32"
        else:  # strides and sizes as at model shapes: multiples of 16 (the JIT specialises on that)
            sig[name] = "i32"
            if name != "heads_per_group":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def scan_config(p: int, w: int, warps: int, ahead: int, mamba2: bool = False, packed: bool = False) -> dict:
    from megatron_ssm.ops.triton import scan

    ptr = {n: "*bf16" for n in ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr")}
    ptr.update({n: "*fp32" for n in ("A_ptr", "D_ptr", "dt_bias_ptr", "h0_ptr", "hT_ptr")}, cu_ptr="*i32")
    unit = {"sx_c", "sB_n", "sC_n", "sz_c", "sy_c", "sD", "sbias", "sh0_n", "shT_n"}
    unit |= {"sA_h"} if mamba2 else {"sdt_h", "sA_n"}
    c = dict(HEADDIM=64 if mamba2 else 1, A_PER_HEAD=mamba2, HAS_D=True, HAS_Z=not mamba2, HAS_DT_BIAS=True,
             HAS_H0=False, PACKED=packed, P=p, W=w, BLOCK_N=128 if mamba2 else 16, EVEN_N=True, UNROLL=1,
             AHEAD=ahead, FAST_MATH=True)
    k = _compile(scan._scan_kernel, c, unit, ptr, warps)
    return dict(kernel="scan-m2" if mamba2 else "scan", config=[p, w, warps, ahead], **_summary(*_sass(k.asm["cubin"])))


def conv_config(bl: int, bc: int, warps: int) -> dict:
    from megatron_ssm.ops.triton import conv1d

    ptr = {n: "*bf16" for n in ("x_ptr", "w_ptr", "bias_ptr", "init_ptr", "y_ptr", "final_ptr")}
    ptr.update(seq_ptr="*i32", cu_ptr="*i32")
    c = dict(K=4, HAS_BIAS=True, HAS_INIT=False, SILU=True, PACKED=False, BLOCK_L=bl, BLOCK_C=bc, FAST_DIV=True)
    k = _compile(conv1d._conv_fwd_kernel, c, {"sx_c", "sy_c", "sw_k", "si_k"}, ptr, warps)
    return dict(kernel="conv", config=[bl, bc, warps], **_summary(*_sass(k.asm["cubin"])))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kernel", choices=["scan", "scan-m2", "conv"])
    ap.add_argument("configs", nargs="+", help="comma-separated integers per config")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("TRITON_INTERPRET=1 replaces the kernels by the interpreter: unset it")
    for cfg in args.configs:
        vals = [int(v) for v in cfg.split(",")]
        r = conv_config(*vals) if args.kernel == "conv" else scan_config(*vals, mamba2=args.kernel == "scan-m2")
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            loop = " ".join(f"{k}={r['loop_' + k.lower()]}" for k in COUNTED)
            body = f"loop {r['loop_instructions']} instructions: {loop}" if r["loop_instructions"] else "no loop"
            print(f"{r['kernel']} {tuple(r['config'])}: {r['regs']} registers, stack {r['stack']}, "
                  f"{r['instructions']} instructions; {body}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
