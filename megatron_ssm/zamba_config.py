"""HF config.json <-> SSMConfig for Zamba (`ZambaForCausalLM`) and Zamba2 (`Zamba2ForCausalLM`).

Both map onto the block pattern (config.py) with two letters: `M`, a plain Mamba layer, and `S`, a
Mamba layer whose norm input also receives one application of a shared transformer block
(`model/zamba.py`; the computation and HF's names are in docs/hybrids.md). HF's `layers_block_type`
gives the letters one per layer (`hybrid` -> `S`, anything else -> `M`); the k-th `S` uses shared
block k % shared_blocks (Zamba: 1 block; Zamba2: `num_mem_blocks`, ABAB...).

Zamba's Mamba layers are Mamba-1 with `num_heads` = n_mamba_heads per-head x_proj/dt_proj
(model/zamba_mamba.py); Zamba2's are HF Mamba-2. The shared block's attention reads
[hidden, token embedding] (2 x hidden), with head_dim = 2 x hidden / heads and softmax scale
(head_dim / 2) ** -0.5; its MLP is gelu-gated.
"""
from __future__ import annotations

import math

from .config import GEGLU, MAMBA_BLOCK, SHARED_BLOCK, ZAMBA, ConfigError, hf_common_fields, hf_token_fields

_HYBRID_NAMES = ("hybrid", "g")


def zamba_layer_kinds(hf: dict) -> list[str]:
    """HF's layers_block_type, or the list HF's ZambaConfig derives when config.json lacks it."""
    kinds = hf.get("layers_block_type") or hf.get("layer_types")
    if kinds:
        return list(kinds)
    n = int(hf["num_hidden_layers"])
    if hf.get("model_type") == "zamba2" or "Zamba2ForCausalLM" in (hf.get("architectures") or []):
        raise ConfigError("Zamba2 config.json lacks layers_block_type")
    period, offset = int(hf.get("attn_layer_period", 6)), int(hf.get("attn_layer_offset", 4))
    return ["mamba", "mamba", "hybrid"] + ["hybrid" if i % period == offset else "mamba" for i in range(n - 3)]


def _check_act(hf: dict, field: str, want: str) -> None:
    if hf.get(field, want) != want:
        raise ConfigError(f"{field} {hf[field]!r} is not supported (only {want})")


