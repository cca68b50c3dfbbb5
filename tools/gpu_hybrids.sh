#!/usr/bin/env bash
# One call on the lent one-GPU machine: every GPU-marked test, then a benchmark row per hybrid family at
# its real size beside HF's own implementation (issue #12), logs and JSON lines under $OUT (gpu_sweep.sh's
# SWEEP=hybrids runs this with 2048-token prompts):
#   run(command="bash tools/gpu_hybrids.sh", carry=[".whl"], timeout_s=600)
# PYTEST_ARGS="-n 8" spreads the GPU tests over processes (pytest-xdist, carried in .whl): their time is
# mostly Triton compiling and autotuning on the host, which parallelises.
# Each step has its own timeout, so a failing step still leaves the others' numbers.
# pytest gets SIGINT at its timeout, so a cut run still prints its failures and summary.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export MEGATRON_SSM_DIST_TIMEOUT=120
. "$(dirname "$0")/gpu_env.sh"
J=$OUT/bench.jsonl
timeout -s INT "${TEST_S:-200}" python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly ${PYTEST_ARGS:-} ${TESTS:-tests} > "$OUT/pytest_gpu.txt" 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.txt" | tail -25
for cfg in ${CONFIGS:-nemotron-h-8b falcon-h1-7b zamba2-2.7b zamba-7b-v1}; do
    timeout "${BENCH_S:-50}" python3 tools/benchmark.py --config configs/$cfg.yaml --batch 1,16 --prompt ${PROMPT:-512} --new ${NEW:-64} \
        --json-out "$J" 2>&1 | grep -v -i -E "warn" | tail -4 | tee -a "$OUT/log.txt"
    case " ${HF_SKIP:-} " in *" $cfg "*) continue ;; esac
    # HF's own model (its PyTorch paths: the carried mamba-ssm is Triton-only, so keep it off the path)
    PYTHONPATH=$PWD timeout "${HF_S:-35}" python3 tools/baselines.py --impl hf --config configs/$cfg.yaml --batch 1 \
        --prompt ${PROMPT:-512} --new 8 --json-out "$J" 2>&1 | grep -v -i warn | tail -2 | tee -a "$OUT/log.txt"
done
exit 0
