"""Our checkpoints in Megatron's layout:

    DIR/latest_checkpointed_iteration.txt   "release"
    DIR/release/mp_rank_{r:02d}/model_optim_rng.pt   {"model": state dict, "config": ..., ...}

plus the tokenizer files copied beside them. A checkpoint is written into a temporary directory next
to its target and renamed into place at the end, so an interrupted write leaves nothing loadable.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import SSMConfig
from .hf import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def rank_file(root: Path, rank: int) -> Path:
    return root / RELEASE / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"


class CheckpointWriter:
    """with CheckpointWriter(dir, force) as w: w.save_rank(...) ...  -> renamed into `dir` on success."""

    def __init__(self, target: str | Path, force: bool = False):
        self.target = Path(target)
        if self.target.exists() and not force:
            raise CheckpointError(f"{self.target} already exists; pass --force to overwrite it")
        self.target.parent.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "CheckpointWriter":
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self

    def save_rank(self, rank: int, tp: int, cfg: SSMConfig, state: dict[str, torch.Tensor]) -> None:
        path = rank_file(self.tmp, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "config": cfg.to_dict(), "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": RELEASE, "tensor_model_parallel_size": tp, "tensor_model_parallel_rank": rank},
                   path)

    def copy_tokenizer(self, source_dir: str | Path) -> None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                shutil.copy2(Path(source_dir) / name, self.tmp / name)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        # The tracker file is what makes a directory a checkpoint: write it last.
        (self.tmp / TRACKER).write_text(RELEASE)
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)


def checkpoint_tp_size(root: str | Path) -> int:
    """TP degree of the checkpoint at `root`, checking it is complete."""
    root = Path(root)
    if not (root / TRACKER).is_file():
        raise CheckpointError(f"{root} is not a megatron-ssm checkpoint (no {TRACKER}); "
                              f"convert an HF model with tools/convert_hf.py first")
    ranks = sorted((root / RELEASE).glob("mp_rank_*"))
    if not ranks:
        raise CheckpointError(f"{root}/{RELEASE} holds no mp_rank_* shards")
    tp = len(ranks)
    for r in range(tp):
        if not rank_file(root, r).is_file():
            raise CheckpointError(f"{root} is missing the shard of TP rank {r} ({rank_file(root, r)})")
    return tp


def load_rank(root: str | Path, rank: int, tp: int) -> tuple[SSMConfig, dict[str, torch.Tensor]]:
    """Load TP rank `rank`'s shard, refusing a checkpoint written for another TP degree."""
    root = Path(root)
    saved_tp = checkpoint_tp_size(root)
    if saved_tp != tp:
        raise CheckpointError(
            f"{root} was written for tensor-parallel degree {saved_tp} but this run has {tp} ranks; "
            f"run with --nproc_per_node {saved_tp} or reshard with tools/convert_hf.py --tp {tp}")
    try:
        blob = torch.load(rank_file(root, rank), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {rank_file(root, rank)}: {e}") from None
    return SSMConfig.from_dict(blob["config"]), blob["model"]
