#!/usr/bin/env python3
"""Convert Mamba / Falcon-Mamba / Mamba-2 / Nemotron-H / Falcon-H1 checkpoints between formats and
tensor-parallel degrees.

    python tools/convert_hf.py --load-dir IN --save-dir OUT --tp N [--dtype bfloat16] [--force]
    python tools/convert_hf.py --load-dir IN --save-dir OUT --to-hf [--dtype ...] [--force]

The format of --load-dir is detected from its files:
  HF transformers   config.json (MambaForCausalLM, FalconMambaForCausalLM, Mamba2ForCausalLM,
                    NemotronHForCausalLM without MoE layers, or FalconH1ForCausalLM) and
                    model.safetensors, sharded model-*.safetensors + index, or pytorch_model.bin
  mamba-ssm native  config.json with d_model / n_layer / ssm_cfg and pytorch_model.bin, as state-spaces
                    publishes mamba-130m ... mamba2-2.7b (the vocabulary keeps mamba-ssm's padding)
  megatron-ssm      a checkpoint this tool wrote, at any TP degree (--tp M reshards it)
  Megatron-LM       latest_checkpointed_iteration.txt + iter_XXXXXXX/ or release/, legacy `torch`
                    (mp_rank_TT[_PPP]/model_optim_rng.pt, any TP and PP degree) or `torch_dist`
                    (.metadata, *.distcp, common.pt); the model's shape comes from its saved args

--to-megatron --tp N writes Megatron-LM's layout instead (megatron-core's TE-spec names, args,
checkpoint_version 3.0, megatron-core's TP split), in --ckpt-format torch_dist (default, loads on
every megatron-core version at any TP) or torch (legacy; its conv1d names follow --megatron-core).
Only Mamba-2 with n_groups % N == 0 can be written so; anything else is refused before writing.

--tp N writes megatron-ssm's layout: OUT/latest_checkpointed_iteration.txt ("release"),
OUT/release/mp_rank_XX/model_optim_rng.pt per TP rank, the tokenizer of IN (always with HF's
tokenizer.json + tokenizer_config.json, made from tokenizer.model when IN has only that) and a
manifest, megatron_ssm_checkpoint.json, with every file's size and xxh3-128 checksum (an --to-hf
output gets one too). A megatron-ssm input is verified against it before anything is written. --to-hf writes config.json + safetensors that transformers' from_pretrained
loads. Tensors keep their dtype unless --dtype is given, so IN -> TP4 -> TP2 -> HF is bit-exact.

Tensors are streamed one at a time (memory stays near the largest tensor, not the model). OUT is
written into a hidden .OUT.partial-* directory beside it and renamed into place only when complete,
so an interrupted run leaves nothing that loads; the next run removes the leftover. --force
replaces only an empty directory or a checkpoint this tool wrote (its manifest lists every file).
"""
from __future__ import annotations

import argparse
import re
import sys

from megatron_ssm.checkpoint.convert import DTYPES, convert
from megatron_ssm.checkpoint.hf import CheckpointError
from megatron_ssm.checkpoint.hf_export import DEFAULT_MAX_SHARD_BYTES
from megatron_ssm.config import ConfigError

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-dir", required=True,
                    help="checkpoint to read: HF transformers, mamba-ssm native or megatron-ssm (detected)")
    ap.add_argument("--save-dir", required=True,
                    help="directory to create (must not exist unless --force; never the same as --load-dir)")
    out = ap.add_mutually_exclusive_group(required=True)
    out.add_argument("--tp", type=int, help="write a megatron-ssm checkpoint sharded for this tensor-parallel degree")
    out.add_argument("--to-hf", action="store_true",
                     help="write an HF transformers checkpoint (config.json + safetensors) instead")
    ap.add_argument("--to-megatron", action="store_true",
                    help="with --tp N: write a Megatron-LM checkpoint (megatron-core names and split) instead of ours")
    ap.add_argument("--ckpt-format", choices=("torch_dist", "torch"), default="torch_dist",
                    help="with --to-megatron: torch_dist (default) or legacy torch (one file per TP rank)")
    ap.add_argument("--megatron-core", default=None, metavar="VERSION",
                    help="with --to-megatron --ckpt-format torch: the megatron-core version that will load it "
                         "(0.19 names conv1d `conv1d_weight`, earlier `conv1d.weight`; default: the installed one)")
    ap.add_argument("--megatron-spec", choices=("te", "local"), default="te",
                    help="with --to-megatron: tensor names of megatron-core's stock Transformer Engine spec (block norm "
                         "fused into in_proj: mixer.in_proj.layer_norm_weight; default) or of a TE-free local spec "
                         "(norm.weight), such as megatron_ssm.megatron.specs")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="cast every tensor to this dtype (default: keep each tensor's own dtype)")
    ap.add_argument("--force", action="store_true",
                    help="replace a checkpoint this tool wrote (or an empty directory) at --save-dir; the old "
                         "one is kept until the new one is complete. Any other directory is never replaced")
    ap.add_argument("--max-shard-size", type=byte_size, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                    help="with --to-hf: start a new safetensors file past this size (default 5GB)")
    ap.add_argument("--no-verify", action="store_true",
                    help="do not check a megatron-ssm input against the checksums in its manifest")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar (tensors and bytes done)")
    args = ap.parse_args(argv)
    try:
        if args.to_megatron and args.tp is None:
            ap.error("--to-megatron needs --tp N")
        convert(args.load_dir, args.save_dir, args.tp, to_hf=args.to_hf, dtype=args.dtype, force=args.force,
                progress=not args.no_progress, max_shard_bytes=args.max_shard_size,
                verify=not args.no_verify, to_megatron=args.to_megatron,
                ckpt_format=args.ckpt_format, megatron_core=args.megatron_core, megatron_spec=args.megatron_spec)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"convert_hf.py: error: {e}", file=sys.stderr)
        return 2
    kind = "HF" if args.to_hf else f"Megatron-LM {args.ckpt_format} TP={args.tp}" if args.to_megatron else f"TP={args.tp}"
    print(f"wrote {kind} checkpoint to {args.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
