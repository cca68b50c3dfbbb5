#!/usr/bin/env python3
"""What one stage of a decode step costs inside the graphed step: the step timed with that stage
left out (its op replaced by a constant output of the right shape), against the whole step, in one
process on the same weights. The numbers are wrong with a stage left out; the times are what a
fusion that removes the stage's launch could at best save (H200.md: "time variants that leave one
stage out ... and take differences"). One GPU, synthetic weights as tools/benchmark.py.

    python3 tools/ablate_step.py --config configs/falcon-mamba-7b.yaml --batch 1 \
        --skip x_proj,dt_proj,x_proj+dt_proj,conv,update

Stages (a '+' joins several into one variant): in_proj, conv, x_proj, dt_proj (Mamba-1), update
(the state update, or Mamba-1's fused update), norm (Mamba-2's gated norm), out_proj (the mixer's
output projection: its all-reduce too), add_norm (each block's residual add and RMS norm).
A stage of the form NAME=VALUE is no stage but an environment switch set while that variant is
captured (an A/B of a switch read at launch, beside the whole step without it):

    python3 tools/ablate_step.py --config configs/mamba2-2.7b.yaml --skip MEGATRON_SSM_GEMV_PREFETCH=2048
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from benchmark import load_config, random_weights_  # noqa: E402
from fuse_check import _replay_ms  # noqa: E402

from megatron_ssm.comm import PendingAllReduce  # noqa: E402
from megatron_ssm.inference.cache import StateCache  # noqa: E402
from megatron_ssm.inference.cuda_graphs import GraphedDecode  # noqa: E402
from megatron_ssm.model import blocks, layers, mamba1, mamba2  # noqa: E402
from megatron_ssm.model.lm import MambaLM  # noqa: E402
from megatron_ssm.ops.dispatch import add_rms_norm  # noqa: E402
from megatron_ssm.parallel import init_distributed  # noqa: E402

_CONSTANTS: dict = {}


def _constant(shape, like: torch.Tensor) -> torch.Tensor:
    """One zero tensor per shape and dtype, shared by every layer (allocated in the warm-up)."""
    key = (tuple(shape), like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.zeros(shape, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]


def _patches(model, stage: str, stack: contextlib.ExitStack) -> None:
    if "=" in stage:
        name, value = stage.split("=", 1)
        stack.callback(_restore, name, os.environ.get(name))
        os.environ[name] = value
        return
    mixers = [m for m in model.modules() if isinstance(m, (mamba1.Mamba1Mixer, mamba2.Mamba2Mixer))]

    def on_instances(attr, fake):
        for m in mixers:
            sub = getattr(m, attr)
            stack.callback(sub.__dict__.pop, "forward", None)
            sub.forward = fake(sub)

    def on_module(module, name, fake):
        stack.enter_context(_swap(module, name, fake))

    if stage == "in_proj":  # where the block's entry runs inside in_proj's launch, the entry stays alone
        on_instances("in_proj", lambda sub: lambda x, *a, **k: _constant((*x.shape[:-1], sub.weight.shape[0]), x))
        for module in (mamba1, mamba2):
            on_module(module, "project_entry", lambda stream, delta, norm, dtype, weight, *a, **k: (
                _constant((*stream.shape[:-1], weight.shape[0]), weight),
                add_rms_norm(stream, _waited(delta), norm.weight, norm.eps, dtype)[1]))
    elif stage == "conv":
        stack.enter_context(_swap(layers.CausalConv1d, "forward", lambda self, x, *a, **k: x))
    elif stage == "x_proj":
        on_instances("x_proj", lambda sub: lambda x: _constant((*x.shape[:-1], sub.weight.shape[0]), x))
    elif stage == "dt_proj":
        on_module(mamba1, "project", lambda x, w, *a, **k: _constant((*x.shape[:-1], w.shape[0]), x))
    elif stage == "update":
        on_module(mamba1, "mamba1_decode_step", lambda state, u, *a, **k: u)
        on_module(mamba1, "selective_state_update", lambda state, u, *a, **k: u)
        on_module(mamba2, "ssd_state_update", lambda state, x, *a, **k: x)
        on_module(mamba2, "mamba2_decode_step", lambda xbc, z, *a, **k: (
            (xbc[:, : z.shape[-1]], _constant((xbc.shape[0], 1), xbc.new_empty(0, dtype=torch.float32))) if k.get("defer_norm")
            else xbc[:, : z.shape[-1]]))
    elif stage == "norm":
        on_module(mamba2, "gated_rms_norm", lambda y, *a, **k: y)
    elif stage == "add_norm":  # each block's entry (residual add + RMS norm), alone or in a projection's launch
        on_module(blocks, "add_rms_norm", lambda stream, delta, weight, *a: (_constant(stream.shape, weight), stream))
        for module in (mamba1, mamba2):  # an output left for the entry (DeferredOutput) is still projected
            on_module(module, "project_entry", lambda stream, delta, norm, dtype, weight, bias=None, scale=None: (
                (_waited(delta), layers.project(_constant(stream.shape, weight), weight, bias, scale))[1], stream))
    elif stage == "out_proj":
        for m in mixers:
            stack.callback(m.out_proj.__dict__.pop, "start", None)
            m.out_proj.start = lambda x, *a, **k: layers.PendingOutput(
                PendingAllReduce(_constant((*x.shape[:-1], model.cfg.hidden_size), x)), None)
    else:
        raise SystemExit(f"unknown stage {stage!r}")


def _waited(delta):
    """The previous block's output, projected where it was left for the entry (DeferredOutput)."""
    return delta.wait() if isinstance(delta, layers.DeferredOutput) else delta


def _restore(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _swap(owner, name, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", default="1")
    ap.add_argument("--skip", required=True, help="comma list of variants; '+' joins stages")
    ap.add_argument("--replays", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2, help="each variant timed this many times, interleaved")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ablate_step.py needs CUDA (it times CUDA graphs)")
    tp = init_distributed()
    name, cfg = load_config(args.config)
    model = MambaLM(cfg, tp, dtype=torch.bfloat16).eval()
    random_weights_(model, seed=1234)
    variants = ["(whole step)"] + args.skip.split(",")
    for b in (int(v) for v in args.batch.split(",")):
        cache = StateCache(model.state_shapes(64), b, dtype=model.dtype, device=tp.device)
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for variant in variants:
                with contextlib.ExitStack() as stack:
                    if variant != "(whole step)":
                        for stage in variant.split("+"):
                            _patches(model, stage, stack)
                    graphed = GraphedDecode(model, cache, buckets=(b,))
                    times.setdefault(variant, []).append(_replay_ms(graphed.graphs[b], args.replays, warmup=5))
                    del graphed
        whole = min(times["(whole step)"])
        for variant in variants:
            best = min(times[variant])
            print(f"{name} b{b} {variant:24s} {best:.3f} ms  ({1e3 * (whole - best) / cfg.num_layers:+.2f} us a layer "
                  f"saved; rounds {', '.join(f'{t:.3f}' for t in times[variant])})", flush=True)
        del cache


if __name__ == "__main__":
    main()
