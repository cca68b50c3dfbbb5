#!/usr/bin/env bash
# session 17 call 1: what the mamba2 b1 step's stages cost now (ablation), and whether K-slice owners
# can stream out_proj's weight at the copy bandwidth (for a step + out_proj kernel)
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s17c1; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
OUT=$L timeout 200 python3 .gpu/s17_colgemv.py 2>&1 | quiet > $L/colgemv.txt; el colgemv $?
grep -E "cublas|tuned" $L/colgemv.txt | cut -c1-300
python3 - <<'PY' $L/colgemv.jsonl
import json,sys
r=[json.loads(l) for l in open(sys.argv[1]) if '"col"' in l and '"us"' in l]
r.sort(key=lambda e:e["us"])
for e in r[:25]: print(e)
for kb in (32,64,128):
  for ns in (1,2,4):
    s=[e for e in r if e["KB"]==kb and e["NSPLIT"]==ns]
    if s: print("best KB",kb,"NSPLIT",ns,s[0])
PY
timeout 240 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1 \
  --skip update,out_proj,in_proj,update+out_proj,MEGATRON_SSM_PDL=0,MEGATRON_SSM_EARLY_LOADS=0,MEGATRON_SSM_EXIT_ROWS=0 2>&1 | quiet > $L/ablate.txt
el ablate $?; cut -c1-200 $L/ablate.txt | tail -12
#!/usr/bin/env bash
# session 17 call 2: out_proj's GEMV from L2 vs HBM, and after an L2 prefetch during a spin
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s17c2; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
OUT=$L timeout 150 python3 .gpu/s17_l2.py 2>&1 | quiet > $L/l2.txt; el l2 $?; cut -c1-300 $L/l2.txt | tail -20
#!/usr/bin/env bash
# session 17 call 3: mamba2_step_into_entry (the step, out_proj and the next entry in one launch):
# GPU tests, then the graphed step A/B and the benchmark row
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s17c3; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout -s INT 110 python3 -m pytest -q -p no:cacheprovider -p no:randomly -x tests/test_kernels_gpu.py -k "step_into_entry" > $L/kernel-tests.txt 2>&1
el kernel-tests $?; tail -15 $L/kernel-tests.txt | cut -c1-300
MEGATRON_SSM_STEP_INTO_EXIT=1 timeout -s INT 170 python3 -m pytest -q -p no:cacheprovider -p no:randomly -n 2 tests/test_model_gpu.py -k "mamba2" > $L/model-tests.txt 2>&1
el model-tests $?; grep -E "^(FAILED|ERROR)|passed|failed|Error" $L/model-tests.txt | tail -8 | cut -c1-300
timeout 120 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1 --rounds 3 \
  --skip MEGATRON_SSM_STEP_INTO_EXIT=1 2>&1 | quiet > $L/ablate.txt
el ablate $?; cut -c1-200 $L/ablate.txt | tail -4
timeout 85 python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1 --prompt 512 --new 128 \
  --json-out $L/bench.jsonl --tag s17c3 2>&1 | quiet > $L/bench.txt
el bench $?; grep -v "^#   linear" $L/bench.txt | tail -4 | cut -c1-250
MEGATRON_SSM_STEP_INTO_EXIT=1 timeout 85 python3 tools/benchmark.py --config configs/mamba2-2.7b.yaml --batch 1 --prompt 512 --new 128 \
  --json-out $L/bench.jsonl --tag s17c3-fused 2>&1 | quiet > $L/bench-fused.txt
el bench-fused $?; grep -v "^#   linear" $L/bench-fused.txt | tail -4 | cut -c1-250
#!/usr/bin/env bash
# session 17 call 4: the fused step's kernel tests again (test fixed), its A/B variants, the model test
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s17c4; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout -s INT 100 python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/test_kernels_gpu.py -k "step_into_entry" > $L/kernel-tests.txt 2>&1
el kernel-tests $?; grep -E "^(FAILED|ERROR)|passed|failed|Error" $L/kernel-tests.txt | tail -8 | cut -c1-300
E=MEGATRON_SSM_STEP_INTO_EXIT=1; R=MEGATRON_SSM_STEP_OUT_ROWS; S=MEGATRON_SSM_STEP_OUT_STAGES
timeout 200 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1 --rounds 2 \
  --skip "$E,$E+$R=128,$E+$R=128+$S=3,$E+$R=64+$S=3,$E+$R=256+$S=2" 2>&1 | quiet > $L/ablate.txt
el ablate $?; cut -c1-220 $L/ablate.txt | tail -6
MEGATRON_SSM_STEP_INTO_EXIT=1 timeout -s INT 220 python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/test_model_gpu.py -k "mamba2-g1" > $L/model-tests.txt 2>&1
el model-tests $?; grep -E "^(FAILED|ERROR)|passed|failed|Error" $L/model-tests.txt | tail -8 | cut -c1-300
#!/usr/bin/env bash
# session 17 call 5: the fused step with out_proj through tl.dot: kernel tests, A/B variants, model test
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s17c5; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout -s INT 100 python3 -m pytest -q -p no:cacheprovider -p no:randomly tests/test_kernels_gpu.py -k "step_into_entry" > $L/kernel-tests.txt 2>&1
el kernel-tests $?; grep -E "^(FAILED|ERROR)|passed|failed|Error|assert" $L/kernel-tests.txt | tail -8 | cut -c1-300
python3 - <<'PY' 2>&1 | quiet | tail -3
import torch
from megatron_ssm.ops.triton import decode
import sys; sys.path.insert(0, "tests")
from test_decode_fused import step_into_entry_inputs
kw = step_into_entry_inputs(80, 64, 128, 4, 2560, torch.bfloat16, "cuda")
decode.mamba2_step_into_entry(**kw); torch.cuda.synchronize()
print("parts chosen", decode._PARTS)
PY
E=MEGATRON_SSM_STEP_INTO_EXIT=1; R=MEGATRON_SSM_STEP_OUT_ROWS; S=MEGATRON_SSM_STEP_OUT_STAGES; H=MEGATRON_SSM_STEP_OUT_HINT
timeout 220 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1 --rounds 2 \
  --skip "$E,$E+$R=64,$E+$R=256,$E+$S=4,$E+$S=2,$E+$H=64" 2>&1 | quiet > $L/ablate.txt
el ablate $?; cut -c1-220 $L/ablate.txt | tail -7
#!/usr/bin/env bash
# session 17 call 6: the dot-path fused step, more tiles (warps, rows), and the parts each chose
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s17c6; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
E=MEGATRON_SSM_STEP_INTO_EXIT=1; R=MEGATRON_SSM_STEP_OUT_ROWS; S=MEGATRON_SSM_STEP_OUT_STAGES; W=MEGATRON_SSM_STEP_OUT_WARPS
timeout 240 python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --batch 1 --rounds 2 \
  --skip "$E+$R=256,$E+$W=8,$E+$W=8+$R=256,$E+$R=512,$E+$W=8+$R=512,$E+$R=256+$S=2" 2>&1 | quiet > $L/ablate.txt
el ablate $?; cut -c1-220 $L/ablate.txt | tail -7
