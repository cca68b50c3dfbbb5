"""Zamba / Zamba2 tensors: our names, HF's names, and how each is cut across ranks.

Ours (model/zamba.py, model/lm.py): `layers.j.norm` / `layers.j.mixer.*` for every Mamba layer
(plain or inside a hybrid), `layers.j.application.*` for what the hybrid at j adds to its shared
block (`linear`, Zamba2's `{q,k,v,mlp}_adapter.{0,1}`), and `shared_blocks.b.*` for shared block b,
held once. HF (docs/hybrids.md) nests the Mamba layer of a hybrid under `mamba_decoder.` and keeps
each shared block, with every adapter it serves, under the first hybrid layer that uses it
(`shared_transf` in Zamba, `shared_transformer` in Zamba2); an adapter's HF index is the hybrid's
count k among all hybrids.
"""
from __future__ import annotations

import re

from ..config import SHARED_BLOCK, ZAMBA
from .partition import KV_HEADS, SPLIT, Packed, Rule

Parts = list[tuple[str, int | None]]
_ADAPTERS = ("q", "k", "v")


def hybrid_layers(cfg) -> list[int]:
    return [j for j, kind in enumerate(cfg.pattern) if kind == SHARED_BLOCK]


def block_of(cfg, layer: int) -> int:
    """Which shared block the hybrid at `layer` applies."""
    return hybrid_layers(cfg).index(layer) % cfg.shared_blocks


def first_user(cfg, block: int) -> int:
    """The first hybrid layer applying shared block `block` (where HF keeps its weights)."""
    return hybrid_layers(cfg)[block]


def zamba_tensors(cfg) -> list[str]:
    """Every tensor of a Zamba / Zamba2 model in our names, in checkpoint order."""
    bias = cfg.use_bias
    if cfg.family == ZAMBA:
        mixer = ["in_proj.weight", "conv1d.weight", "x_proj_weight", "dt_proj_weight", "dt_proj_bias", "A_log", "D",
                 "out_proj.weight"] + (["in_proj.bias", "out_proj.bias"] if bias else [])
    else:
        mixer = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"] + \
            (["in_proj.bias", "out_proj.bias"] if bias else [])
    if cfg.use_conv_bias:
        mixer.append("conv1d.bias")
    names = ["embeddings.weight", "norm_f.weight"]
    mlp_bias = ["mlp.gate_up_proj.bias", "mlp.down_proj.bias"] if cfg.mlp_bias else []
    for b in range(cfg.shared_blocks):
        names += [f"shared_blocks.{b}.{n}" for n in
                  ["input_layernorm.weight", "attention.qkv_proj.weight", "attention.o_proj.weight",
                   "pre_ff_layernorm.weight", "mlp.gate_up_proj.weight", "mlp.down_proj.weight"] + mlp_bias]
    for j, kind in enumerate(cfg.pattern):
        names += [f"layers.{j}.norm.weight"] + [f"layers.{j}.mixer.{n}" for n in mixer]
        if kind == SHARED_BLOCK:
            names.append(f"layers.{j}.application.linear.weight")
            adapters = (list(_ADAPTERS) if cfg.attention_adapters else []) + (["mlp"] if cfg.adapter_rank else [])
            names += [f"layers.{j}.application.{a}_adapter.{i}.weight" for a in adapters for i in (0, 1)]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def zamba_hf_parts(name: str, cfg) -> Parts:
    """The HF tensors (without `model.`) whose concatenation along dim 0 is our `name`."""
    shared = "shared_transf" if cfg.family == ZAMBA else "shared_transformer"
    top = {"embeddings.weight": "embed_tokens.weight", "norm_f.weight": "final_layernorm.weight",
           "lm_head.weight": "lm_head.weight"}
    if name in top:
        return [(top[name], None)]
    m = re.match(r"^shared_blocks\.(\d+)\.(.+)$", name)
    if m:
        base = f"layers.{first_user(cfg, int(m.group(1)))}.{shared}."
        rest = m.group(2)
        d, F = cfg.attention_head_dim, cfg.mlp_intermediate_size
        if rest.startswith("attention.qkv_proj."):
            what = rest.rsplit(".", 1)[1]
            kv = cfg.num_kv_heads * d
            return [(f"{base}self_attn.{p}_proj.{what}", n)
                    for p, n in (("q", cfg.num_attention_heads * d), ("k", kv), ("v", kv))]
        if rest.startswith("attention."):
            return [(base + "self_attn." + rest.removeprefix("attention."), None)]
        if rest.startswith("mlp.gate_up_proj.") and cfg.family == ZAMBA:
            what = rest.rsplit(".", 1)[1]
            return [(f"{base}feed_forward.gate_proj.{what}", F), (f"{base}feed_forward.up_proj.{what}", F)]
        if rest.startswith("mlp."):
            return [(base + "feed_forward." + rest.removeprefix("mlp."), None)]
        return [(base + rest, None)]
    m = re.match(r"^layers\.(\d+)\.(\w+)\.(.+)$", name)
    if not m:
        raise KeyError(f"no HF name for tensor {name!r} in a {cfg.family} model")
    j, owner, rest = int(m.group(1)), m.group(2), m.group(3)
    hybrid = cfg.pattern[j] == SHARED_BLOCK
    inner = f"layers.{j}.mamba_decoder." if hybrid else f"layers.{j}."
    if owner == "norm":
        return [(inner + "input_layernorm." + rest, None)]
    if owner == "mixer":
        return [(inner + "mamba." + rest, None)]
    if owner == "application":
        if rest == "linear.weight":
            return [(f"layers.{j}.linear.weight", None)]
        a = re.match(r"^(q|k|v|mlp)_adapter\.([01])\.weight$", rest)
        if a:
            k = hybrid_layers(cfg).index(j)
            base = f"layers.{first_user(cfg, block_of(cfg, j))}.{shared}."
            kind, which = a.groups()
            where = ("feed_forward.gate_up_proj_adapter_list" if kind == "mlp"
                     else f"self_attn.linear_{kind}_adapter_list")
            return [(f"{base}{where}.{k}.{which}.weight", None)]
    raise KeyError(f"no HF name for tensor {name!r} in a {cfg.family} model")


