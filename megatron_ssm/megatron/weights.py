"""Any checkpoint we read (HF, mamba-ssm, ours, Megatron-LM), loaded into a megatron-core model built
from our specs: each full tensor cut for this rank by our partition rules, under megatron-core's
local-spec names (checkpoint/megatron_lm.py's name map)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.errors import CheckpointError, check_names
from ..checkpoint.formats import open_checkpoint
from ..checkpoint.megatron_lm import megatron_name
from ..checkpoint.partition import shard
from ..config import SSMConfig


def model_state_for_rank(src, cfg: SSMConfig, tp: int, rank: int, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors of `src` under megatron-core local-spec names (vocabulary padded to the
    model's own padded size)."""
    state = {}
    for name in src.names():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        full = src.read(name)
        if name in ("embeddings.weight", "lm_head.weight") and full.shape[0] < padded_vocab:
            full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], full.shape[1])])
            state[megatron_name(name, te=False, conv="0.16", pattern=cfg.pattern)] = full.chunk(tp)[rank].contiguous()
            continue
        state[megatron_name(name, te=False, conv="0.16", pattern=cfg.pattern)] = shard(name, full, cfg, tp, rank)
    return state


def load_into(model: torch.nn.Module, ckpt_dir: str | Path, tp: int, rank: int) -> SSMConfig:
    """Load `ckpt_dir` into megatron-core `model` (built from megatron_ssm.megatron.specs) on TP rank
    `rank` of `tp`; every missing or unexpected name is an error. Returns the checkpoint's config."""
    with open_checkpoint(ckpt_dir) as src:
        cfg = src.config
        if cfg.is_hybrid:
            raise CheckpointError(f"{ckpt_dir}: hybrid pattern {cfg.pattern!r}; these specs build Mamba stacks")
        padded = model.embedding.word_embeddings.weight.shape[0] * tp
        state = model_state_for_rank(src, cfg, tp, rank, padded)
    own = [k for k in model.state_dict() if "_extra_state" not in k]
    check_names(list(state), own, f"{ckpt_dir} -> megatron-core model (TP rank {rank})")
    model.load_state_dict(state, strict=False)
    return cfg
