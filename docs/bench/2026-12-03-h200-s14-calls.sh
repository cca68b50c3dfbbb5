# ===== .gpu/s14c1.sh =====
#!/usr/bin/env bash
# session 14 call 1: each block's entry in the projection before it (EXIT); states and weights loaded
# before the PDL wait (EARLY); more of a narrowing projection's weights hinted to L2; benchmark rows
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s14c1; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout -s INT 150 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly -n 8 tests/test_kernels_gpu.py \
    tests/test_model_gpu.py -k "mamba2_decode or mamba1_decode or conv1d_update or state_update or linear_into_entry or matches_hf_and_reference" \
    > $L/pytest.txt 2>&1
el pytest $?; grep -E "^(FAILED|ERROR|E  )|passed|failed" $L/pytest.txt | tail -12 | cut -c1-300
V="MEGATRON_SSM_EXIT_ROWS=0,MEGATRON_SSM_EARLY_LOADS=0,MEGATRON_SSM_EXIT_ROWS=0+MEGATRON_SSM_EARLY_LOADS=0,MEGATRON_SSM_GEMV_PREFETCH_NARROWING=1024,MEGATRON_SSM_GEMV_PREFETCH_NARROWING=4096,MEGATRON_SSM_GEMV_PREFETCH_NARROWING=65536,MEGATRON_SSM_GEMV_PREFETCH=1024+MEGATRON_SSM_GEMV_PREFETCH_NARROWING=256"
timeout 110 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1 --replays 300 --rounds 3 --skip "$V" 2>&1 | quiet > $L/ab-m2.txt
el ab-m2 $?; grep " ms " $L/ab-m2.txt | cut -c1-200; tail -3 $L/ab-m2.txt | cut -c1-300
timeout 110 python3 tools/ablate_step.py --config configs/falcon-mamba-7b.yaml --batch 1 --replays 200 --rounds 3 --skip "$V" 2>&1 | quiet > $L/ab-fm.txt
el ab-fm $?; grep " ms " $L/ab-fm.txt | cut -c1-200; tail -3 $L/ab-fm.txt | cut -c1-300
timeout 45 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 16 --replays 200 --rounds 2 \
    --skip "MEGATRON_SSM_EXIT_ROWS=0,MEGATRON_SSM_EARLY_LOADS=0" 2>&1 | quiet > $L/ab-m2-b16.txt
el ab-m2-b16 $?; grep " ms " $L/ab-m2-b16.txt | cut -c1-200
timeout 60 python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch 1 --prompt 512 --new 128 \
    --json-out $L/bench.jsonl --tag s14 2>&1 | quiet | tee -a $L/bench.txt | grep -v "^#   linear"
el bench-fm $?
LEFT=$(( 570 - ($(date +%s) - T0) ))
timeout $LEFT python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1 --prompt 512 --new 128 \
    --json-out $L/bench.jsonl --tag s14 2>&1 | quiet | tee -a $L/bench.txt | grep -v "^#   linear"
el bench-m2 $?
# ===== .gpu/s14c3.sh =====
#!/usr/bin/env bash
# session 14 call 3 (after the fixes): GPU model tests, falcon-mamba-7b's step A/B again, benchmark rows beside mamba-ssm
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s14c3; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout -s INT 130 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly -n 8 tests/test_kernels_gpu.py \
    tests/test_model_gpu.py -k "matches_hf_and_reference or linear_into_entry or row_scale or mamba1_decode" > $L/pytest.txt 2>&1
el pytest $?; grep -E "^(FAILED|ERROR|E  )|passed|failed" $L/pytest.txt | tail -8 | cut -c1-300
timeout 70 python3 tools/ablate_step.py --config configs/falcon-mamba-7b.yaml --batch 1 --replays 200 --rounds 2 \
    --skip "MEGATRON_SSM_EXIT_ROWS=0,MEGATRON_SSM_EARLY_LOADS=0,MEGATRON_SSM_EXIT_ROWS=0+MEGATRON_SSM_EARLY_LOADS=0" 2>&1 | quiet > $L/ab-fm.txt
el ab-fm $?; grep " ms " $L/ab-fm.txt | cut -c1-200
b() { local t=$1; shift; timeout $t python3 tools/benchmark.py "$@" --json-out $L/ours.jsonl --tag s14 2>&1 | quiet | tee -a $L/ours.txt | grep -v "^#   linear"; }
b 45 --config configs/falcon-mamba-7b.yaml --batch 1 --prompt 512 --new 128; el fm $?
b 75 --config configs/mamba2-2.7b.yaml --batch 1,16 --prompt 512 --new 128; el m2 $?
LEFT=$(( 545 - ($(date +%s) - T0) ))
timeout $LEFT python3 tools/baselines.py --impl mamba-ssm --config configs/mamba2-2.7b.yaml --batch 1,16 --prompt 512 --new 128 \
    --json-out $L/mamba-ssm.jsonl 2>&1 | quiet | tee -a $L/mamba-ssm.txt
el m2-base $?
# ===== .gpu/s14c4.sh =====
#!/usr/bin/env bash
# session 14 call 4: falcon-mamba-7b b1 against its floor twice more (one process each), and its b32 x 512 TTFT
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s14c4; mkdir -p $L
. tools/gpu_env.sh $L/env.txt
for i in 1 2; do
timeout 45 python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch 1 --prompt 512 --new 128 \
    --json-out $L/ours.jsonl --tag s14 2>&1 | quiet | tee -a $L/ours.txt | grep -v "^#   linear"
done
timeout 60 python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch 32 --prompt 512 --new 16 \
    --json-out $L/ours.jsonl --tag s14 2>&1 | quiet | tee -a $L/ours.txt | grep -v "^#   linear"
# ===== .gpu/s14c5.sh =====
#!/usr/bin/env bash
# session 14 call 5: the hybrids' GPU tests with the exit path (b1 graphs once rows finish)
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s14c5; mkdir -p $L
. tools/gpu_env.sh $L/env.txt
timeout -s INT 140 python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly -n 4 tests/test_model_gpu.py -k hybrid \
    > $L/pytest.txt 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR|E  )|passed|failed" $L/pytest.txt | tail -8 | cut -c1-300
