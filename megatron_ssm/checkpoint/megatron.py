"""Our checkpoints in Megatron's layout:

    DIR/latest_checkpointed_iteration.txt            NATIVE_TRACKER (written last: it makes DIR a checkpoint;
                                                     Megatron-LM exits on it, see megatron_lm.py)
    DIR/megatron_ssm_checkpoint.json                 TP degree, every file's size and checksum (integrity.py)
    DIR/release/mp_rank_{r:02d}/model_optim_rng.pt   {"model": state dict, "config": ..., ...}

plus the tokenizer files copied beside them. Rank files are plain torch.save files, written tensor by
tensor (torch_stream.py) into a temporary directory that is renamed into place at the end
(atomic.py). Every rank checks the whole manifest before loading its own file, so a missing or
truncated shard stops all ranks with the same message instead of one rank failing while the others
wait for it in a collective; each rank then verifies its own file's checksum (load_model makes every
rank report a mismatch on any rank).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import SSMConfig
from .atomic import AtomicWriter, interrupted_hint
from .errors import CheckpointError, check_names
from .hf import TOKENIZER_FILES  # noqa: F401 - public name
from .integrity import MANIFEST, read_manifest, recorded, verify_files
from .megatron_lm import NATIVE_TRACKER
from .partition import hf_shapes, merge, merge_shape, shard_shape
from .reader import CheckpointReader
from .spec import TensorSpec
from .torch_stream import TorchFileWriter, TorchStateFile

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CHECKPOINT_VERSION = 3.0


def rank_file(root: Path, rank: int) -> Path:
    return Path(root) / RELEASE / f"mp_rank_{rank:02d}" / "model_optim_rng.pt"


def rank_rel(rank: int) -> str:
    """Rank `rank`'s file as the manifest names it."""
    return rank_file(Path(), rank).as_posix()


class CheckpointWriter(AtomicWriter):
    """with CheckpointWriter(dir, force) as w: w.open_ranks(...); w.write(rank, name, t) ...
    -> renamed into `dir` only if everything was written."""

    def __init__(self, target: str | Path, force: bool = False):
        super().__init__(target, force)
        self.tp: int | None = None
        self._writers: dict[int, TorchFileWriter] = {}
        self._closed: set[int] = set()

    def _set_tp(self, tp: int) -> None:
        if self.tp not in (None, tp):
            raise CheckpointError(f"{self.target}: ranks written for TP={self.tp} and TP={tp}")
        self.tp = tp

    def _writer(self, rank: int, tp: int, cfg: SSMConfig, specs: list[TensorSpec]) -> TorchFileWriter:
        self._set_tp(tp)
        path = rank_file(self.tmp, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = {"config": cfg.to_dict(), "checkpoint_version": CHECKPOINT_VERSION, "iteration": RELEASE,
                  "tensor_model_parallel_size": tp, "tensor_model_parallel_rank": rank}
        return TorchFileWriter(path, specs, lambda state: {"model": state, **header})

    def open_ranks(self, tp: int, cfg: SSMConfig, specs: list[list[TensorSpec]]) -> None:
        """Start every rank's file; `specs[r]` lists rank r's tensors in the order `write` will get them."""
        for rank in range(tp):
            self._writers[rank] = self._writer(rank, tp, cfg, specs[rank])

    def write(self, rank: int, name: str, tensor: torch.Tensor) -> None:
        self._writers[rank].write(name, tensor)

    def _finish(self) -> None:
        for rank, writer in self._writers.items():
            writer.close()
            self._closed.add(rank)
        if self.tp is None or self._closed != set(range(self.tp)):
            raise CheckpointError(f"{self.target}: only ranks {sorted(self._closed)} of TP={self.tp} were written")
        (self.tmp / TRACKER).write_text(NATIVE_TRACKER)
        self._writers.clear()

    def manifest_fields(self) -> dict:
        return {"format": self.format, "tensor_model_parallel_size": self.tp}

    def _discard(self) -> None:
        self._writers.clear()


def checkpoint_tp_size(root: str | Path) -> int:
    """TP degree of the checkpoint at `root`, after checking that every rank file is there, whole."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint directory {root} does not exist{interrupted_hint(root)}")
    if not (root / TRACKER).is_file():
        hint = interrupted_hint(root) or "; convert a model into it with tools/convert_hf.py first"
        raise CheckpointError(f"{root} is not a megatron-ssm checkpoint (no {TRACKER}){hint}")
    if (root / TRACKER).read_text().strip() not in (RELEASE, NATIVE_TRACKER):  # RELEASE: written before
        raise CheckpointError(f"{root}/{TRACKER} does not say {RELEASE!r}: only release checkpoints are supported")
    present = sorted((root / RELEASE).glob("mp_rank_*"))
    manifest = read_manifest(root)
    if manifest is None:  # written before manifests existed: trust the directory names
        tp = 1 + max((int(p.name.removeprefix("mp_rank_")) for p in present), default=-1)
        if tp == 0:
            raise CheckpointError(f"{root}/{RELEASE} holds no mp_rank_* shards")
    else:
        try:
            tp = int(manifest["tensor_model_parallel_size"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{root / MANIFEST} is unreadable ({e!r})") from None
    for r in range(tp):
        path = rank_file(root, r)
        if not path.is_file():
            raise CheckpointError(f"{root} (TP={tp}) is missing the shard of TP rank {r}: {path} does not exist")
        expected, actual = recorded(manifest, rank_rel(r))[0], path.stat().st_size
        if expected is not None and actual != expected:
            raise CheckpointError(f"{path} has {actual} bytes, {MANIFEST} says {expected}: the shard of TP "
                                  f"rank {r} is truncated or was changed after writing")
    extra = [p.name for p in present if p.name not in {f"mp_rank_{r:02d}" for r in range(tp)}]
    if extra:
        raise CheckpointError(f"{root} is a TP={tp} checkpoint but also holds {', '.join(extra)}")
    return tp


def load_rank(root: str | Path, rank: int, tp: int, verify: bool = True) -> tuple[SSMConfig, dict[str, torch.Tensor]]:
    """Load TP rank `rank`'s shard, refusing a checkpoint written for another TP degree and (unless
    not `verify`) a shard whose checksum differs from the manifest's (integrity.ChecksumError)."""
    root = Path(root)
    saved_tp = checkpoint_tp_size(root)
    if saved_tp != tp:
        raise CheckpointError(
            f"{root} was written for tensor-parallel degree {saved_tp} but this run has {tp} ranks per "
            f"tensor-parallel group; run with --nproc_per_node {saved_tp} (times the context-parallel size) "
            f"or reshard with tools/convert_hf.py --tp {tp}")
    # Check every rank's tensor names and shapes (their headers only), so that a bad shard stops all
    # ranks here rather than one rank raising while the rest wait for it in the first all-reduce.
    MegatronCheckpoint(root, verify=False).close()
    if verify:
        verify_files(root, [rank_rel(rank)])
    try:
        blob = torch.load(rank_file(root, rank), map_location="cpu", weights_only=True, mmap=True)
        return SSMConfig.from_dict(blob["config"]), blob["model"]
    except Exception as e:
        raise CheckpointError(f"cannot read {rank_file(root, rank)}: {e}") from None


