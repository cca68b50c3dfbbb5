"""Build this rank's model from a converted checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.convert import DTYPES, check_names
from ..checkpoint.hf import CheckpointError
from ..checkpoint.megatron import load_rank
from ..parallel import TPContext
from .layers import AllReduceFn
from .lm import MambaLM


def load_model(ckpt_dir: str | Path, tp: TPContext, dtype: torch.dtype | None = None,
               allreduce: AllReduceFn | None = None) -> MambaLM:
    """This rank's model. Every rank of the world must call it: if any rank fails to load its
    shard, all of them raise (the failing one with its reason) instead of the others going on to
    wait for it in the first collective."""
    model, error = None, None
    try:
        model = _load(ckpt_dir, tp, dtype, allreduce)
    except CheckpointError as e:
        error = e
    failed = _ranks_that_failed(error is not None, tp)
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"{ckpt_dir}: TP rank(s) {', '.join(map(str, failed))} could not load their shard "
                              f"(their own messages say why)")
    return model


def _load(ckpt_dir, tp: TPContext, dtype, allreduce) -> MambaLM:
    cfg, state = load_rank(ckpt_dir, tp.rank, tp.size)
    dtype = dtype or DTYPES.get(cfg.torch_dtype, torch.float32)
    model = MambaLM(cfg, tp, dtype=dtype, allreduce=allreduce)
    own = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    check_names(list(state), list(own), f"{ckpt_dir} (TP rank {tp.rank})")
    for name, tensor in state.items():
        if tensor.shape != own[name].shape:
            raise CheckpointError(f"{ckpt_dir} (TP rank {tp.rank}): tensor {name} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def _ranks_that_failed(failed: bool, tp: TPContext) -> list[int]:
    """The TP ranks whose shard failed to load anywhere in the world. Over the whole world, not the
    TP group: with context parallelism every CP rank loads its TP rank's shard, and a CP group that
    went on while another failed would wait for it in the first CP exchange."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [tp.rank] if failed else []
    world, me = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(world, device=tp.device)
    flags[me] = float(failed)
    dist.all_reduce(flags)
    # world rank = cp_rank * tp + tp_rank (megatron-core's tp-first order; see parallel.py)
    return sorted({r % tp.size for r in range(world) if flags[r] > 0})
