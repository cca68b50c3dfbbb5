# session 18's device calls (scripts as run; the probe file evolved between calls 1-3, this is its last form)
## .gpu/s18c1.sh
#!/usr/bin/env bash
# session 18 call 1: the production Mamba-2 decode kernel's GPU test (after session 17's refactor), and
# the staged out_proj probe (.gpu/s18_probe.py)
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s18c1; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout 400 python3 .gpu/s18_probe.py 2>&1 | quiet > $L/probe.txt
el probe $?; tail -30 $L/probe.txt


## .gpu/s18c2.sh
#!/usr/bin/env bash
# session 18 call 2: TMA slab loads by box shape (.gpu/s18_load.py)
set -uo pipefail
OUT=${OUT:-out}; L=$OUT/s18c2; mkdir -p $L
T0=$(date +%s)
. tools/gpu_env.sh $L/env.txt
el() { echo "[$1 rc=$2 at $(( $(date +%s) - T0 ))s]"; }
timeout 300 python3 .gpu/s18_load.py 2>&1 | quiet > $L/load.txt
el load $?; cat $L/load.txt
