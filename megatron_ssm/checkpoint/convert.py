"""HF checkpoint -> our TP-sharded checkpoint, one rank at a time so memory stays near one shard."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .hf import CheckpointError, HFCheckpoint
from .megatron import CheckpointWriter
from .partition import hf_names, shard

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_names(found: list[str], expected: list[str], where: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected tensor(s) {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{where}: " + "; ".join(parts))


def hf_to_megatron(hf_dir: str | Path, save_dir: str | Path, tp: int, dtype: str | None = None,
                   force: bool = False, progress: bool = True) -> None:
    hf = HFCheckpoint(hf_dir)
    cfg = hf.config
    cfg.validate(tp)
    expected = hf_names(cfg)
    found = [n for n in hf.names() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    check_names(found, expected, str(hf_dir))
    target_dtype = DTYPES[dtype] if dtype else None
    if dtype:
        cfg.torch_dtype = dtype
    with CheckpointWriter(save_dir, force=force) as writer:
        bar = tqdm(total=tp * len(expected), unit="tensor", disable=not progress, desc=f"convert to TP={tp}")
        for rank in range(tp):
            state = {}
            for name, full in hf.tensors(expected):
                piece = shard(name, full, cfg, tp, rank)
                state[name] = piece.to(target_dtype) if target_dtype else piece
                bar.update()
            writer.save_rank(rank, tp, cfg, state)
            del state
        bar.close()
        writer.copy_tokenizer(hf_dir)