def zamba_rule(name: str, cfg, tp: int, attention_rule, mlp_rule, mamba2_rule) -> Rule:
    """Sharding rule of one of our Zamba tensors; the shared block's attention and MLP, and Zamba2's
    Mamba-2 mixer, take the core's rules (passed in, they live in partition.py)."""
    if name in ("embeddings.weight", "lm_head.weight"):
        return Rule(dim=0, pad_rows_to=cfg.padded_vocab_size(tp))
    if name == "norm_f.weight":
        return Rule()
    m = re.match(r"^shared_blocks\.\d+\.(.+)$", name)
    if m:
        rest = m.group(1)
        rule = None
        if rest.endswith("layernorm.weight"):
            rule = Rule()
        elif rest.startswith("attention."):
            rule = attention_rule(rest.removeprefix("attention."), cfg)
        elif rest.startswith("mlp."):
            rule = mlp_rule(rest.removeprefix("mlp."), cfg)
        if rule is not None:
            return rule
        raise KeyError(f"no sharding rule for tensor {name!r} in a {cfg.family} model")
    m = re.match(r"^layers\.\d+\.(\w+)\.(.+)$", name)
    if not m:
        raise KeyError(f"no sharding rule for tensor {name!r} in a {cfg.family} model")
    owner, rest = m.groups()
    if owner == "norm":
        return Rule()
    if owner == "mixer":
        rule = _zamba_mixer_rule(rest, cfg) if cfg.family == ZAMBA else mamba2_rule(rest, cfg)
        if rule is not None:
            return rule
    if owner == "application":
        if rest == "linear.weight" or rest.endswith(".0.weight"):
            return Rule()  # replicated: the output linear, and every adapter's down projection
        d = cfg.attention_head_dim
        if rest == "q_adapter.1.weight":
            return Rule(dim=0)  # rows by query head, as q's rows of qkv_proj
        if rest in ("k_adapter.1.weight", "v_adapter.1.weight"):
            return Rule(packed=Packed(((KV_HEADS, cfg.num_kv_heads * d),)))
        if rest == "mlp_adapter.1.weight":
            F = cfg.mlp_intermediate_size
            return Rule(packed=Packed(((SPLIT, F), (SPLIT, F))))  # [gate | up], as gate_up_proj
    raise KeyError(f"no sharding rule for tensor {name!r} in a {cfg.family} model")


