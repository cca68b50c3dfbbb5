#!/usr/bin/env bash
# One GPU call: install the carried wheels (megatron-core 0.19.2, mamba-ssm Triton-only), write the
# megatron-core fixtures, check our importer/exporter against megatron-core's model, run the gpu test.
#   run(command="cd .gpu/megatron && bash tools/make_megatron_fixtures.sh", carry=[".gpu/megatron", ".whl"])
# (.whl is found in ../../.whl when run from a copy under .gpu/). Everything lands in $OUT/megatron.tar.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-out}
mkdir -p "$OUT/megatron"
WHL=${WHL:-$( [ -d .whl ] && echo .whl || echo ../../.whl )}
wheels=$(ls $WHL/mamba_ssm-*.whl $WHL/megatron_core-*.whl 2>/dev/null)
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
        || { echo "wheel install failed"; exit 1; }
fi
export PYTHONPATH=$PWD:/tmp/site
{
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" 2>&1 | tail -1
    python3 -c "import einops; print('einops', einops.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/megatron/env.txt"
timeout 150 python3 tools/make_megatron_fixtures.py --out "$OUT/megatron/fixtures" --check 2>&1 \
    | tee "$OUT/megatron/make.log"
rc=${PIPESTATUS[0]}
timeout 100 python3 -m pytest -q -p no:cacheprovider -p no:randomly -rs tests/test_megatron_gpu.py 2>&1 \
    | tee "$OUT/megatron/pytest.log"
trc=${PIPESTATUS[0]}
tar -C "$OUT" -cf "$OUT/megatron.tar" megatron && rm -rf "$OUT/megatron"
echo "make rc=$rc pytest rc=$trc"
exit $(( rc != 0 ? rc : trc ))
