#!/usr/bin/env bash
# The Mamba-1 prefill kernels on one GPU, one device call (logs under $OUT):
#   check  tools/scan_check.py --check: the scan and conv kernels vs the torch reference at model sizes,
#          and tools/check_packed_gpu.py (packed sequences)
#   bench  tools/scan_check.py --bench [--sweep with SWEEP=1]: kernel timings, before (main's kernels,
#          when megatron_ssm/ops/triton/_scan_before.py / _conv_before.py were copied in) and after
#   model  tools/benchmark.py falcon-mamba-7b, --batch $FM_BATCH (1,32) x 512 tokens: TTFT
#   prof   tools/profile_step.py falcon-mamba-7b prefill b8 x 512: the scan's share of the GPU time
# STAGE picks (default check,bench,model,prof; run in the order check, model, prof, bench). From the main checkout, with this branch in .gpu/NAME:
#   git -C /work/wt/NAME show main:megatron_ssm/ops/triton/scan.py > .gpu/NAME/megatron_ssm/ops/triton/_scan_before.py
#   run(command="cd .gpu/NAME && WHL=../../.whl bash tools/scan_check.sh", carry=[".gpu/NAME", ".whl"])
set -uo pipefail
OUT=${OUT:-out}
STAGE=${STAGE:-check,bench,model,prof}
mkdir -p "$OUT"
rc=0
. "$(dirname "$0")/gpu_env.sh" "$OUT/env.txt"
if has check; then
    timeout ${T_CHECK:-150} python3 tools/scan_check.py --check 2>&1 | quiet | tee "$OUT/check.log" || rc=1
    timeout ${T_PACKED:-40} python3 tools/check_packed_gpu.py 2>&1 | quiet | tee -a "$OUT/check.log" || rc=1
fi
if has model; then
    timeout ${T_MODEL:-70} python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch ${FM_BATCH:-1,32} \
        --prompt 512 --new 16 --json-out "$OUT/model.jsonl" --tag scan1 2>&1 | quiet | tee "$OUT/model.log" || rc=1
fi
if has prof; then
    timeout ${T_PROF:-60} python3 tools/profile_step.py --config configs/falcon-mamba-7b.yaml --phase prefill --batch 8 \
        --prompt 512 --steps 2 --top 25 > "$OUT/prof_prefill_b8.txt" 2>&1 || rc=1
    head -14 "$OUT/prof_prefill_b8.txt"
fi
if has bench; then
    timeout ${T_BENCH:-120} python3 tools/scan_check.py --bench ${SWEEP:+--sweep} ${CASES:+--cases $CASES} --json-out "$OUT/kernels.jsonl" 2>&1 \
        | quiet | tee "$OUT/kernels.log" || rc=1
fi
exit $rc
