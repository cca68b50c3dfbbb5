#!/usr/bin/env bash
# GPU kernel check, one call on the lent GPU machine (logs under $OUT, or ./out elsewhere):
#   1. installs the wheels carried in .whl (mamba-ssm without CUDA extensions, megatron-core);
#   2. pytest: the CPU op tests and every kernel against the reference at model sizes;
#   3. times each kernel against the reference (tests/test_kernels_gpu.py --bench).
# Wheels (here, once; .whl is git-ignored):
#   MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip wheel --no-deps --no-build-isolation \
#       -w .whl mamba_ssm-2.3.2.post1.tar.gz      # a pure-python wheel: only the Triton kernels
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
# Device call: run(command="bash tools/gpu_kernel_check.sh", carry=[".whl"], timeout_s=600)
set -uo pipefail
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the bench runs as a script, not under pytest
OUT=${OUT:-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1

wheels=$(ls .whl/mamba_ssm-*.whl .whl/megatron_core-*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -1
    python3 -c "from megatron_ssm.ops import dispatch as d; print('mamba-ssm SSD scan:', d._mamba_chunk_scan_combined() is not None)"
} 2>&1 | tee "$OUT/env.txt"

timeout 420 python3 -m pytest -q -p no:cacheprovider -rs tests/test_ops.py tests/test_kernels_gpu.py 2>&1 \
    | tee "$OUT/pytest.log"
rc=${PIPESTATUS[0]}
timeout 300 python3 tests/test_kernels_gpu.py --bench --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
brc=${PIPESTATUS[0]}
echo "pytest rc=$rc bench rc=$brc"
exit $(( rc != 0 ? rc : brc ))
