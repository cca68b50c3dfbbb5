"""HF config.json <-> SSMConfig for the hybrid families, both directions in one place.

A family maps its config onto a block pattern (see config.py) plus the per-kind fields:

- Nemotron-H: `hybrid_override_pattern` (or `layers_block_type`) is the pattern as is; each layer is
  ONE of Mamba-2 / attention (no RoPE) / squared-ReLU MLP with its own pre-norm. MoE (`E`) is refused.
- Falcon-H1: each HF decoder layer is two blocks, `P` (input_layernorm, then Mamba-2 and attention in
  parallel, outputs scaled and summed) and `-` (pre_ff_layernorm, gated SiLU MLP), so the pattern is
  `P-` repeated; its muP multipliers go to `multipliers` / `ssm_multipliers`.
"""
from __future__ import annotations

import math

from .config import (ATTENTION_BLOCK, MAMBA_BLOCK, MLP_BLOCK, MOE_BLOCK, NEMOTRON_H, PARALLEL_BLOCK, RELU2, SWIGLU,
                     ConfigError, _as_float, hf_common_fields, hf_token_fields)

# Nemotron-H's layer type names (and their legacy spellings) -> pattern letters
_NEMOTRON_KINDS = {"linear_attention": MAMBA_BLOCK, "mamba": MAMBA_BLOCK, "full_attention": ATTENTION_BLOCK,
                   "attention": ATTENTION_BLOCK, "mlp": MLP_BLOCK, "moe": MOE_BLOCK}
FALCON_MULTIPLIERS = ("embedding", "lm_head", "attention_in", "attention_out", "key", "ssm_in", "ssm_out")


def _pick(hf: dict, *names, default=None):
    """The first of `names` present in hf (configs have renamed fields over time)."""
    for n in names:
        if hf.get(n) is not None:
            return hf[n]
    return default


def nemotron_pattern(hf: dict) -> str:
    if hf.get("hybrid_override_pattern"):
        pattern = str(hf["hybrid_override_pattern"])
    else:
        kinds = hf.get("layers_block_type") or hf.get("layer_types")
        if not kinds:
            raise ConfigError("Nemotron-H config.json has neither hybrid_override_pattern nor layers_block_type")
        unknown = sorted(set(kinds) - set(_NEMOTRON_KINDS))
        if unknown:
            raise ConfigError(f"Nemotron-H layer types {unknown} are not supported")
        pattern = "".join(_NEMOTRON_KINDS[k] for k in kinds)
    if MOE_BLOCK in pattern:
        raise ConfigError(f"Nemotron-H pattern {pattern!r} has MoE ('E') layers, which are not supported yet "
                          f"(only M, * and - layers)")
    return pattern


def from_hf_hybrid(cls, family: str, hf: dict):
    hidden = int(hf["hidden_size"])
    if family == NEMOTRON_H:
        pattern = nemotron_pattern(hf)
        for field, want in (("mamba_hidden_act", "silu"), ("mlp_hidden_act", RELU2)):
            if hf.get(field, want) != want:
                raise ConfigError(f"{field} {hf[field]!r} is not supported (only {want})")
        heads, head_dim = int(hf["mamba_num_heads"]), int(hf["mamba_head_dim"])
        attn_heads = int(hf.get("num_attention_heads", 32))
        # The HF mixer clamps dt from below at time_step_min in its chunked scan (its single-step
        # path does not; we clamp in both so decode equals recomputation).
        dt_min = float(_pick(hf, "time_step_min", "mamba_dt_min", default=0.001))
        return cls(
            family=family, pattern=pattern, hidden_size=hidden, num_layers=len(pattern),
            vocab_size=int(hf["vocab_size"]), intermediate_size=heads * head_dim,
            state_size=int(hf.get("ssm_state_size", 128)),
            conv_kernel=int(_pick(hf, "conv_kernel", "mamba_d_conv", default=4)),
            use_bias=bool(hf.get("use_bias", False)),
            use_conv_bias=bool(_pick(hf, "use_conv_bias", "mamba_conv_bias", default=True)),
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            residual_in_fp32=bool(hf.get("residual_in_fp32", False)),
            # transformers' NemotronHForCausalLM never ties lm_head to the embedding, whatever the flag
            tie_word_embeddings=False,
            num_heads=heads, head_dim=head_dim, n_groups=int(_pick(hf, "n_groups", "mamba_n_groups", default=8)),
            chunk_size=int(_pick(hf, "chunk_size", "mamba_chunk_size", default=128)),
            time_step_limit=(dt_min, math.inf),
            num_attention_heads=attn_heads, num_kv_heads=int(hf.get("num_key_value_heads") or attn_heads),
            attention_head_dim=int(hf.get("head_dim") or hidden // attn_heads),
            mlp_kind=RELU2, mlp_intermediate_size=int(hf.get("intermediate_size", 21504)),
            mlp_bias=bool(hf.get("mlp_bias", False)), **hf_token_fields(hf))
    # Falcon-H1
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"rope type {rope.get('rope_type', rope.get('type'))!r} is not supported (only default)")
    rope_theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    rms_norm = bool(hf.get("mamba_rms_norm", False))
    if rms_norm and hf.get("mamba_norm_before_gate", True):
        raise ConfigError("Falcon-H1 with mamba_rms_norm and mamba_norm_before_gate is not supported "
                          "(the released models norm after the gate)")
    layers = int(hf["num_hidden_layers"])
    inner = int(hf.get("mamba_d_ssm") or int(hf.get("mamba_expand", 2)) * hidden)
    heads = int(hf.get("mamba_n_heads", 128))
    head_dim = hf.get("mamba_d_head", "auto")
    head_dim = inner // heads if head_dim in (None, "auto") else int(head_dim)
    attn_heads = int(hf.get("num_attention_heads", 32))
    mlp_mult = hf.get("mlp_multipliers") or [1.0, 1.0]
    mult = {k: float(hf.get(f"{k}_multiplier", 1.0)) for k in FALCON_MULTIPLIERS}
    mult.update(mlp_gate=float(mlp_mult[0]), mlp_down=float(mlp_mult[1]))
    limit = hf.get("time_step_limit") or (0.0, math.inf)
    return cls(
        family=family, pattern=(PARALLEL_BLOCK + MLP_BLOCK) * layers, hidden_size=hidden, num_layers=2 * layers,
        vocab_size=int(hf["vocab_size"]), intermediate_size=inner, state_size=int(hf.get("mamba_d_state", 256)),
        conv_kernel=int(hf.get("mamba_d_conv", 4)), use_bias=bool(hf.get("mamba_proj_bias", False)),
        mamba_out_bias=bool(hf.get("projectors_bias", False)), use_conv_bias=bool(hf.get("mamba_conv_bias", True)),
        mamba_norm="gated" if rms_norm else "none",
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)), residual_in_fp32=False,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        num_heads=heads, head_dim=head_dim, n_groups=int(hf.get("mamba_n_groups", 1)),
        chunk_size=int(hf.get("mamba_chunk_size", 256)), time_step_limit=(_as_float(limit[0]), _as_float(limit[1])),
        num_attention_heads=attn_heads, num_kv_heads=int(hf.get("num_key_value_heads") or attn_heads),
        attention_head_dim=int(hf.get("head_dim") or hidden // attn_heads),
        attention_bias=bool(hf.get("attention_bias", False)), rope_theta=rope_theta,
        mlp_kind=SWIGLU, mlp_intermediate_size=int(hf.get("intermediate_size", 14336)),
        mlp_bias=bool(hf.get("mlp_bias", False)), multipliers=mult,
        ssm_multipliers=tuple(float(x) for x in (hf.get("ssm_multipliers") or [1.0] * 5)),
        extra={"max_position_embeddings": int(hf.get("max_position_embeddings", 8192))}, **hf_token_fields(hf))


