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
"""Where a benchmark decode step's time goes beyond the graph replay: the engine's step loop against
bare replays, and a profiler timeline of a few steps (what runs between two replays).
    python3 .gpu/engine_prof.py --config configs/falcon-mamba-7b.yaml
"""
import argparse
import collections
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from benchmark import load_config, make_engine, random_weights_, run_workload  # noqa: E402
from fuse_check import _replay_ms  # noqa: E402

from megatron_ssm.inference.engine import Request  # noqa: E402
from megatron_ssm.model.lm import MambaLM  # noqa: E402
from megatron_ssm.parallel import init_distributed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new", type=int, default=64)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    tp = init_distributed()
    name, cfg = load_config(a.config)
    model = MambaLM(cfg, tp, dtype=torch.bfloat16).eval()
    random_weights_(model, seed=1234)
    args = types.SimpleNamespace(prefill_tokens=32768, new=[a.new], no_graphs=False, no_pack=False, decode_ahead=True,
                                 context_parallel_min_tokens=1)
    engine = make_engine(model, a.batch, 512, args)
    run_workload(engine, a.batch, 512, 4, seed=0)
    for _ in range(2):
        r = run_workload(engine, a.batch, 512, a.new, seed=1)
        print(f"{name} b{a.batch} benchmark step {r['step_ms']:.3f} ms (ttft {r['ttft_ms']:.1f})", flush=True)
    g = engine.graphed
    b = g.bucket(a.batch)
    print(f"{name} bare replay {_replay_ms(g.graphs[b], 100, 5):.3f} ms", flush=True)
    # the engine's decode steps one by one (wall, host side), with decode ahead
    for r in [Request(torch.randint(0, cfg.vocab_size, (512,)).tolist(), a.new) for _ in range(a.batch)]:
        engine.add_request(r)
    walls = []
    while engine.has_work():
        t = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    w = [x * 1e3 for x in walls]
    print(f"step walls ms: first {w[:4]}, median {sorted(w[1:])[len(w[1:]) // 2]:.3f}, last {w[-4:]}, "
          f"ahead {engine.steps_ahead}", flush=True)
    # profile one workload
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_workload(engine, a.batch, 512, 16, seed=2)
    ev = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ev.sort(key=lambda e: e.time_range.start)
    counts = collections.Counter(e.name for e in ev)
    steps = max(1, counts.most_common(1)[0][1] // max(1, cfg.num_layers))
    print(f"{len(ev)} device events; most common {counts.most_common(8)}", flush=True)
    rare = {n for n, c in counts.items() if c < 3 * 20}
    # the last ~4 steps: events that are rare (not per layer) and gaps over 2 us
    tail = ev[-min(len(ev), 4 * len(ev) // 20):]
    prev_end = tail[0].time_range.start
    gap_total = 0.0
    for e in tail:
        gap = e.time_range.start - prev_end
        gap_total += max(gap, 0)
        if e.name in rare or gap > 2:
            print(f"  +{gap:7.1f} us gap, {e.time_range.elapsed_us():7.1f} us  {e.name[:90]}")
        prev_end = max(prev_end, e.time_range.end)
    span = tail[-1].time_range.end - tail[0].time_range.start
    print(f"tail span {span:.0f} us, gaps {gap_total:.0f} us", flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


main()
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
