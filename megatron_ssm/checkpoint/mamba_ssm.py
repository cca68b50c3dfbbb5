"""mamba-ssm's native checkpoints (how state-spaces publishes mamba-130m … mamba2-2.7b).

Their config.json is mamba-ssm's MambaConfig (d_model, n_layer, ssm_cfg, ...) and their weights a
pytorch_model.bin with HF's tensor names (`backbone.embedding.weight` is mapped as HF's old name
is). Only config.json needs translating; fields left out take mamba-ssm's own defaults.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import MAMBA1, MAMBA2, ConfigError, SSMConfig
from .errors import CheckpointError
from .hf import TensorDir

# mamba_ssm.models.config_mamba.MambaConfig and the Mamba / Mamba2 module signatures
MODEL_DEFAULTS = dict(d_intermediate=0, ssm_cfg={}, attn_layer_idx=[], rms_norm=True, residual_in_fp32=True,
                      pad_vocab_size_multiple=8, tie_embeddings=True, norm_epsilon=1e-5)
MAMBA1_DEFAULTS = dict(d_state=16, d_conv=4, expand=2, dt_rank="auto", bias=False, conv_bias=True)
MAMBA2_DEFAULTS = dict(d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256, bias=False,
                       conv_bias=True, d_ssm=None, rmsnorm=True, norm_before_gate=False, D_has_hdim=False,
                       dt_limit=(0.0, float("inf")))
# What our model cannot run, with the value it needs.
UNSUPPORTED = dict(d_intermediate=0, attn_layer_idx=[], rms_norm=True)
UNSUPPORTED_MAMBA2 = dict(d_ssm=None, rmsnorm=True, norm_before_gate=False, D_has_hdim=False)
# GPT-NeoX's tokenizer, which every state-spaces model uses: <|endoftext|> is id 0.
NEOX_SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def is_mamba_ssm_config(raw: dict) -> bool:
    return "d_model" in raw and "n_layer" in raw


def config_from_mamba_ssm(raw: dict, dtype: str = "float32") -> SSMConfig:
    """mamba-ssm MambaConfig dict -> SSMConfig (vocab padded as mamba-ssm pads its embedding)."""
    model = {**MODEL_DEFAULTS, **raw}
    layer = (model["ssm_cfg"] or {}).get("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ConfigError(f"ssm_cfg.layer {layer!r} is not supported (Mamba1 or Mamba2)")
    m2 = layer == "Mamba2"
    ssm = {**(MAMBA2_DEFAULTS if m2 else MAMBA1_DEFAULTS), **model["ssm_cfg"]}
    for source, rules in ((model, UNSUPPORTED), (ssm, UNSUPPORTED_MAMBA2 if m2 else {})):
        for key, needed in rules.items():
            if (source.get(key) or None) != (needed or None):  # 0, [], False and None all mean "off"
                raise ConfigError(f"mamba-ssm config {key}={source.get(key)!r} is not supported "
                                  f"(megatron-ssm runs {key}={needed!r})")
    try:
        hidden, mult = int(model["d_model"]), int(model["pad_vocab_size_multiple"])
        vocab = math.ceil(int(model["vocab_size"]) / mult) * mult
        intermediate = int(ssm["expand"] * hidden)
        common = dict(
            hidden_size=hidden, num_layers=int(model["n_layer"]), vocab_size=vocab,
            intermediate_size=intermediate, state_size=int(ssm["d_state"]), conv_kernel=int(ssm["d_conv"]),
            use_bias=bool(ssm["bias"]), use_conv_bias=bool(ssm["conv_bias"]), norm_eps=float(model["norm_epsilon"]),
            residual_in_fp32=bool(model["residual_in_fp32"]), tie_word_embeddings=bool(model["tie_embeddings"]),
            torch_dtype=dtype, **{k: model.get(k, v) for k, v in NEOX_SPECIAL_IDS.items()})
    except KeyError as e:
        raise ConfigError(f"mamba-ssm config.json lacks required field {e.args[0]!r}") from None
    if m2:
        headdim = int(ssm["headdim"])
        if intermediate % headdim:
            raise ConfigError(f"expand * d_model ({intermediate}) is not a multiple of headdim ({headdim})")
        lo, hi = ssm["dt_limit"]
        return SSMConfig(family=MAMBA2, num_heads=intermediate // headdim, head_dim=headdim,
                         n_groups=int(ssm["ngroups"]), chunk_size=int(ssm["chunk_size"]),
                         time_step_limit=(float(lo), float(hi)), **common)
    rank = ssm["dt_rank"]
    return SSMConfig(family=MAMBA1, time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank),
                     **common)


class MambaSSMCheckpoint(TensorDir):
    format = "mamba-ssm"

    def __init__(self, path: str | Path, verify: bool = True):
        path = Path(path)
        try:
            raw = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
        super().__init__(path, config_from_mamba_ssm(raw), verify)
        # The file does not say its dtype; the weights do.
        self.config.torch_dtype = str(self.spec("embeddings.weight").dtype).removeprefix("torch.") \
            if "embeddings.weight" in self.names() else "float32"
