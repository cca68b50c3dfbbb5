# ===== .gpu/s13c1.sh =====
#!/usr/bin/env bash
# session 13 call 1: the greedy token inside the decode graph: GPU tests, engine overhead, benchmark rows
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s13c1; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
timeout -s INT 200 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly -n 3 tests/test_model_gpu.py \
    -k "matches_hf_and_reference" > $L/pytest.txt 2>&1
echo "pytest rc=$? at $(( $(date +%s) - T0 ))s"; grep -E "^(FAILED|ERROR|E  )|passed|failed" $L/pytest.txt | tail -12 | cut -c1-300
timeout 120 python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch 1 --prompt 512 --new 64 \
    --json-out $L/bench.jsonl --tag s13 2>&1 | quiet | tee -a $L/bench.txt | grep -v "^#   linear"
echo "fm bench at $(( $(date +%s) - T0 ))s"
timeout 100 python3 .gpu/engine_prof.py --config configs/falcon-mamba-7b.yaml 2>&1 | quiet > $L/engine-prof-fm.txt
echo "prof rc=$? at $(( $(date +%s) - T0 ))s"; head -40 $L/engine-prof-fm.txt | cut -c1-150
LEFT=$(( 570 - ($(date +%s) - T0) ))
timeout $LEFT python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1,16 --prompt 512 --new 128 \
    --json-out $L/bench.jsonl --tag s13 2>&1 | quiet | tee -a $L/bench.txt | grep -v "^#   linear"
echo "m2 bench rc=$? at $(( $(date +%s) - T0 ))s"
tar czf $OUT/s13c1.tgz -C $OUT s13c1
# ===== .gpu/s13c2.sh =====
#!/usr/bin/env bash
# session 13 call 2: the whole GPU suite (the decode graph's argmax, forkserver rank pools on GPU)
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s13c2; mkdir -p $L
. tools/gpu_env.sh $L/env.txt
timeout -s INT 560 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly -n 8 --durations=15 tests > $L/pytest_suite.txt 2>&1
echo "suite rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed|error" $L/pytest_suite.txt | tail -25 | cut -c1-250
grep -A18 "slowest" $L/pytest_suite.txt | cut -c1-160
# ===== .gpu/engine_prof.py =====
# unchanged: the copy in docs/bench/2026-12-02-h200-s11-calls.sh
# ===== .gpu/s13c3.sh =====
#!/usr/bin/env bash
# session 13 call 3: falcon-mamba-7b b1 decode against its floor again (two runs of the benchmark, one process each)
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s13c3; mkdir -p $L
. tools/gpu_env.sh $L/env.txt
for i in 1 2; do
timeout 120 python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch 1 --prompt 512 --new 128 \
    --json-out $L/bench.jsonl --tag s13 2>&1 | quiet | tee -a $L/bench.txt | grep -v "^#   linear"
done
