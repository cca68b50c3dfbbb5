"""megatron-core ModuleSpecs whose mixer is ours, for `--spec megatron_ssm.megatron.specs NAME`.

Each is a stack spec for megatron-core's MambaModel (0.16) / HybridModel (0.19): megatron-core's own
MambaLayer (pre-norm, residual add) around our mixer, without Transformer Engine: local parallel
linears inside the mixer, torch RMSNorm for the block norms and the final norm (`TorchNormStack`).
Parameter names follow megatron-core's local spec (`decoder.layers.i.norm.weight`,
`decoder.layers.i.mixer.in_proj.weight`, ...; `weights.py` loads any checkpoint we read into them).

    mamba2_stack_spec        Mamba-2, any n_groups dividing or divided by tp (megatron-core: n_groups % tp == 0)
    mamba1_stack_spec        Mamba-1 (megatron-core has none)
    falcon_mamba_stack_spec  Falcon-Mamba: Mamba-1 with weightless RMS norms on dt, B and C
"""
from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from ..config import FALCON_MAMBA, MAMBA1, MAMBA2
from .mixer import Mamba1SpecMixer, Mamba2SpecMixer
from .stack import StackSubmodules, TorchNormStack


def mamba_layer_spec(family: str = MAMBA2, **mixer_params) -> ModuleSpec:
    """megatron-core's MambaLayer with our `family` mixer (params go to the mixer, e.g. time_step_rank)."""
    if family == MAMBA2:
        mixer = ModuleSpec(module=Mamba2SpecMixer, params=dict(mixer_params))
    elif family in (MAMBA1, FALCON_MAMBA):
        mixer = ModuleSpec(module=Mamba1SpecMixer, params={"family": family, **mixer_params})
    else:
        raise ValueError(f"no megatron_ssm mixer for family {family!r} (mamba2, mamba, falcon_mamba)")
    return ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=WrappedTorchNorm, mixer=mixer, mamba_bda=get_bias_dropout_add))


def stack_spec(family: str = MAMBA2, **mixer_params) -> ModuleSpec:
    """The stack spec MambaModel / HybridModel take (`mamba_stack_spec` / `hybrid_stack_spec`)."""
    return ModuleSpec(module=TorchNormStack,
                      submodules=StackSubmodules(mamba_layer=mamba_layer_spec(family, **mixer_params)))


mamba2_stack_spec = stack_spec(MAMBA2)
mamba1_stack_spec = stack_spec(MAMBA1)
falcon_mamba_stack_spec = stack_spec(FALCON_MAMBA)
