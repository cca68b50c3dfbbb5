#!/usr/bin/env bash
# One-GPU speed check, one device call (logs and JSON lines under $OUT, tarred into one file):
#   run(command="bash tools/speed_check.sh", carry=[".whl"], timeout_s=240)
# STAGE picks what runs: tests (the GPU tests of the packed/graphed paths), bench (mamba2-2.7b and
# falcon-mamba-7b TTFT and decode), suite (every GPU test, pytest-xdist -n $XDIST), nopack (the pre-packing prefill path, for A/B), base (mamba-ssm's
# generate on the same workloads), serve (tools/serving_benchmark.py: ours, ours unpacked, mamba-ssm),
# prof (where an eager prefill and a decode step spend their time), plain (bench's rows
# with --no-decode-ahead), hybrids (nemotron-h-8b and falcon-h1-7b, plain and ahead), ablate (each decode
# stage's cost, tools/ablate_step.py), ncu (Nsight Compute on single decode kernels, tools/ncu_targets.py);
# default: tests,bench. Each step has its own timeout.
set -uo pipefail
OUT=${OUT:-out}
STAGE=${STAGE:-tests,bench}
mkdir -p "$OUT/logs"
L=$OUT/logs
J=$L/bench.jsonl
FM_BATCH=${FM_BATCH-1,32}
. "$(dirname "$0")/gpu_env.sh" "$L/env.txt"
if has tests; then
    timeout -s INT ${T_TESTS:-90} python3 -m pytest -q -p no:cacheprovider -m gpu ${XDIST:+-n $XDIST} \
        tests/test_kernels_gpu.py tests/test_model_gpu.py -k "${TESTS_K:-packed or model}" > "$L/pytest.txt" 2>&1
    grep -E "^(FAILED|ERROR|E  )|passed|failed" "$L/pytest.txt" | tail -20
fi
if has suite; then  # every GPU-marked test (make test-gpu), spread over processes: most of its time is compiling
    timeout ${T_SUITE:-240} python3 -m pytest -q -m gpu -p no:cacheprovider -p no:randomly -n ${XDIST:-8} tests \
        > "$L/pytest_suite.txt" 2>&1
    echo "suite rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$L/pytest_suite.txt" | tail -20
fi
if has bench; then
    timeout ${T_M2:-80} python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch ${M2_BATCH:-1,16,64} \
        --prompt 512 --new ${NEW:-128} --json-out "$J" --tag "${TAG:-speed}" 2>&1 | quiet | tee -a "$L/bench.txt"
    [ -n "$FM_BATCH" ] && timeout ${T_FM:-60} python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml \
        --batch $FM_BATCH --prompt 512 --new 64 --json-out "$J" --tag "${TAG:-speed}" 2>&1 | quiet | tee -a "$L/bench.txt"
fi
if has plain; then  # the same rows without decode steps launched ahead (the engine's default since session 8)
    timeout ${T_M2:-80} python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch ${M2_BATCH:-1,16,64} \
        --prompt 512 --new ${NEW:-128} --no-decode-ahead --json-out "$J" --tag "${TAG:-speed}-plain" 2>&1 | quiet | tee -a "$L/bench.txt"
    [ -n "$FM_BATCH" ] && timeout ${T_FM:-60} python3 tools/benchmark.py --config configs/falcon-mamba-7b.yaml \
        --batch $FM_BATCH --prompt 512 --new 64 --no-decode-ahead --json-out "$J" --tag "${TAG:-speed}-plain" 2>&1 | quiet | tee -a "$L/bench.txt"
fi
if has hybrids; then  # nemotron-h-8b and falcon-h1-7b, plain then ahead
    for cfg in ${HYBRIDS:-nemotron-h-8b falcon-h1-7b}; do
        for ahead in --no-decode-ahead --decode-ahead; do
            timeout ${T_HY:-60} python3 tools/benchmark.py --config configs/$cfg.yaml --batch 1,16 --prompt 512 --new 64 \
                $ahead --json-out "$J" --tag "${TAG:-speed}${ahead#-}" 2>&1 | quiet | tee -a "$L/bench.txt"
        done
    done
