"""Any supported checkpoint -> ours at any TP degree, or -> HF: one tensor in memory at a time.

Every input is read as full HF-shaped tensors (a megatron-ssm input merges its shards on the fly)
and every output is cut from them with partition.shard, so N -> M resharding, import and export
are the same loop. Names, shapes and the TP degree are all checked before anything is written.
"""
from __future__ import annotations

import copy
import ctypes
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import SSMConfig
from .errors import CheckpointError, check_names
from .formats import open_checkpoint
from .hf_export import DEFAULT_MAX_SHARD_BYTES, HFWriter
from .megatron import CheckpointWriter
from .partition import hf_names, hf_shapes, shard, shard_shape
from .spec import TensorSpec

__all__ = ["DTYPES", "check_names", "convert"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def keep_heap_small() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own, so freeing it unmaps it.

    By default glibc raises that threshold up to 32 MiB as blocks are freed and serves such blocks
    from its heap, where a few small live objects pin the freed space: converting a 7B model then
    grew by ~64 MiB per layer (5 GB resident instead of 1). Process-wide, but only changes where
    large blocks live. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def source_specs(src, cfg: SSMConfig) -> list[TensorSpec]:
    """The tensors to convert, in order, after checking that the source holds exactly those the
    config implies, with the shapes it implies (a tied lm_head copy is allowed and skipped)."""
    expected = hf_names(cfg)
    found = [n for n in src.names() if not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    check_names(found, expected, str(src.path))
    shapes = hf_shapes(cfg)
    specs = [src.spec(n) for n in expected]
    for s in specs:
        if s.shape != shapes[s.name]:
            raise CheckpointError(f"{src.path}: tensor {s.name} has shape {s.shape}, its config implies "
                                  f"{shapes[s.name]}")
    return specs


def convert(load_dir: str | Path, save_dir: str | Path, tp: int | None = None, *, to_hf: bool = False,
            dtype: str | None = None, force: bool = False, progress: bool = True,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, verify: bool = True, to_megatron: bool = False,
            ckpt_format: str = "torch_dist", megatron_core: str | None = None, megatron_spec: str = "te") -> None:
    """Write `load_dir` (any format open_checkpoint knows) to `save_dir`: ours at TP=`tp`, HF, or
    (to_megatron) Megatron-LM's layout at TP=`tp` in `ckpt_format` (megatron_lm.py).
    A source this tool wrote is checked against its manifest's checksums first, unless not `verify`."""
    if to_hf == (tp is not None):
        raise ValueError("give exactly one of --tp N (megatron-ssm or --to-megatron output) and --to-hf (HF output)")
    if Path(load_dir).resolve() == Path(save_dir).resolve():
        raise CheckpointError(f"--save-dir and --load-dir are both {save_dir}; write elsewhere")
    keep_heap_small()
    with open_checkpoint(load_dir, verify=verify) as src:
        cfg = copy.deepcopy(src.config)
        specs = source_specs(src, cfg)
        if dtype:
            cfg.torch_dtype = dtype
            specs = [TensorSpec(s.name, s.shape, DTYPES[dtype]) for s in specs]
        if to_megatron:
            from .megatron_lm import export

            export(src, save_dir, tp, specs, ckpt_format=ckpt_format, conv=megatron_core, force=force,
                   te=megatron_spec == "te")
            return
        if to_hf:
            writer = HFWriter(save_dir, cfg, specs, force=force, max_shard_bytes=max_shard_bytes)
            put = writer.write
        else:
            cfg.validate(tp)
            writer = CheckpointWriter(save_dir, force=force)

            def put(name: str, full: torch.Tensor) -> None:
                for rank in range(tp):
                    writer.write(rank, name, shard(name, full, cfg, tp, rank))

        desc = f"{src.format} -> {'HF' if to_hf else f'TP={tp}'}"
        with writer, tqdm(total=sum(s.nbytes for s in specs), unit="B", unit_scale=True, unit_divisor=1024,
                          desc=desc, disable=not progress) as bar:
            if not to_hf:
                writer.open_ranks(tp, cfg, [[TensorSpec(s.name, shard_shape(s.name, s.shape, cfg, tp, r), s.dtype)
                                             for s in specs] for r in range(tp)])
            for i, s in enumerate(specs, 1):
                put(s.name, src.read(s.name).to(s.dtype))
                bar.set_postfix_str(f"{i}/{len(specs)} tensors", refresh=False)
                bar.update(s.nbytes)
            writer.copy_tokenizer(src.path)
