"""megatron-core's layer stack and model for both supported versions, without Transformer Engine.

0.16 builds pattern stacks with `MambaStack` / `MambaModel`; 0.19 renamed them `HybridStack` /
`HybridModel` (and takes `hybrid_layer_pattern`). Both hard-wire the final norm to TE's `TENorm`,
which cannot be built without TE: `TorchNormStack` builds the stack without it and puts megatron-core's
own torch norm (`WrappedTorchNorm`, torch.nn.RMSNorm) in its place, under the same name
(`decoder.final_norm.weight`), so checkpoints keep megatron-core's names.
"""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

try:  # 0.19
    from megatron.core.models.hybrid.hybrid_block import HybridStack as _Stack
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules as StackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel as Model

    HYBRID_API = True
except ImportError:  # 0.16
    from megatron.core.models.mamba.mamba_model import MambaModel as Model  # noqa: F401
    from megatron.core.ssm.mamba_block import MambaStack as _Stack
    from megatron.core.ssm.mamba_block import MambaStackSubmodules as StackSubmodules  # noqa: F401

    HYBRID_API = False

from megatron.core.transformer.torch_norm import WrappedTorchNorm


class TorchNormStack(_Stack):
    """MambaStack / HybridStack whose final norm is torch's RMSNorm instead of TE's."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = WrappedTorchNorm(config=config, hidden_size=config.hidden_size,
                                               eps=config.layernorm_epsilon)


def build_model(config, stack_spec, *, vocab_size: int, pattern: str, tied: bool, max_sequence_length: int = 4096):
    """megatron-core's Mamba/Hybrid model from `stack_spec`, with the pattern keyword each version takes."""
    kw = dict(vocab_size=vocab_size, max_sequence_length=max_sequence_length,
              share_embeddings_and_output_weights=tied, position_embedding_type="none")
    if HYBRID_API:
        return Model(config, hybrid_stack_spec=stack_spec, hybrid_layer_pattern=pattern, **kw)
    return Model(config, mamba_stack_spec=stack_spec, hybrid_override_pattern=pattern, **kw)
