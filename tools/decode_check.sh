#!/usr/bin/env bash
# The skinny-GEMM decode kernel on one GPU, one device call (logs and JSON lines under $OUT):
#   rsync -a --delete --exclude .git --exclude .venv --exclude out --exclude mutants ./ /work/main/.gpu/gemv/
#   run(command="cd .gpu/gemv && WHL=../../.whl bash tools/decode_check.sh", carry=[".gpu/gemv", ".whl"])
# What is left to measure (two calls of ~3 min each):
#   STAGE=tests,check CHECK_ARGS=--quick bash tools/decode_check.sh        GPU tests; kernel vs cuBLAS vs PDL
#   STAGE=m2,fm LINS=torch,kernel,kernel-pdl bash tools/decode_check.sh    decode steps b1,16 / b1,32
# STAGE picks what runs (default check,m2,fm):
#   check  tools/gemv_check.py: correctness vs F.linear at the model shapes, kernel vs cuBLAS in TB/s
#   tests  the GPU tests of the kernel (tests/test_kernels_gpu.py -k linear)
#   m2     tools/benchmark.py mamba2-2.7b b1,16, prompt 512, 128 new: cuBLAS linears, then the kernel
#   fm     the same for falcon-mamba-7b b1,32, 64 new
# The A/B switch is MEGATRON_SSM_LINEAR=torch (only the linears go back to cuBLAS); LINS (default
# torch,kernel; also kernel-pdl) picks the sides, run as engines of one process; M2_BATCH / FM_BATCH
# the batches. Timeouts: T_CHECK, T_TESTS, T_M2, T_FM (seconds per step).
set -uo pipefail
OUT=${OUT:-out}
STAGE=${STAGE:-check,m2,fm}
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"
J=$OUT/bench.jsonl
if has check; then
    echo "# $(date -u +%T) check"
    timeout ${T_CHECK:-120} python3 tools/gemv_check.py --json-out "$OUT/gemv.jsonl" ${CHECK_ARGS:-} 2>&1 | quiet \
        | tee "$OUT/gemv.txt"
fi
if has tests; then
    timeout ${T_TESTS:-90} python3 -m pytest -q -p no:cacheprovider -p no:randomly -m gpu tests/test_kernels_gpu.py \
        -k "linear or dispatch" > "$OUT/pytest.txt" 2>&1
    grep -E "^(FAILED|ERROR|E  )|passed|failed" "$OUT/pytest.txt" | tail -20
fi
bench() {  # config batches new timeout: the A/B sides in one process (tools/benchmark.py --linear)
    echo "# $(date -u +%T) $1 batch $2" | tee -a "$OUT/bench.txt"
    timeout $4 python3 tools/benchmark.py --config "$1" --batch "$2" --prompt 512 --new "$3" \
        --linear ${LINS:-torch,kernel} --json-out "$J" --tag gemv 2>"$OUT/stderr-$(basename $1 .yaml).txt" | tee -a "$OUT/bench.txt"
    echo "# $(date -u +%T) rc ${PIPESTATUS[0]}" | tee -a "$OUT/bench.txt"
    grep -v -E "Warning|warnings.warn|Evict LRU|^W1|OMP_NUM_THREADS" "$OUT/stderr-$(basename $1 .yaml).txt" | tail -5
}
has m2 && bench configs/mamba2-2.7b.yaml ${M2_BATCH:-1,16} 128 ${T_M2:-150}
has fm && bench configs/falcon-mamba-7b.yaml ${FM_BATCH:-1,32} 64 ${T_FM:-150}
exit 0
