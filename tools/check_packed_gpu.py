#!/usr/bin/env python3
"""The packed Triton scans against the torch reference at model sizes, without pytest's start-up
(the same checks as tests/test_kernels_gpu.py's *_packed tests): for a short device call."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from test_ops import TOL, check_op, conv_inputs, packed, scan_inputs, ssd_inputs  # noqa: E402

from megatron_ssm.ops import triton as kernels  # noqa: E402

P = [700, 1, 300, 23]
T = sum(P)
for dtype in (torch.bfloat16, torch.float32):
    for name, impl, case in [
        ("conv1d", kernels.causal_conv1d, conv_inputs(1, T, 5376, 4, dtype, "cuda", state=False)),
        ("mamba1 scan", kernels.selective_scan, scan_inputs(1, T, 5120, 16, dtype, "cuda", state=False)),
        ("ssd scan (ours)", kernels.ssd_chunk_scan, ssd_inputs(1, T, 80, 64, 1, 128, 256, dtype, "cuda", state=False)),
    ]:
        errs = check_op(impl, *packed(case, P), TOL[dtype])
        print(f"packed {name} {dtype}: ok, relative errors {', '.join(f'{e:.1e}' for e in errs)}", flush=True)
