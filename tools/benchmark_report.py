#!/usr/bin/env python3
"""Tables and plots from tools/benchmark.py / tools/baselines.py JSON lines.

    python tools/benchmark_report.py docs/bench/*.jsonl --plots docs/bench

Prints markdown tables (one row per run; speed-up against our own TP=1 on the same workload) and,
with --plots and matplotlib installed, writes speed-up-vs-TP and throughput-vs-batch PNGs.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(paths):
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r.setdefault("impl", "megatron-ssm")
                rows.append(r)
    return rows


def key(r):
    return r["model"], r["batch"], r["prompt"], r["new"]


def table(rows) -> str:
    base = {key(r): r["total_tok_s"] for r in rows if r["impl"] == "megatron-ssm" and r["tp"] == 1}
    out = ["| model | impl | TP | batch | prompt | new | TTFT ms | step ms | HBM floor ms | comm est ms | "
           "gen tok/s | total tok/s | vs our TP=1 | peak GB |", "|" + "---|" * 14]
    for r in sorted(rows, key=lambda r: (r["model"], r["prompt"], r["batch"], r["new"], r["impl"] != "megatron-ssm", r["tp"])):
        b = base.get(key(r))
        out.append(f"| {r['model']} | {r['impl']} | {r['tp']} | {r['batch']} | {r['prompt']} | {r['new']} | "
                   f"{r['ttft_ms']:.0f} | {r['step_ms']:.2f} | {r.get('hbm_floor_ms', float('nan')):.2f} | "
                   f"{r.get('comm_est_ms', float('nan')):.2f} | {r['gen_tok_s']:.0f} | {r['total_tok_s']:.0f} | "
                   f"{(r['total_tok_s'] / b) if b else float('nan'):.2f}x | {r['peak_mem_gb']:.1f} |")
    return "\n".join(out)


def plots(rows, outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["impl"] == "megatron-ssm"]
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    series = defaultdict(dict)
    for r in ours:
        series[key(r)][r["tp"]] = r["total_tok_s"]
    for (model, b, p, n), by_tp in sorted(series.items()):
        if 1 in by_tp and len(by_tp) > 1:
            tps = sorted(by_tp)
            ax.plot(tps, [by_tp[t] / by_tp[1] for t in tps], marker="o", label=f"{model} b{b} p{p} n{n}")
    ax.plot([1, 2, 4], [1, 2, 4], "k--", lw=0.8, label="linear")
    ax.set(xlabel="TP degree", ylabel="total tokens/s vs TP=1", xticks=[1, 2, 4], title="Speed-up against TP")
    ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(outdir / "speedup_vs_tp.png")
    fig.savefig(written[-1], dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    curves = defaultdict(list)
    for r in rows:
        curves[(r["model"], r["impl"], r["tp"], r["prompt"], r["new"])].append((r["batch"], r["gen_tok_s"]))
    for (model, impl, tp, p, n), pts in sorted(curves.items()):
        if len(pts) > 1:
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=f"{model} {impl} TP{tp} p{p}")
    ax.set(xlabel="batch", ylabel="generated tokens/s", xscale="log", title="Throughput against batch")
    ax.legend(fontsize=6)
    fig.tight_layout()
    written.append(outdir / "throughput_vs_batch.png")
    fig.savefig(written[-1], dpi=120)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl", nargs="+")
    ap.add_argument("--plots", default=None, help="folder for PNG plots")
    args = ap.parse_args()
    rows = load(args.jsonl)
    print(table(rows))
    if args.plots:
        for p in plots(rows, Path(args.plots)):
            print(f"\nwrote {p}")


if __name__ == "__main__":
    main()