def hf_config_hybrid(cfg) -> dict:
    """The config.json transformers needs to rebuild this hybrid (the inverse of from_hf_hybrid)."""
    d = dict(**hf_common_fields(cfg), num_attention_heads=cfg.num_attention_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.attention_head_dim,
             intermediate_size=cfg.mlp_intermediate_size, mlp_bias=cfg.mlp_bias)
    limit = [cfg.time_step_limit[0], cfg.time_step_limit[1]]
    if cfg.family == NEMOTRON_H:
        kinds = {MAMBA_BLOCK: "mamba", ATTENTION_BLOCK: "attention", MLP_BLOCK: "mlp"}
        d.update(hybrid_override_pattern=cfg.pattern, num_hidden_layers=cfg.num_layers,
                 layers_block_type=[{"mamba": "linear_attention", "attention": "full_attention"}.get(kinds[k], kinds[k])
                                    for k in cfg.pattern],
                 mamba_num_heads=cfg.num_heads, mamba_head_dim=cfg.head_dim, n_groups=cfg.n_groups,
                 ssm_state_size=cfg.state_size, conv_kernel=cfg.conv_kernel, chunk_size=cfg.chunk_size,
                 use_bias=cfg.use_bias, use_conv_bias=cfg.use_conv_bias, layer_norm_epsilon=cfg.norm_eps,
                 residual_in_fp32=cfg.residual_in_fp32, time_step_min=cfg.time_step_limit[0],
                 mamba_hidden_act="silu", mlp_hidden_act=RELU2, attention_bias=False)
        return d
    m = cfg.multiplier
    d.update(num_hidden_layers=cfg.hf_num_layers, hidden_act="silu", mamba_d_ssm=cfg.intermediate_size,
             mamba_n_heads=cfg.num_heads, mamba_d_head=cfg.head_dim, mamba_n_groups=cfg.n_groups,
             mamba_d_state=cfg.state_size, mamba_d_conv=cfg.conv_kernel, mamba_chunk_size=cfg.chunk_size,
             mamba_conv_bias=cfg.use_conv_bias, mamba_proj_bias=cfg.use_bias, projectors_bias=cfg.out_proj_bias,
             mamba_rms_norm=cfg.mamba_norm == "gated", mamba_norm_before_gate=False, rms_norm_eps=cfg.norm_eps,
             attention_bias=cfg.attention_bias, time_step_limit=limit,
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rope_theta=cfg.rope_theta,
             max_position_embeddings=cfg.extra.get("max_position_embeddings", 8192),
             mlp_multipliers=[m("mlp_gate"), m("mlp_down")],
             ssm_multipliers=list(cfg.ssm_multipliers) or [1.0] * 5,
             **{f"{k}_multiplier": m(k) for k in FALCON_MULTIPLIERS})
    return d
