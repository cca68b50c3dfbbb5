"""How each full tensor is cut into TP shards, and glued back: the one place that knows the layout.

Tensors carry our names (our modules' names; for the Mamba families HF's less `backbone.`, other
formats map theirs in names.py). The rules are per block kind of the pattern, one function each.
Most tensors are split evenly along one dim or replicated. Packed tensors (in_proj, Mamba-2's
conv1d, attention's qkv_proj, the gated MLP's gate_up_proj) are a stack of segments along dim 0,
each cut on its own; Mamba-2's B/C segments hold n_groups groups and attention's k/v segments hold
kv-head groups: split when tp divides their count, otherwise handed whole to the ranks whose heads
use them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ATTENTION_BLOCK, MAMBA_BLOCK, MLP_BLOCK, PARALLEL_BLOCK, SWIGLU, SSMConfig

SPLIT, GROUPS, KV_HEADS = "split", "groups", "kv_heads"


@dataclass(frozen=True)
class Packed:
    """Segments stacked along dim 0: (kind, rows) with kind SPLIT (even cut), GROUPS (Mamba-2's B/C
    groups) or KV_HEADS (attention's key/value heads)."""

    segments: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Rule:
    dim: int | None = None  # split evenly along this dim; None: replicated
    packed: Packed | None = None
    pad_rows_to: int | None = None  # vocabulary tensors: pad dim 0 before splitting
    # Zamba's in_proj: dim 0 interleaves this many segments per channel ([x0, z0, x1, z1, ...]);
    # each rank gets its channels' rows de-interleaved ([x_r | z_r]).
    interleaved: int | None = None
    # Zamba's per-mamba-head tensors [heads, ..., head_dim (at this axis), ...]: split by channel
    # (head-major), each rank's channels regrouped as [pieces, ..., channels/pieces, ...].
    head_channels: int | None = None
    heads: int = 1


def rule_for(name: str, cfg: SSMConfig, tp: int) -> Rule:
    """The sharding rule of tensor `name` (raises KeyError for a name the model does not have)."""
    if cfg.has_shared_blocks:
        from .zamba_names import zamba_rule

        return zamba_rule(name, cfg, tp, _attention_rule, _mlp_rule, _mamba_rule)
    if name in ("embeddings.weight", "lm_head.weight"):
        return Rule(dim=0, pad_rows_to=cfg.padded_vocab_size(tp))
    if name == "norm_f.weight":
        return Rule()
    m = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if m and int(m.group(1)) < cfg.num_layers:
        kind, local = cfg.pattern[int(m.group(1))], m.group(2)
        rule = None
        if local == "norm.weight":
            rule = Rule()
        elif kind in (MAMBA_BLOCK, PARALLEL_BLOCK) and local.startswith("mixer."):
            rule = _mamba_rule(local.removeprefix("mixer."), cfg)
        elif kind == ATTENTION_BLOCK and local.startswith("mixer."):
            rule = _attention_rule(local.removeprefix("mixer."), cfg)
        elif kind == PARALLEL_BLOCK and local.startswith("attention."):
            rule = _attention_rule(local.removeprefix("attention."), cfg)
        elif kind == MLP_BLOCK and local.startswith("mixer."):
            rule = _mlp_rule(local.removeprefix("mixer."), cfg)
        if rule is not None:
            return rule
    raise KeyError(f"no sharding rule for tensor {name!r} in a {cfg.family} model")


def _mamba_rule(n: str, cfg: SSMConfig) -> Rule | None:
    if n == "out_proj.bias":
        return Rule()
    if n == "out_proj.weight":
        return Rule(dim=1)
    I = cfg.intermediate_size
    if cfg.is_mamba2:
        bc = cfg.n_groups * cfg.state_size
        conv = ((SPLIT, I), (GROUPS, bc), (GROUPS, bc))
        if n in ("in_proj.weight", "in_proj.bias"):
            return Rule(packed=Packed(((SPLIT, I),) + conv + ((SPLIT, cfg.num_heads),)))
        if n in ("conv1d.weight", "conv1d.bias"):
            return Rule(packed=Packed(conv))
        if n in ("dt_bias", "A_log", "D", "norm.weight"):
            return Rule(dim=0)
        return None
    if n in ("in_proj.weight", "in_proj.bias"):
        return Rule(packed=Packed(((SPLIT, I), (SPLIT, I))))
    if n == "x_proj.weight":
        return Rule(dim=1)
    if n in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
        return Rule(dim=0)
    return None


def _attention_rule(n: str, cfg: SSMConfig) -> Rule | None:
    """qkv_proj packs [q | k | v]: q split by heads, k and v by kv-head ownership; o_proj row-parallel."""
    d = cfg.attention_head_dim
    if n in ("qkv_proj.weight", "qkv_proj.bias"):
        kv = cfg.num_kv_heads * d
        return Rule(packed=Packed(((SPLIT, cfg.num_attention_heads * d), (KV_HEADS, kv), (KV_HEADS, kv))))
    if n == "o_proj.weight":
        return Rule(dim=1)
    if n == "o_proj.bias":
        return Rule()
    return None


def _mlp_rule(n: str, cfg: SSMConfig) -> Rule | None:
    """up (or [gate | up]) column-parallel, down row-parallel."""
    I = cfg.mlp_intermediate_size
    if n in ("gate_up_proj.weight", "gate_up_proj.bias"):
        return Rule(packed=Packed(((SPLIT, I), (SPLIT, I))))
    if n in ("up_proj.weight", "up_proj.bias"):
        return Rule(dim=0)
    if n == "down_proj.weight":
        return Rule(dim=1)
    if n == "down_proj.bias":
        return Rule()
    return None


def _group_count(kind: str, cfg: SSMConfig) -> int:
    return cfg.n_groups if kind == GROUPS else cfg.num_kv_heads


def _group_owner(count: int, tp: int, rank: int) -> tuple[int, int]:
    """(first group, number of groups) of `count` groups that `rank` holds: count/tp each when tp
    divides count, else the one group of the heads on `rank`."""
    if count % tp == 0:
        per = count // tp
        return rank * per, per
    return rank // (tp // count), 1


def shard(name: str, full: torch.Tensor, cfg: SSMConfig, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of HF tensor `name`, contiguous."""
    return shard_by_rule(rule_for(name, cfg, tp), name, full, cfg, tp, rank)


def shard_by_rule(rule: Rule, name: str, full: torch.Tensor, cfg, tp: int, rank: int) -> torch.Tensor:
    if rule.interleaved is not None:
        return _deinterleave(full, rule.interleaved, tp, rank)
    if rule.head_channels is not None:
        return _split_head_channels(full, rule.head_channels, rule.heads, tp, rank)
    if rule.pad_rows_to is not None and full.shape[0] < rule.pad_rows_to:
        full = _cat([full, full.new_zeros(rule.pad_rows_to - full.shape[0], *full.shape[1:])])
    if rule.packed is not None:
        pieces, start = [], 0
        for kind, rows in rule.packed.segments:
            seg = full.narrow(0, start, rows)
            start += rows
            if kind == SPLIT:
                pieces.append(seg.chunk(tp, dim=0)[rank])
            else:
                groups = _group_count(kind, cfg)
                first, count = _group_owner(groups, tp, rank)
                gsize = rows // groups
                pieces.append(seg.narrow(0, first * gsize, count * gsize))
        if start != full.shape[0]:
            raise ValueError(f"{name}: expected {start} rows, found {full.shape[0]}")
        return _cat(pieces).contiguous()
    if rule.dim is None:
        return full.contiguous()
    if full.shape[rule.dim] % tp:
        raise ValueError(f"{name}: dim {rule.dim} of size {full.shape[rule.dim]} does not split over {tp} ranks")
    return full.chunk(tp, dim=rule.dim)[rank].contiguous()


def merge(name: str, shards: list[torch.Tensor], cfg: SSMConfig) -> torch.Tensor:
    """Inverse of `shard`: the HF tensor from every rank's piece (vocabulary padding removed)."""
    return merge_by_rule(rule_for(name, cfg, len(shards)), name, shards, cfg)


def merge_by_rule(rule: Rule, name: str, shards: list[torch.Tensor], cfg) -> torch.Tensor:
    tp = len(shards)
    if rule.interleaved is not None:
        return _interleave(shards, rule.interleaved)
    if rule.head_channels is not None:
        return _merge_head_channels(shards, rule.head_channels, rule.heads)
    if rule.packed is not None:
        local_rows = []
        for kind, rows in rule.packed.segments:
            if kind == SPLIT:
                local_rows.append(rows // tp)
            else:
                groups = _group_count(kind, cfg)
                local_rows.append(_group_owner(groups, tp, 0)[1] * rows // groups)
        split = [s.split(local_rows, dim=0) for s in shards]
        segments = []
        for i, (kind, rows) in enumerate(rule.packed.segments):
            if kind == SPLIT:
                segments.append(_cat([parts[i] for parts in split]))
            else:
                # each group from the first rank that holds it
                owners = {}
                for r in range(tp):
                    owners.setdefault(_group_owner(_group_count(kind, cfg), tp, r)[0], r)
                segments.append(_cat([split[owners[g]][i] for g in sorted(owners)]))
        return _cat(segments)
    if rule.dim is None:
        return shards[0]
    full = _cat(shards, dim=rule.dim)
    if rule.pad_rows_to is not None:
        full = full[: cfg.vocab_size]
    return full


def hf_names(cfg: SSMConfig) -> list[str]:
    """Every tensor of this config, in our names and checkpoint order (lm_head when untied)."""
    if cfg.has_shared_blocks:
        from .zamba_names import zamba_tensors

        return zamba_tensors(cfg)
    names = ["embeddings.weight", "norm_f.weight"]
    for i, kind in enumerate(cfg.pattern):
        names += [f"layers.{i}.{n}" for n in block_tensors(kind, cfg)]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def block_tensors(kind: str, cfg: SSMConfig) -> list[str]:
    """The tensors of one block of kind `kind`, relative to `layers.i.`."""
    names = ["norm.weight"]
    if kind in (MAMBA_BLOCK, PARALLEL_BLOCK):
        names += [f"mixer.{n}" for n in _mamba_tensors(cfg)]
    if kind == ATTENTION_BLOCK:
        names += [f"mixer.{n}" for n in _attention_tensors(cfg)]
    if kind == PARALLEL_BLOCK:
        names += [f"attention.{n}" for n in _attention_tensors(cfg)]
    if kind == MLP_BLOCK:
        up = "gate_up_proj" if cfg.mlp_kind == SWIGLU else "up_proj"
        names += [f"mixer.{up}.weight", "mixer.down_proj.weight"]
        if cfg.mlp_bias:
            names += [f"mixer.{up}.bias", "mixer.down_proj.bias"]
    return names


def _mamba_tensors(cfg: SSMConfig) -> list[str]:
    names = ["in_proj.weight", "conv1d.weight", "A_log", "D", "out_proj.weight"]
    if cfg.use_conv_bias:
        names.append("conv1d.bias")
    if cfg.use_bias:
        names.append("in_proj.bias")
    if cfg.out_proj_bias:
        names.append("out_proj.bias")
    if cfg.is_mamba2:
        names.append("dt_bias")
        if cfg.mamba_norm == "gated":
            names.append("norm.weight")
    else:
        names += ["x_proj.weight", "dt_proj.weight", "dt_proj.bias"]
    return names


def _attention_tensors(cfg: SSMConfig) -> list[str]:
    names = ["qkv_proj.weight", "o_proj.weight"]
    if cfg.attention_bias:
        names += ["qkv_proj.bias", "o_proj.bias"]
    return names


def hf_shapes(cfg: SSMConfig) -> dict[str, tuple[int, ...]]:
    """The shape `config.json` implies for every tensor of `hf_names(cfg)`, in that order."""
    if cfg.has_shared_blocks:
        from .zamba_names import zamba_shapes

        return zamba_shapes(cfg)
    H, I, N, K, V = cfg.hidden_size, cfg.intermediate_size, cfg.state_size, cfg.conv_kernel, cfg.vocab_size
    if cfg.is_mamba2:
        heads, bc = cfg.num_heads, 2 * cfg.n_groups * N
        in_rows, conv = 2 * I + bc + heads, I + bc
        mixer = {"A_log": (heads,), "D": (heads,), "dt_bias": (heads,), "norm.weight": (I,)}
    else:
        R = cfg.time_step_rank
        in_rows, conv = 2 * I, I
        mixer = {"A_log": (I, N), "D": (I,), "x_proj.weight": (R + 2 * N, I), "dt_proj.weight": (I, R),
                 "dt_proj.bias": (I,)}
    mixer |= {"in_proj.weight": (in_rows, H), "in_proj.bias": (in_rows,), "conv1d.weight": (conv, 1, K),
              "conv1d.bias": (conv,), "out_proj.weight": (H, I), "out_proj.bias": (H,)}
    d = cfg.attention_head_dim
    q, qkv = cfg.num_attention_heads * d, (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * d
    attention = {"qkv_proj.weight": (qkv, H), "qkv_proj.bias": (qkv,), "o_proj.weight": (H, q), "o_proj.bias": (H,)}
    F_ = cfg.mlp_intermediate_size
    mlp = {"up_proj.weight": (F_, H), "up_proj.bias": (F_,), "gate_up_proj.weight": (2 * F_, H),
           "gate_up_proj.bias": (2 * F_,), "down_proj.weight": (H, F_), "down_proj.bias": (H,)}
    top = {"embeddings.weight": (V, H), "lm_head.weight": (V, H), "norm_f.weight": (H,)}
    shapes = {}
    for name in hf_names(cfg):
        if name in top:
            shapes[name] = top[name]
            continue
        i, local = re.match(r"^layers\.(\d+)\.(.+)$", name).groups()
        kind = cfg.pattern[int(i)]
        owner, n = local.split(".", 1) if "." in local else (local, "")
        if local == "norm.weight":
            shapes[name] = (H,)
        elif owner == "attention" or kind == ATTENTION_BLOCK:
            shapes[name] = attention[n]
        elif kind == MLP_BLOCK:
            shapes[name] = mlp[n]
        else:
            shapes[name] = mixer[n]
    return shapes


def _cat(parts, dim: int = 0) -> torch.Tensor:
    """torch.cat, except that meta tensors' result is built here: torch's meta cat imports
    torch._dynamo, 1-3 s once a process, which every convert paid for shard_shape's dry runs."""
    parts = list(parts)
    if not parts[0].is_meta:
        return torch.cat(parts, dim)
    shape = list(parts[0].shape)
    dim %= len(shape)
    shape[dim] = sum(p.shape[dim] for p in parts)
    return torch.empty(shape, dtype=parts[0].dtype, device="meta")


def shard_shape(name: str, shape: tuple[int, ...], cfg: SSMConfig, tp: int, rank: int) -> tuple[int, ...]:
    """Shape of `shard` without data: the same code run on a meta tensor, so the two cannot disagree."""
    return tuple(shard(name, torch.empty(shape, device="meta"), cfg, tp, rank).shape)


def merge_shape(name: str, shapes: list[tuple[int, ...]], cfg: SSMConfig) -> tuple[int, ...]:
    return tuple(merge(name, [torch.empty(s, device="meta") for s in shapes], cfg).shape)


def _deinterleave(full: torch.Tensor, segments: int, tp: int, rank: int) -> torch.Tensor:
    """[channels*segments, ...] with segments interleaved per channel -> this rank's channels as
    [seg 0 rows | seg 1 rows | ...]."""
    channels = full.shape[0] // segments
    if full.shape[0] % segments or channels % tp:
        raise ValueError(f"{full.shape[0]} interleaved rows do not split into {segments} segments over {tp} ranks")
    mine = full.reshape(channels, segments, *full.shape[1:]).chunk(tp, dim=0)[rank]
    return mine.transpose(0, 1).reshape(-1, *full.shape[1:]).contiguous()


def _interleave(shards: list[torch.Tensor], segments: int) -> torch.Tensor:
    parts = [s.reshape(segments, -1, *s.shape[1:]).transpose(0, 1) for s in shards]
    full = _cat(parts, dim=0)
    return full.reshape(-1, *full.shape[2:]).contiguous()


def _pieces(heads: int, tp: int) -> int:
    """Head pieces per rank: whole heads when tp divides heads, else one part of a head."""
    if heads % tp == 0:
        return heads // tp
    if tp % heads == 0:
        return 1
    raise ValueError(f"TP degree {tp} and {heads} mamba heads: one must divide the other")


def _split_head_channels(full: torch.Tensor, axis: int, heads: int, tp: int, rank: int) -> torch.Tensor:
    """[heads, ..., head_dim at `axis`, ...] -> [pieces, ..., channels/pieces, ...] of rank's channels."""
    if full.shape[0] != heads:
        raise ValueError(f"expected {heads} mamba heads on dim 0, found shape {tuple(full.shape)}")
    t = full.movedim(axis, 1)  # [heads, head_dim, rest...]
    rest = t.shape[2:]
    mine = t.reshape(-1, *rest).chunk(tp, dim=0)[rank]
    pieces = _pieces(heads, tp)
    return mine.reshape(pieces, -1, *rest).movedim(1, axis).contiguous()


def _merge_head_channels(shards: list[torch.Tensor], axis: int, heads: int) -> torch.Tensor:
    flat = [s.movedim(axis, 1) for s in shards]  # [pieces, width, rest...]
    rest = flat[0].shape[2:]
    full = _cat([f.reshape(-1, *rest) for f in flat], dim=0)
    return full.reshape(heads, -1, *rest).movedim(1, axis).contiguous()
