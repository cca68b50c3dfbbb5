#!/usr/bin/env python3
"""Convert a HuggingFace Mamba / Falcon-Mamba / Mamba-2 checkpoint into megatron-ssm's TP shards.

    python tools/convert_hf.py --load-dir HF_DIR --save-dir OUT_DIR --tp N [--dtype bfloat16]

OUT_DIR gets Megatron's layout (latest_checkpointed_iteration.txt = "release",
release/mp_rank_XX/model_optim_rng.pt per TP rank) plus the tokenizer files from HF_DIR.
"""
from __future__ import annotations

import argparse
import sys

from megatron_ssm.checkpoint.convert import DTYPES, hf_to_megatron
from megatron_ssm.checkpoint.hf import CheckpointError
from megatron_ssm.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load-dir", required=True, help="HF model directory (config.json + safetensors)")
    ap.add_argument("--save-dir", required=True, help="where to write the sharded checkpoint")
    ap.add_argument("--tp", type=int, required=True, help="tensor-parallel degree to shard for")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="cast weights to this dtype (default: keep the checkpoint's own)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing checkpoint at --save-dir")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    try:
        hf_to_megatron(args.load_dir, args.save_dir, args.tp, args.dtype, force=args.force,
                       progress=not args.no_progress)
    except (CheckpointError, ConfigError, ValueError) as e:
        print(f"convert_hf.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote TP={args.tp} checkpoint to {args.save_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
