"""Build this rank's model from a converted checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.convert import DTYPES, check_names
from ..checkpoint.hf import CheckpointError
from ..checkpoint.megatron import load_rank
from ..parallel import TPContext
from .layers import AllReduceFn
from .lm import MambaLM


def load_model(ckpt_dir: str | Path, tp: TPContext, dtype: torch.dtype | None = None,
               allreduce: AllReduceFn | None = None) -> MambaLM:
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