fi
if has nopack; then
    timeout 50 python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1,16 --prompt 512 --new 32 \
        --no-pack --json-out "$J" --tag no-pack 2>&1 | quiet | tee -a "$L/bench.txt"
fi
if has base; then
    timeout ${T_BASE:-70} python3 tools/baselines.py --impl mamba-ssm --config configs/mamba2-2.7b.yaml --batch 1,16,64 \
        --prompt 512 --new 128 --json-out "$J" 2>&1 | grep -v -i warn | tee -a "$L/bench.txt"
fi
if has serve; then  # the serving benchmark: ours, ours without packed/graphed prefill, mamba-ssm (~4 min)
    # mamba-ssm serves one request at a time: its throughput is the same at every rate, so one rate
    S="--config configs/mamba2-2.7b.yaml --requests ${REQUESTS:-64} --json-out $L/serve.jsonl"
    timeout ${T_SERVE:-110} python3 tools/serving_benchmark.py $S --rates ${RATES:-2,8,32,128} 2>&1 | quiet | tee -a "$L/serve.txt"
    timeout ${T_SERVE:-110} python3 tools/serving_benchmark.py $S --rates ${RATES:-2,8,32,128} --no-pack 2>&1 | quiet | tee -a "$L/serve.txt"
    timeout ${T_SERVE_BASE:-80} python3 tools/serving_benchmark.py $S --rates ${BASE_RATES:-4} --impl mamba-ssm \
        --plot "$L/serving-mamba2-2.7b.png" 2>&1 | quiet | tee -a "$L/serve.txt"
fi
if has prof; then
    timeout 50 python3 tools/profile_step.py --config configs/mamba2-2.7b.yaml --phase prefill --batch 1 --prompt 512 \
        --steps 3 --top 30 > "$L/profile_prefill_b1.txt" 2>&1; head -4 "$L/profile_prefill_b1.txt"
    timeout 40 python3 tools/profile_step.py --config configs/mamba2-2.7b.yaml --batch 1 --top 30 \
        > "$L/profile_decode_b1.txt" 2>&1; head -3 "$L/profile_decode_b1.txt"
fi
if has ablate; then  # what each decode stage costs inside the graphed step (tools/ablate_step.py)
    timeout ${T_AB:-150} python3 tools/ablate_step.py --config configs/falcon-mamba-7b.yaml --batch ${AB_BATCH:-1,16} \
        --skip ${AB_FM_SKIP:-x_proj,dt_proj,conv,update,in_proj,out_proj,add_norm} 2>&1 | quiet | tee -a "$L/ablate.txt"
    timeout ${T_AB:-150} python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch ${AB_BATCH:-1,16} \
        --skip ${AB_M2_SKIP:-conv,update,norm,conv+update+norm,in_proj,out_proj,add_norm} 2>&1 | quiet | tee -a "$L/ablate.txt"
fi
if has ncu; then  # Nsight Compute on single decode kernels (tools/ncu_targets.py); report pages as text
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
    for t in ${NCU_TARGETS:-gemv-fm-out-proj:_gemv_kernel gemv-fm-x-proj:_gemv_kernel mamba2-fused:_mamba2_decode_kernel}; do
        name=${t%%:*}; kernel=${t#*:}
        timeout 120 $NCU --clock-control none -k regex:$kernel -s 2 -c 1 --set full --import-source yes -f \
            -o "$L/ncu-$name" python3 tools/ncu_targets.py $name > "$L/ncu-$name-run.txt" 2>&1
        timeout 60 $NCU -i "$L/ncu-$name.ncu-rep" --page details > "$L/ncu-$name.txt" 2>&1
        timeout 60 $NCU -i "$L/ncu-$name.ncu-rep" --page raw --csv > "$L/ncu-$name-raw.csv" 2>&1
        rm -f "$L/ncu-$name.ncu-rep"
        grep -E "Duration|Registers Per|Memory Throughput|Issue Slots Busy|Achieved Occupancy" "$L/ncu-$name.txt" | sed "s/^/$name /"
    done
fi
tar -C "$OUT" -czf "$OUT/logs.tgz" logs && rm -rf "$L"