def _zamba_mixer_rule(n: str, cfg) -> Rule | None:
    """Zamba's multi-head Mamba-1 (model/zamba_mamba.py): everything by channel."""
    heads = cfg.num_heads
    if n in ("in_proj.weight", "in_proj.bias"):
        return Rule(interleaved=2)
    if n in ("conv1d.weight", "conv1d.bias"):
        return Rule(dim=0)
    if n == "x_proj_weight":
        return Rule(head_channels=2, heads=heads)
    if n in ("dt_proj_weight", "dt_proj_bias", "A_log", "D"):
        return Rule(head_channels=1, heads=heads)
    if n == "out_proj.weight":
        return Rule(dim=1)
    if n == "out_proj.bias":
        return Rule()
    return None


def zamba_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The full shape of every tensor of zamba_tensors(cfg)."""
    H, I, N, K, V = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.conv_kernel, cfg.vocab_size
    d, F, r = cfg.attention_head_dim, cfg.mlp_intermediate_size, cfg.adapter_rank
    q, kv, A = cfg.num_attention_heads * d, cfg.num_kv_heads * d, cfg.attention_input_size
    if cfg.family == ZAMBA:
        nh, hd, R = cfg.num_heads, I // cfg.num_heads, cfg.time_step_rank
        mixer = {"in_proj.weight": (2 * I, H), "in_proj.bias": (2 * I,), "conv1d.weight": (I, 1, K),
                 "conv1d.bias": (I,), "x_proj_weight": (nh, R + 2 * N, hd), "dt_proj_weight": (nh, hd, R),
                 "dt_proj_bias": (nh, hd), "A_log": (nh, hd, N), "D": (nh, hd)}
    else:
        heads, conv = cfg.num_heads, I + 2 * cfg.n_groups * N
        rows = I + conv + heads
        mixer = {"in_proj.weight": (rows, H), "in_proj.bias": (rows,), "conv1d.weight": (conv, 1, K),
                 "conv1d.bias": (conv,), "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "norm.weight": (I,)}
    mixer |= {"out_proj.weight": (H, I), "out_proj.bias": (H,)}
    shared = {"input_layernorm.weight": (A,), "attention.qkv_proj.weight": (q + 2 * kv, A),
              "attention.o_proj.weight": (H, q), "pre_ff_layernorm.weight": (H,),
              "mlp.gate_up_proj.weight": (2 * F, H), "mlp.gate_up_proj.bias": (2 * F,),
              "mlp.down_proj.weight": (H, F), "mlp.down_proj.bias": (H,)}
    application = {"linear.weight": (H, H), "q_adapter.0.weight": (r, A), "q_adapter.1.weight": (q, r),
                   "k_adapter.0.weight": (r, A), "k_adapter.1.weight": (kv, r), "v_adapter.0.weight": (r, A),
                   "v_adapter.1.weight": (kv, r), "mlp_adapter.0.weight": (r, H), "mlp_adapter.1.weight": (2 * F, r)}
    top = {"embeddings.weight": (V, H), "lm_head.weight": (V, H), "norm_f.weight": (H,)}
    shapes = {}
    for name in zamba_tensors(cfg):
        if name in top:
            shapes[name] = top[name]
            continue
        m = re.match(r"^(?:shared_blocks|layers)\.\d+\.(.+)$", name)
        rest = m.group(1)
        if name.startswith("shared_blocks."):
            shapes[name] = shared[rest]
        elif rest == "norm.weight":
            shapes[name] = (H,)
        elif rest.startswith("mixer."):
            shapes[name] = mixer[rest.removeprefix("mixer.")]
        else:
            shapes[name] = application[rest.removeprefix("application.")]
    return shapes


__all__ = ["zamba_tensors", "zamba_hf_parts", "zamba_rule", "zamba_shapes", "hybrid_layers", "block_of",
           "first_user"]