def from_hf_zamba(cls, family: str, hf: dict):
    hidden = int(hf["hidden_size"])
    kinds = zamba_layer_kinds(hf)
    if len(kinds) != int(hf.get("num_hidden_layers", len(kinds))):
        raise ConfigError(f"layers_block_type has {len(kinds)} entries, num_hidden_layers is {hf['num_hidden_layers']}")
    pattern = "".join(SHARED_BLOCK if k in _HYBRID_NAMES else MAMBA_BLOCK for k in kinds)
    if SHARED_BLOCK not in pattern:
        raise ConfigError(f"{family} config has no hybrid layer (layers_block_type {kinds})")
    _check_act(hf, "hidden_act", "gelu")
    heads = int(hf.get("num_attention_heads", 16 if family == ZAMBA else 32))
    attention_head_dim = int(hf.get("attention_head_dim") or 2 * hidden // heads)
    inner = int(hf.get("mamba_expand", 2)) * hidden
    mamba_heads = int(hf.get("n_mamba_heads", 2 if family == ZAMBA else 8))
    common = dict(
        family=family, pattern=pattern, hidden_size=hidden, num_layers=len(pattern), vocab_size=int(hf["vocab_size"]),
        intermediate_size=inner, state_size=int(hf.get("mamba_d_state", 16 if family == ZAMBA else 64)),
        conv_kernel=int(hf.get("mamba_d_conv", 4)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        residual_in_fp32=False, tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        num_heads=mamba_heads, head_dim=inner // mamba_heads,
        num_attention_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        attention_head_dim=attention_head_dim, attention_input_size=2 * hidden,
        attention_softmax_scale=(attention_head_dim / 2) ** -0.5,
        mlp_kind=GEGLU, mlp_intermediate_size=int(hf.get("intermediate_size") or 4 * hidden),
        extra={"max_position_embeddings": int(hf.get("max_position_embeddings", 4096))}, **hf_token_fields(hf))
    if family == ZAMBA:
        _check_act(hf, "hidden_mamba_act", "silu")
        rank = hf.get("mamba_dt_rank", "auto")
        return cls(**common, use_bias=bool(hf.get("mamba_proj_bias", False)),
                   use_conv_bias=bool(hf.get("mamba_conv_bias", True)),
                   time_step_rank=math.ceil(hidden / 16) if rank == "auto" else int(rank), shared_blocks=1)
    # Zamba2: HF's gated norm inside the Mamba-2 mixer has its eps fixed at 1e-5, our mixer uses norm_eps
    if float(hf.get("rms_norm_eps", 1e-5)) != 1e-5:
        raise ConfigError(f"Zamba2 with rms_norm_eps {hf['rms_norm_eps']} is not supported (HF's Mamba-2 norm "
                          f"uses 1e-5 whatever rms_norm_eps says; only 1e-5 keeps both equal)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"rope type {rope['rope_type']!r} is not supported (only default)")
    adapters = bool(hf.get("use_shared_attention_adapter", False))
    if adapters and common["num_kv_heads"] != heads:
        raise ConfigError("Zamba2's q/k/v adapters are 2 x hidden wide: they need num_key_value_heads == "
                          "num_attention_heads (HF itself cannot run this config)")
    bias = bool(hf.get("add_bias_linear", False))
    return cls(**common, use_bias=bias, use_conv_bias=True, n_groups=int(hf.get("mamba_ngroups", 1)),
               chunk_size=int(hf.get("chunk_size", 256)),
               time_step_limit=(float(hf.get("time_step_min", 0.001)), math.inf),
               rope_theta=float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
               if hf.get("use_mem_rope", False) else None,
               mlp_bias=bias, shared_blocks=int(hf.get("num_mem_blocks", 1)),
               adapter_rank=int(hf.get("adapter_rank", 128)), attention_adapters=adapters)


def hf_config_zamba(cfg) -> dict:
    """The config.json transformers needs to rebuild this model (the inverse of from_hf_zamba)."""
    d = dict(**hf_common_fields(cfg), num_hidden_layers=cfg.num_layers,
             layers_block_type=["hybrid" if k == SHARED_BLOCK else "linear_attention" for k in cfg.pattern],
             num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_kv_heads,
             attention_head_dim=cfg.attention_head_dim, intermediate_size=cfg.mlp_intermediate_size,
             hidden_act="gelu", rms_norm_eps=cfg.norm_eps, mamba_expand=cfg.intermediate_size // cfg.hidden_size,
             mamba_d_state=cfg.state_size, mamba_d_conv=cfg.conv_kernel, n_mamba_heads=cfg.num_heads,
             max_position_embeddings=cfg.extra.get("max_position_embeddings", 4096))
    if cfg.family == ZAMBA:
        d.update(mamba_dt_rank=cfg.time_step_rank, mamba_proj_bias=cfg.use_bias, mamba_conv_bias=cfg.use_conv_bias,
                 hidden_mamba_act="silu", attention_hidden_size=2 * cfg.hidden_size)
        return d
    d.update(mamba_ngroups=cfg.n_groups, mamba_headdim=cfg.head_dim, chunk_size=cfg.chunk_size,
             add_bias_linear=cfg.use_bias, time_step_min=cfg.time_step_limit[0], use_conv_bias=True,
             num_mem_blocks=cfg.shared_blocks, adapter_rank=cfg.adapter_rank,
             use_shared_attention_adapter=cfg.attention_adapters, use_mem_rope=cfg.rope_theta is not None,
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta or 10000.0})
    return d


__all__ = ["from_hf_zamba", "hf_config_zamba", "zamba_layer_kinds"]
