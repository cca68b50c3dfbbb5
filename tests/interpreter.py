"""Triton's CPU interpreter for the kernel tests (TRITON_INTERPRET=1, set by conftest.py before
anything imports triton, on machines without CUDA).

`interpreter_problem()` runs one tiny kernel with a run-time loop bound and says why the interpreter
cannot run the kernels here (triton missing, the variable unset, or a triton/numpy pair whose
interpreter fails: Triton 3.6's int()s one-element arrays, which numpy 2.4 refuses), or None.
"""
from __future__ import annotations

import functools
import importlib.util
import os


@functools.lru_cache(maxsize=None)
def interpreter_problem() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "TRITON_INTERPRET is not 1 (conftest.py sets it only where CUDA is absent)"
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _running_sum(x, out, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, n, BLOCK):  # a run-time bound: where numpy 2.4 broke Triton 3.6
            offs = start + tl.arange(0, BLOCK)
            acc += tl.load(x + offs, mask=offs < n, other=0.0)
        tl.store(out, tl.sum(acc, axis=0))

    x, out = torch.arange(10, dtype=torch.float32), torch.zeros(1)
    try:
        _running_sum[(1,)](x, out, 10, BLOCK=4)
    except Exception as e:  # noqa: BLE001 - any failure means the interpreter cannot run kernels here
        return f"Triton {triton.__version__}'s interpreter fails here: {type(e).__name__}: {e}"
    if out.item() != 45.0:
        return f"Triton {triton.__version__}'s interpreter summed 0..9 to {out.item()}"
    return None


def compile_for_sm90(fn, types, constexprs: dict, ptx_has: str = "") -> str:
    """Compile a @triton.jit kernel down to an sm_90 cubin here, without a GPU (Triton's own compiler
    and ptxas): catches what the interpreter lets through (loop-carried types, pointer casts, scalar
    atomics, constexpr branches). types(arg name) -> Triton type string for the other arguments;
    `ptx_has`: text the PTX must hold (an inline instruction the compiler might have dropped). Must run with TRITON_INTERPRET unset (see run_without_interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {a: "constexpr" if a in constexprs else types(a) for a in names}
    consts = {(names.index(a),): v for a, v in constexprs.items()}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert ptx_has in compiled.asm["ptx"], f"{ptx_has!r} not in the PTX of {fn.__name__} {constexprs}"
    return f"{fn.__name__} {constexprs}"


def run_without_interpreter(code: str, tmp_path, tests_dir: str, timeout: int = 300) -> list[str]:
    """Run python `code` in a fresh process without TRITON_INTERPRET (so kernels compile for real),
    with `tests_dir` importable; its stdout lines. Skips the test where Triton has no CUDA toolchain."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([tests_dir, *sys.path]))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    if run.returncode and ("ptxas" in run.stderr or "GPUTarget" in run.stderr) and "CompilationError" not in run.stderr:
        pytest.skip(f"no Triton CUDA toolchain here: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()
