"""Build this rank's model from a converted checkpoint, or straight from a Megatron-LM one."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.convert import DTYPES, check_names
from ..checkpoint.hf import CheckpointError
from ..checkpoint.integrity import HASH, MANIFEST, ChecksumError, verify_default
from ..checkpoint import megatron_lm
from ..checkpoint.megatron import load_rank, rank_file
from ..parallel import TPContext
from .layers import AllReduceFn
from .lm import MambaLM


FAILED, BAD_CHECKSUM = 1, 2  # what a rank tells the others about its load


def load_model(ckpt_dir: str | Path, tp: TPContext, dtype: torch.dtype | None = None,
               allreduce: AllReduceFn | None = None, verify: bool | None = None) -> MambaLM:
    """This rank's model. Every rank of the world must call it: if any rank fails to load its
    shard, all of them raise (the failing one with its reason) instead of the others going on to
    wait for it in the first collective. Each rank verifies its own shard's checksum unless
    `verify` is False (default: on unless MEGATRON_SSM_NO_VERIFY=1); a mismatch is named on all."""
    verify = verify_default() if verify is None else verify
    model, error = None, None
    try:
        model = _load(ckpt_dir, tp, dtype, allreduce, verify)
    except CheckpointError as e:
        error = e
    status = _statuses(0 if error is None else BAD_CHECKSUM if isinstance(error, ChecksumError) else FAILED, tp)
    if error is not None:
        raise error
    damaged = [r for r, s in enumerate(status) if s == BAD_CHECKSUM]
    if damaged:
        files = ", ".join(str(rank_file(Path(ckpt_dir), r)) for r in damaged)
        raise ChecksumError(f"{files} (the shard of TP rank(s) {', '.join(map(str, damaged))}) does not match its "
                            f"{HASH} checksum in {MANIFEST}: damaged or changed after it was written. Convert the "
                            f"checkpoint again (or set MEGATRON_SSM_NO_VERIFY=1 to load it anyway)")
    failed = [r for r, s in enumerate(status) if s]
    if failed:
        raise CheckpointError(f"{ckpt_dir}: TP rank(s) {', '.join(map(str, failed))} could not load their shard "
                              f"(their own messages say why)")
    return model


def _load(ckpt_dir, tp: TPContext, dtype, allreduce, verify: bool = True) -> MambaLM:
    if megatron_lm.is_megatron_lm(ckpt_dir):  # Megatron-LM's own files, resharded here at load
        cfg, state = megatron_lm.load_rank(ckpt_dir, tp.rank, tp.size, verify)
    else:
        cfg, state = load_rank(ckpt_dir, tp.rank, tp.size, verify)
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


def _statuses(status: int, tp: TPContext) -> list[int]:
    """Every TP rank's load status (0: loaded; the worst over its CP ranks), from one all-reduce over
    the whole world, not the TP group: with context parallelism every CP rank loads its TP rank's
    shard, and a CP group that went on while another failed would wait for it in the first CP
    exchange."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [status if r == tp.rank else 0 for r in range(tp.size)]
    world = dist.get_world_size()
    flags = torch.zeros(world, device=tp.device)
    flags[dist.get_rank()] = float(status)
    dist.all_reduce(flags)
    # world rank = cp_rank * tp + tp_rank (megatron-core's tp-first order; see parallel.py)
    return [int(max(flags[r::tp.size].tolist())) for r in range(tp.size)]
