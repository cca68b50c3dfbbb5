"""Our tensor names <-> HF's, one map per family: the HF reader and writer both use it.

Our names are our modules' names (see model/blocks.py). For Mamba, Falcon-Mamba, Mamba-2 and
Nemotron-H they are HF's less the `backbone.` prefix, except that attention's q, k and v
projections are one packed `qkv_proj` (one GEMM, cut per rank by partition.py). Falcon-H1's
decoder layer i is our blocks 2i (`P`: input_layernorm, mamba, self_attn) and 2i+1 (`-`:
pre_ff_layernorm, feed_forward with gate and up packed as `gate_up_proj`).

An entry maps one of our tensors to the HF tensors concatenated along dim 0 to make it, each with
its row count (None for a 1:1 entry), so reading concatenates and writing splits: HF -> ours -> HF
gives back the same bytes.
"""
from __future__ import annotations

import re

from ..config import FALCON_H1, ZAMBA, ZAMBA2, SSMConfig

Parts = list[tuple[str, int | None]]


def hf_prefix(cfg: SSMConfig) -> str:
    """What transformers puts before the base model's tensor names when it saves this family."""
    return "model." if cfg.family in (FALCON_H1, ZAMBA, ZAMBA2) else "backbone."


def strip_prefix(key: str) -> str:
    """An HF tensor name without its base-model prefix; old Mamba checkpoints say `embedding`."""
    for prefix in ("backbone.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return "embeddings.weight" if key == "embedding.weight" else key


def hf_parts(name: str, cfg: SSMConfig) -> Parts:
    """The HF tensors (prefix stripped, see strip_prefix) whose concatenation is our `name`."""
    if name == "lm_head.weight":
        return [(name, None)]
    if cfg.has_shared_blocks:
        from .zamba_names import zamba_hf_parts

        return zamba_hf_parts(name, cfg)
    if cfg.family == FALCON_H1:
        name = _falcon_h1_name(name)
    d = cfg.attention_head_dim
    kv = cfg.num_kv_heads * d
    m = re.match(r"^(.*)\b(qkv_proj|gate_up_proj)\.(weight|bias)$", name)
    if m:
        base, packed, what = m.groups()
        if packed == "qkv_proj":
            rows = (("q_proj", cfg.num_attention_heads * d), ("k_proj", kv), ("v_proj", kv))
        else:
            rows = (("gate_proj", cfg.mlp_intermediate_size), ("up_proj", cfg.mlp_intermediate_size))
        return [(f"{base}{part}.{what}", n) for part, n in rows]
    return [(name, None)]


def _falcon_h1_name(name: str) -> str:
    top = {"embeddings.weight": "embed_tokens.weight", "norm_f.weight": "final_layernorm.weight"}
    if name in top:
        return top[name]
    m = re.match(r"^layers\.(\d+)\.(\w+)\.(.+)$", name)
    if not m:
        return name
    block, owner, rest = int(m.group(1)), m.group(2), m.group(3)
    layer = f"layers.{block // 2}"
    if block % 2 == 0:  # P: norm, Mamba-2 mixer, attention
        owner = {"norm": "input_layernorm", "mixer": "mamba", "attention": "self_attn"}.get(owner, owner)
    else:  # -: norm, MLP
        owner = {"norm": "pre_ff_layernorm", "mixer": "feed_forward"}.get(owner, owner)
    return f"{layer}.{owner}.{rest}"


def hf_key(part: str, cfg: SSMConfig) -> str:
    """The full HF tensor name of a stripped part name."""
    return part if part == "lm_head.weight" else hf_prefix(cfg) + part
