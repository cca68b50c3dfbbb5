"""The prefill scan's register layout, checked in the SASS that Triton compiles for sm_90 here (no
GPU needed: tools/kernel_sass.py, Triton's own ptxas). The kernel is fast only while each lane
holds whole channels: a layout that splits a channel's states over lanes (which Triton picks when
a memory access suggests it; its tie-breaks differ between versions) adds shuffles and shared
memory to every time step. Instruction counts are left to benchmarks; this checks the structure.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _compile(kernel: str, *configs: str) -> list[dict]:
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import triton
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this triton has no NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the real kernels
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_sass.py"), kernel, *configs, "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_scan_loop_keeps_channels_in_lanes():
    for r in _compile("scan", "4,32,1,1", "1,32,1,1", "1,8,1,2"):
        cfg = tuple(r["config"])
        assert r["stack"] == 0, (cfg, r)  # no spills
        assert r["loop_sts"] == r["loop_lds"] == r["loop_bar"] == 0, (cfg, r)
        # W = 32: a channel's 16 states in one thread, no shuffle; W = 8: over 4 lanes, 2 per step (y)
        assert r["loop_shfl"] == (0 if cfg[1] == 32 else 2), (cfg, r)
        assert r["loop_mufu"] >= 16 * cfg[0] // max(1, 32 // cfg[1]), (cfg, r)  # the exp2 of every state is there
