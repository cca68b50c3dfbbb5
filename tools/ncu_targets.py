#!/usr/bin/env python3
"""Launch one decode kernel a few times at a model's size, for Nsight Compute to profile one launch
(tools/speed_check.sh's `ncu` stage; ncu reads the hardware counters on the Firecracker machines):

    ncu --clock-control none -k regex:_gemv_kernel -s 2 -c 1 --set full -o rep python3 tools/ncu_targets.py gemv-fm-out-proj

Targets (bf16, batch 1): gemv-fm-out-proj (falcon-mamba-7b's out_proj, 8192 -> 4096, in the tuned
configuration of session 9: 3.4 TB/s against in_proj's 4.2), gemv-fm-x-proj (its x_proj, 8192 -> 288),
entry-fm-in-proj (its in_proj with the block's entry inside, add_rms_norm_linear: fp32 stream, the
tuned n64 k128 configuration),
mamba2-fused (the fused Mamba-2 decode kernel at mamba2-2.7b's size), mamba2-update (the plain SSD state
update there). Each runs five times: skip two with -s 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CONFIGS = {"gemv-fm-out-proj": (4096, 8192, (64, 128, 1, 4, True, 5)),
           "gemv-fm-x-proj": (288, 8192, (32, 128, 13, 4, True, 3))}


def main(target: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ncu_targets.py needs CUDA")
    bf = torch.bfloat16
    if target == "entry-fm-in-proj":
        from test_ops import entry_linear_inputs

        from megatron_ssm.ops.triton import gemv

        _, kw = entry_linear_inputs((1,), 16384, 4096, bf, "cuda")
        run = lambda: gemv.add_rms_norm_linear(**kw, config=gemv.Config(64, 128, 1, 4, True, 5))  # noqa: E731
    elif target in CONFIGS:
        from megatron_ssm.ops.triton import gemv

        n, k, cfg = CONFIGS[target]
        w = torch.randn(n, k, device="cuda", dtype=bf)
        x = torch.randn(1, k, device="cuda", dtype=bf)
        run = lambda: gemv.linear(x, w, config=gemv.Config(*cfg))  # noqa: E731
    elif target in ("mamba2-fused", "mamba2-update"):
        from test_decode_fused import mamba2_decode_inputs
        from test_ops import ssd_update_inputs

        from megatron_ssm.ops import triton as kernels

        if target == "mamba2-fused":
            _, kw = mamba2_decode_inputs(1, 80, 64, 1, 128, 4, bf, "cuda")
            run = lambda: kernels.mamba2_decode_step(**kw)  # noqa: E731
        else:
            _, kw = ssd_update_inputs(1, 80, 64, 1, 128, bf, "cuda")
            run = lambda: kernels.ssd_state_update(**kw)  # noqa: E731
    else:
        raise SystemExit(f"unknown target {target!r}; expected one of "
                         f"{sorted(CONFIGS) + ['entry-fm-in-proj', 'mamba2-fused', 'mamba2-update']}")
    for _ in range(5):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
