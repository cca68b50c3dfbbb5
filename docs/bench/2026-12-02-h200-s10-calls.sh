# ---- call 2: .gpu/c2.sh, run as run(command="timeout N bash .gpu/c2.sh", carry=[".whl", ".gpu"])
#!/usr/bin/env bash
# session 10, call 2: GEMV reduction + entry fusion
set -uo pipefail
W=$OUT/w; mkdir -p $W
. tools/gpu_env.sh $W/env.txt
timeout -s INT 230 python3 -m pytest -q -p no:cacheprovider -p no:randomly -m gpu -n 8 tests/test_kernels_gpu.py \
    -k "linear or add_rms_norm" > $W/pytest.txt 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed|\[100%\]" $W/pytest.txt | tail -15
timeout 130 python3 tools/ablate_step.py --config configs/falcon-mamba-7b.yaml --batch 1,4 --skip add_norm,x_proj,in_proj 2>&1 | quiet | tee $W/ablate.txt
timeout 110 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1,4 --skip add_norm,in_proj,out_proj 2>&1 | quiet | tee -a $W/ablate.txt
timeout 150 python3 tools/fuse_check.py --skip-kernels --models falcon-mamba-7b,mamba2-2.7b --batch-fm 1,4 --batch-m2 1,4 \
    --fused mamba1 --unfused mamba1 --fused-env MEGATRON_SSM_ENTRY_ROWS=16 --unfused-env MEGATRON_SSM_ENTRY_ROWS=0 2>&1 | quiet | tee $W/fuse.txt | tail -20
tar -C $OUT -czf $OUT/c2.tgz w && rm -rf $W

# ---- call 3: .gpu/c3.sh, run as run(command="timeout N bash .gpu/c3.sh", carry=[".whl", ".gpu"])
#!/usr/bin/env bash
set -uo pipefail
W=$OUT/w; mkdir -p $W
. tools/gpu_env.sh $W/env.txt
timeout -s INT 150 python3 -m pytest -q -p no:cacheprovider -p no:randomly -m gpu -n 8 tests/test_kernels_gpu.py \
    -k "add_rms_norm_linear" > $W/pytest.txt 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" $W/pytest.txt | tail -8
timeout 150 python3 tools/fuse_check.py --skip-kernels --models falcon-mamba-7b,mamba2-2.7b --batch-fm 1 --batch-m2 1 \
    --fused mamba1 --unfused mamba1 --fused-env MEGATRON_SSM_ENTRY_ROWS=1 --unfused-env MEGATRON_SSM_ENTRY_ROWS=0 2>&1 | quiet | tee $W/fuse.txt | grep -v "gemv tuned"
timeout 100 python3 tools/ablate_step.py --config configs/falcon-mamba-7b.yaml --batch 1 --skip add_norm,x_proj,conv 2>&1 | quiet | tee $W/ablate.txt
tar -C $OUT -czf $OUT/c3.tgz w && rm -rf $W

# ---- call 4: .gpu/c4.sh, run as run(command="timeout N bash .gpu/c4.sh", carry=[".whl", ".gpu"])
#!/usr/bin/env bash
set -uo pipefail
W=$OUT/w; mkdir -p $W
. tools/gpu_env.sh $W/env.txt
timeout 150 python3 tools/fuse_check.py --skip-kernels --models falcon-mamba-7b,mamba2-2.7b --batch-fm 1 --batch-m2 1 \
    --fused mamba1 --unfused mamba1 --fused-env MEGATRON_SSM_ENTRY_ROWS=1 --unfused-env MEGATRON_SSM_ENTRY_ROWS=0 2>&1 | quiet | tee $W/fuse.txt | grep -v "gemv tuned"
if grep "falcon-mamba-7b b1 graphed" $W/fuse.txt | awk "{exit !(\$7 < \$10)}"; then E=1; else E=0; fi
echo "benchmarks with MEGATRON_SSM_ENTRY_ROWS=$E"
export MEGATRON_SSM_ENTRY_ROWS=$E
timeout -s INT 120 python3 -m pytest -q -p no:cacheprovider -p no:randomly -m gpu -n 8 tests/test_kernels_gpu.py \
    -k "add_rms_norm_linear or linear_split" > $W/pytest.txt 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" $W/pytest.txt | tail -8
timeout 75 python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml --batch 1,32 --prompt 512 --new 64 --json-out $W/bench.jsonl --tag s10 2>&1 | quiet | tee -a $W/bench.txt
timeout 90 python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1,16,64 --prompt 512 --new 128 --json-out $W/bench.jsonl --tag s10 2>&1 | quiet | tee -a $W/bench.txt
tar -C $OUT -czf $OUT/c4.tgz w && rm -rf $W

# ---- call 5: .gpu/c5.sh, run as run(command="timeout N bash .gpu/c5.sh", carry=[".whl", ".gpu"])
#!/usr/bin/env bash
set -uo pipefail
W=$OUT/w; mkdir -p $W
. tools/gpu_env.sh $W/env.txt
start=$(date +%s)
timeout -s INT 170 python3 -m pytest -q -p no:cacheprovider -p no:randomly -m gpu -n 8 tests/test_model_gpu.py > $W/pytest.txt 2>&1
echo "pytest rc=$? in $(( $(date +%s) - start )) s"; grep -E "^(FAILED|ERROR)|passed|failed|destroy_process_group" $W/pytest.txt | tail -8
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
timeout 70 $NCU --clock-control none -k regex:_gemv_kernel -s 2 -c 1 --set full -f -o $W/ncu-entry python3 tools/ncu_targets.py entry-fm-in-proj > $W/ncu-run.txt 2>&1
timeout 30 $NCU -i $W/ncu-entry.ncu-rep --page details > $W/ncu-entry.txt 2>&1; rm -f $W/ncu-entry.ncu-rep
grep -E "Duration|Registers Per|Memory Throughput|SM Active|Elapsed Cycles" $W/ncu-entry.txt
tar -C $OUT -czf $OUT/c5.tgz w && rm -rf $W