class MegatronCheckpoint(CheckpointReader):
    """One of our checkpoints, read as the full (HF-shaped) tensors: each one merged from its TP shards
    when asked for, so resharding N -> M never holds more than one tensor. Every file is verified
    against its checksum first, unless not `verify`."""

    format = "megatron-ssm"

    def __init__(self, root: str | Path, verify: bool = True):
        super().__init__(root)
        self.tp = checkpoint_tp_size(self.path)
        self._opening(self._open, verify)

    def _open(self) -> None:
        for r in range(self.tp):
            self._files[r] = TorchStateFile(rank_file(self.path, r), key="model")
        self.config = SSMConfig.from_dict(self._files[0].obj["config"])
        full = hf_shapes(self.config)
        for r, f in self._files.items():
            saved = f.obj.get("tensor_model_parallel_size", self.tp)
            if saved != self.tp:
                raise CheckpointError(f"{f.path} says it is a shard of TP={saved}, the directory holds TP={self.tp}")
            check_names(list(f.specs), list(full), f"{f.path}")
            for name, spec in f.specs.items():
                want = shard_shape(name, full[name], self.config, self.tp, r)
                if spec.shape != want:
                    raise CheckpointError(f"{f.path}: tensor {name} has shape {spec.shape}, TP rank {r} of "
                                          f"TP={self.tp} should hold {want}")
        self._names = list(self._files[0].specs)

    def unlisted_files(self) -> list[str]:
        return [rank_rel(r) for r in range(self.tp)]

    def names(self) -> list[str]:
        return list(self._names)

    def spec(self, name: str) -> TensorSpec:
        shapes = [self._files[r].specs[name].shape for r in range(self.tp)]
        return TensorSpec(name, merge_shape(name, shapes, self.config), self._files[0].specs[name].dtype)

    def read(self, name: str) -> torch.Tensor:
        return merge(name, [self._files[r].read(name) for r in range(self.tp)], self.config)
