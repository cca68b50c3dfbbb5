#!/usr/bin/env python3
"""Write a checkpoint with a real model's shapes and random weights, streamed (memory stays near
the largest tensor), to measure conversion at full size without downloading anything.

    python tools/make_synthetic_checkpoint.py --preset falcon-mamba-7b --out /tmp/fm7b
    python tools/make_synthetic_checkpoint.py --preset mamba2-2.7b --out /tmp/m2   # mamba-ssm format

falcon-mamba-7b is written in HF format (bf16, sharded safetensors, ~14.5 GB); mamba2-2.7b in
mamba-ssm's native format (config.json + pytorch_model.bin, fp32, ~11 GB). --layers shrinks either.
Values are N(0, 0.02) (ones for norm weights): numerically meaningless, shaped exactly.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_ssm.checkpoint.atomic import AtomicDir
from megatron_ssm.checkpoint.hf import hf_name
from megatron_ssm.checkpoint.hf_export import HFWriter
from megatron_ssm.checkpoint.mamba_ssm import config_from_mamba_ssm
from megatron_ssm.checkpoint.partition import hf_shapes
from megatron_ssm.checkpoint.spec import TensorSpec
from megatron_ssm.checkpoint.torch_stream import TorchFileWriter
from megatron_ssm.config import SSMConfig

PRESETS = {
    # tiiuae/falcon-mamba-7b config.json
    "falcon-mamba-7b": ("hf", {
        "architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba", "hidden_size": 4096,
        "num_hidden_layers": 64, "intermediate_size": 8192, "expand": 16, "state_size": 16, "conv_kernel": 4,
        "time_step_rank": 256, "vocab_size": 65024, "use_bias": False, "use_conv_bias": True,
        "layer_norm_epsilon": 1e-5, "mixer_rms_eps": 1e-6, "residual_in_fp32": True,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 11, "pad_token_id": 11,
        "torch_dtype": "bfloat16"}),
    # state-spaces/mamba2-2.7b config.json
    "mamba2-2.7b": ("mamba-ssm", {
        "d_model": 2560, "d_intermediate": 0, "n_layer": 64, "vocab_size": 50277, "ssm_cfg": {"layer": "Mamba2"},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": True}),
}
# the hybrids' shapes come from their benchmark configs (one source for both tools)
for _name in ("nemotron-h-8b", "falcon-h1-7b", "zamba-7b-v1", "zamba2-2.7b"):
    _spec = Path(__file__).resolve().parents[1] / "configs" / f"{_name}.yaml"
    if _spec.is_file():
        PRESETS[_name] = ("hf", yaml.safe_load(_spec.read_text())["hf_config"])
CHUNK = 1 << 24


def random_tensor(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(spec.shape, dtype=spec.dtype)
    if spec.name.endswith("norm.weight") or spec.name.endswith("norm_f.weight"):
        return out.fill_(1.0)
    flat = out.view(-1)
    for piece in flat.split(CHUNK):  # float32 scratch one chunk at a time, not the whole tensor
        piece.copy_(torch.randn(piece.numel(), generator=gen).mul_(0.02))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="falcon-mamba-7b", help="whose shapes to copy")
    ap.add_argument("--out", required=True, help="directory to create (put it under /tmp: it is large)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many layers (default: all)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 for HF presets, float32 for mamba-ssm ones (as published)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing checkpoint at --out")
    args = ap.parse_args(argv)

    fmt, raw = PRESETS[args.preset]
    raw = dict(raw)
    if args.layers:
        raw["num_hidden_layers" if fmt == "hf" else "n_layer"] = args.layers
        if "hybrid_override_pattern" in raw:  # Nemotron-H: the pattern is the layer list
            raw["hybrid_override_pattern"] = raw["hybrid_override_pattern"][:args.layers]
        if "layers_block_type" in raw:  # Zamba / Zamba2: one entry per layer
            raw["layers_block_type"] = raw["layers_block_type"][:args.layers]
    dtype = args.dtype or ("bfloat16" if fmt == "hf" else "float32")
    cfg = SSMConfig.from_hf(raw) if fmt == "hf" else config_from_mamba_ssm(raw, dtype)
    cfg.torch_dtype = dtype
    names = dict(hf_shapes(cfg))
    if cfg.tie_word_embeddings and fmt == "mamba-ssm":
        names["lm_head.weight"] = names["embeddings.weight"]  # mamba-ssm's state dict lists the tied head too
    specs = [TensorSpec(n, s, getattr(torch, dtype)) for n, s in names.items()]
    gen = torch.Generator().manual_seed(args.seed)
    total = sum(s.nbytes for s in specs)
    print(f"{args.preset}: {len(specs)} tensors, {total / 1e9:.2f} GB {dtype} -> {args.out}", file=sys.stderr)

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="writing")
    if fmt == "hf":
        with HFWriter(args.out, cfg, specs, force=args.force) as writer:
            for s in specs:
                writer.write(s.name, random_tensor(s, gen))
                bar.update(s.nbytes)
    else:
        native = [TensorSpec("backbone.embedding.weight" if s.name == "embeddings.weight" else hf_name(s.name),
                             s.shape, s.dtype) for s in specs]
        embedding_state = None
        with AtomicDir(args.out, force=args.force) as tmp:
            (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
            writer = TorchFileWriter(tmp / "pytorch_model.bin", native)
            for s, n in zip(specs, native):
                if s.name == "embeddings.weight":
                    embedding_state = gen.get_state()
                if s.name == "lm_head.weight" and cfg.tie_word_embeddings:
                    # tied: the embedding's values again (drawn anew from its generator state, so that
                    # memory still holds one tensor at a time)
                    tensor = random_tensor(s, torch.Generator().set_state(embedding_state))
                else:
                    tensor = random_tensor(s, gen)
                writer.write(n.name, tensor)
                bar.update(s.nbytes)
            writer.close()
    bar.close()
    params = sum(math.prod(s.shape) for s in specs)
    print(f"wrote {params / 1e9:.2f}B parameters to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
