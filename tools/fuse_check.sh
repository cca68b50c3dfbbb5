#!/usr/bin/env bash
# The fused decode steps on one GPU, one device call (logs and JSON lines under $OUT):
#   run(command="cd .gpu/fuse && WHL=../../.whl bash tools/fuse_check.sh", carry=[".gpu/fuse", ".whl"], timeout_s=200)
# STAGE picks what runs (default check,bench):
#   check     tools/fuse_check.py: kernels vs the references at model sizes, a graph replay, and each
#             model's decode logits fused / unfused / torch plus its graphed step timed fused vs unfused
#   bench     tools/benchmark.py for mamba2-2.7b (b1,16 x 512 + 128) and falcon-mamba-7b (b1,32 x 512 + 64)
#   benchoff  the same with MEGATRON_SSM_FUSED_DECODE=0 (the unfused chain)
#   prof      tools/profile_step.py decode b1 of both models (the kernels a layer runs)
set -uo pipefail
OUT=${OUT:-out}
STAGE=${STAGE:-check,bench}
mkdir -p "$OUT"
. "$(dirname "$0")/gpu_env.sh"
J=$OUT/bench.jsonl
stamp() { echo "[$(date +%s)] $*"; }
bench() {  # $1: tag
    timeout ${T_M2:-80} python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch ${M2_BATCH:-1,16} \
        --prompt 512 --new 128 --json-out "$J" --tag "$1" 2>&1 | quiet | tee -a "$OUT/bench.txt"
    timeout ${T_FM:-60} python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch ${FM_BATCH:-1,32} \
        --prompt 512 --new 64 --json-out "$J" --tag "$1" 2>&1 | quiet | tee -a "$OUT/bench.txt"
}
if has check; then
    stamp check
    timeout ${T_CHECK:-100} python3 tools/fuse_check.py ${CHECK_ARGS:-} 2>&1 | quiet | tee "$OUT/fuse_check.txt"
fi
if has bench; then stamp bench; bench fused; fi
if has benchoff; then stamp benchoff; MEGATRON_SSM_FUSED_DECODE=0 bench unfused; fi
if has prof; then
    stamp prof
    timeout 40 python3 tools/profile_step.py --config configs/mamba2-2.7b.yaml --batch 1 --top 16 \
        > "$OUT/prof_m2_decode_b1.txt" 2>&1; head -3 "$OUT/prof_m2_decode_b1.txt"
    timeout 50 python3 tools/profile_step.py --config configs/falcon-mamba-7b.yaml --batch 1 --top 16 \
        > "$OUT/prof_fm_decode_b1.txt" 2>&1; head -3 "$OUT/prof_fm_decode_b1.txt"
fi
stamp done
