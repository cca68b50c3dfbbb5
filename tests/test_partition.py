"""checkpoint.partition against the layout written out here by hand.

Each full tensor holds its own row numbers (row i is all i), so a shard says which HF rows it got.
The expected rows per rank come from the layout as HF and mamba-ssm define it: Mamba-2's in_proj
is [z | x | B | C | dt] with B and C of n_groups groups, a rank holding heads [r H/tp, (r+1) H/tp)
and the B/C of the groups those heads read; Mamba-1's in_proj is [x | z]; vocabulary rows are padded
to 128 tp and split; out_proj and x_proj split their input dim.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ssm.checkpoint import partition
from megatron_ssm.config import SSMConfig


def mamba2(n_groups=1, **kw):
    return SSMConfig(family="mamba2", hidden_size=16, num_layers=1, vocab_size=300, intermediate_size=32,
                     state_size=4, num_heads=8, head_dim=4, n_groups=n_groups, use_bias=True, **kw)


def mamba1(**kw):
    return SSMConfig(family="mamba", hidden_size=16, num_layers=1, vocab_size=300, intermediate_size=32,
                     state_size=4, time_step_rank=2, use_bias=True, tie_word_embeddings=False, **kw)


def numbered(shape, dim=0) -> torch.Tensor:
    """A tensor whose every element along `dim` holds its index (as float64, exact)."""
    idx = torch.arange(shape[dim], dtype=torch.float64)
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return idx.view(view).expand(shape).contiguous()


def rows_of(t: torch.Tensor, dim=0) -> list[int]:
    return t.movedim(dim, 0).reshape(t.shape[dim], -1)[:, 0].long().tolist()


def span(start, n):
    return list(range(start, start + n))


def mamba2_rows(cfg: SSMConfig, tp: int, r: int, conv_only: bool = False) -> list[int]:
    I, G, N, H = cfg.intermediate_size, cfg.n_groups, cfg.state_size, cfg.num_heads
    heads = span(r * H // tp, H // tp)
    groups = sorted({h // (H // G) for h in heads})  # the groups this rank's heads read
    per_rank = I // tp
    z = span(r * per_rank, per_rank)
    x = span(I + r * per_rank, per_rank)
    B = [2 * I + g * N + i for g in groups for i in range(N)]
    C = [2 * I + G * N + g * N + i for g in groups for i in range(N)]
    dt = [2 * I + 2 * G * N + h for h in heads]
    if conv_only:  # conv1d covers [x | B | C] alone: shift to its own numbering
        return [v - I for v in x + B + C]
    return z + x + B + C + dt


def shard_rows(name, cfg, tp, r, full_shape, dim=0):
    return rows_of(partition.shard(name, numbered(full_shape, dim), cfg, tp, r), dim)


@pytest.mark.parametrize("n_groups,tp", [(1, 1), (1, 2), (1, 4), (2, 2), (2, 4), (4, 2), (4, 4), (8, 4), (2, 8)])
def test_mamba2_packed_tensors(n_groups, tp):
    cfg = mamba2(n_groups)
    shapes = partition.hf_shapes(cfg)
    for r in range(tp):
        for name in ("layers.0.mixer.in_proj.weight", "layers.0.mixer.in_proj.bias"):
            assert shard_rows(name, cfg, tp, r, shapes[name]) == mamba2_rows(cfg, tp, r), (name, r)
        for name in ("layers.0.mixer.conv1d.weight", "layers.0.mixer.conv1d.bias"):
            assert shard_rows(name, cfg, tp, r, shapes[name]) == mamba2_rows(cfg, tp, r, conv_only=True), (name, r)
        heads = span(r * cfg.num_heads // tp, cfg.num_heads // tp)
        for name in ("layers.0.mixer.dt_bias", "layers.0.mixer.A_log", "layers.0.mixer.D"):
            assert shard_rows(name, cfg, tp, r, shapes[name]) == heads, (name, r)
        channels = span(r * cfg.intermediate_size // tp, cfg.intermediate_size // tp)
        assert shard_rows("layers.0.mixer.norm.weight", cfg, tp, r, shapes["layers.0.mixer.norm.weight"]) == channels
        assert shard_rows("layers.0.mixer.out_proj.weight", cfg, tp, r, shapes["layers.0.mixer.out_proj.weight"],
                          dim=1) == channels


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mamba1_tensors(tp):
    cfg = mamba1()
    shapes = partition.hf_shapes(cfg)
    I = cfg.intermediate_size
    for r in range(tp):
        ch = span(r * I // tp, I // tp)
        assert shard_rows("layers.0.mixer.in_proj.weight", cfg, tp, r, shapes["layers.0.mixer.in_proj.weight"]) == \
            ch + [I + c for c in ch]
        for name in ("conv1d.weight", "conv1d.bias", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
            full = "layers.0.mixer." + name
            assert shard_rows(full, cfg, tp, r, shapes[full]) == ch, (name, r)
        for name in ("x_proj.weight", "out_proj.weight"):
            full = "layers.0.mixer." + name
            assert shard_rows(full, cfg, tp, r, shapes[full], dim=1) == ch, (name, r)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vocabulary_rows_are_padded_then_split(tp):
    cfg = mamba1()
    padded = 128 * tp * -(-cfg.vocab_size // (128 * tp))
    assert cfg.padded_vocab_size(tp) == padded
    full = numbered((cfg.vocab_size, 16)) + 1  # padding shows as 0
    pieces = [partition.shard("lm_head.weight", full, cfg, tp, r) for r in range(tp)]
    for r, piece in enumerate(pieces):
        per = padded // tp
        want = [v + 1 if v < cfg.vocab_size else 0 for v in span(r * per, per)]
        assert rows_of(piece) == want, r
    assert torch.equal(partition.merge("lm_head.weight", pieces, cfg), full)


@pytest.mark.parametrize("family,tp", [("mamba2-g1", 4), ("mamba2-g2", 2), ("mamba2-g4", 4), ("mamba2-g2", 8),
                                       ("mamba", 2), ("mamba", 4)])
def test_merge_inverts_shard_and_shapes_agree(seed, family, tp):
    cfg = mamba1() if family == "mamba" else mamba2(int(family[-1]))
    g = torch.Generator().manual_seed(seed)
    for name, shape in partition.hf_shapes(cfg).items():
        full = torch.randn(shape, generator=g)
        pieces = [partition.shard(name, full, cfg, tp, r) for r in range(tp)]
        assert all(p.is_contiguous() for p in pieces), name
        assert [tuple(p.shape) for p in pieces] == [partition.shard_shape(name, shape, cfg, tp, r) for r in range(tp)]
        assert torch.equal(partition.merge(name, pieces, cfg), full), (seed, name)
        assert partition.merge_shape(name, [tuple(p.shape) for p in pieces], cfg) == shape, name
    replicated = [n for n in partition.hf_shapes(cfg) if partition.rule_for(n, cfg, tp).dim is None
                  and partition.rule_for(n, cfg, tp).packed is None]
    assert sorted(replicated) == ["layers.0.mixer.out_proj.bias", "layers.0.norm.weight", "norm_f.weight"], replicated


def test_hf_names_follow_the_config():
    base = [n.split(".", 2)[-1] for n in partition.hf_names(mamba2()) if n.startswith("layers.0.")]
    assert sorted(base) == sorted(["norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.A_log",
                                   "mixer.D", "mixer.out_proj.weight", "mixer.conv1d.bias", "mixer.in_proj.bias",
                                   "mixer.out_proj.bias", "mixer.dt_bias", "mixer.norm.weight"])
    plain = SSMConfig(family="mamba", hidden_size=16, num_layers=2, vocab_size=300, intermediate_size=32,
                      state_size=4, time_step_rank=2, use_conv_bias=False)
    names = partition.hf_names(plain)
    assert names[:2] == ["embeddings.weight", "norm_f.weight"] and "lm_head.weight" not in names
    assert len(names) == 2 + 2 * 9 and not any("bias" in n and "dt_proj" not in n for n in names)
    assert partition.hf_names(mamba1())[-1] == "lm_head.weight"
    shapes = partition.hf_shapes(mamba2(2))
    assert shapes["layers.0.mixer.in_proj.weight"] == (2 * 32 + 2 * 2 * 4 + 8, 16)
    assert shapes["layers.0.mixer.conv1d.weight"] == (32 + 2 * 2 * 4, 1, 4)
    assert shapes["layers.0.norm.weight"] == (16,) and shapes["layers.0.mixer.norm.weight"] == (32,)
    s1 = partition.hf_shapes(mamba1())
    assert s1["layers.0.mixer.x_proj.weight"] == (2 + 2 * 4, 32) and s1["layers.0.mixer.dt_proj.weight"] == (32, 2)
    assert s1["layers.0.mixer.A_log"] == (32, 4) and s1["lm_head.weight"] == (300, 16)


def test_bad_tensors_are_refused():
    cfg = mamba2(2)
    with pytest.raises(ValueError, match="expected 88 rows, found 121"):
        partition.shard("layers.0.mixer.in_proj.weight", torch.zeros(121, 16), cfg, 2, 0)
    with pytest.raises(ValueError, match="does not split over 3"):
        partition.shard("layers.0.mixer.out_proj.weight", torch.zeros(16, 32), mamba1(), 3, 0)
    with pytest.raises(KeyError, match="no sharding rule"):
        partition.rule_for("layers.0.mixer.x_proj.weight", cfg, 2)
    with pytest.raises(KeyError, match="no sharding rule"):
        partition.rule_for("layers.0.mixer.dt_bias", mamba1(), 2)


def _hybrid(family):
    from hf_models import hybrid_config, zamba_config

    hf = zamba_config(family) if family.startswith("zamba") else hybrid_config(family, pattern="M*-M*")
    return SSMConfig.from_hf(hf.to_dict())


@pytest.mark.parametrize("family,tp", [("nemotron_h", 2), ("falcon_h1", 2), ("zamba", 1), ("zamba", 2), ("zamba", 4),
                                       ("zamba2", 2), ("zamba2", 4)])
def test_hybrid_tensors_merge_back(seed, family, tp):
    """Hybrids (attention, MLP, shared blocks): every tensor's shards glue back to it, shapes agree,
    and the attention and MLP projections are split (no rank holds all of them)."""
    cfg = _hybrid(family)
    g = torch.Generator().manual_seed(seed)
    split = 0
    for name, shape in partition.hf_shapes(cfg).items():
        full = torch.randn(shape, generator=g)
        pieces = [partition.shard(name, full, cfg, tp, r) for r in range(tp)]
        assert [tuple(p.shape) for p in pieces] == [partition.shard_shape(name, shape, cfg, tp, r) for r in range(tp)]
        assert torch.equal(partition.merge(name, pieces, cfg), full), (seed, family, name)
        if any(k in name for k in ("q_proj", "qkv", "o_proj", "up_proj", "down_proj", "gate")) and name.endswith("weight"):
            assert all(p.numel() * tp == full.numel() for p in pieces), (family, name)
            split += 1
    assert split > 0, f"{family}: no attention or MLP projection found in {list(partition.hf_shapes(cfg))[:8]}"


def test_zamba_mamba_heads_that_do_not_divide_are_refused():
    cfg = _hybrid("zamba")  # 2 mamba heads
    name = next(n for n in partition.hf_shapes(cfg) if n.endswith("x_proj_weight") or "x_proj" in n)
    with pytest.raises(ValueError, match="TP degree 3 and 2 mamba heads: one must divide the other"):
        partition.shard(name, torch.zeros(partition.hf_shapes(cfg)[name]), cfg, 3, 0)


@pytest.mark.parametrize("family,bias", [("nemotron_h", False), ("nemotron_h", True), ("falcon_h1", False),
                                         ("falcon_h1", True), ("zamba", False), ("zamba2", False)])
def test_our_tensors_hold_every_hf_parameter(family, bias):
    """Our tensor list (hf_names / hf_shapes) holds exactly the elements of HF's own model: the sum of
    our shapes' sizes equals the sum of HF's parameters' sizes (we fuse q, k, v and gate, up, so the
    counts of tensors differ). With attention_bias / mlp_bias on, the biases are in both."""
    import math

    from hf_models import build_hf_model, fresh_seed, hybrid_config, zamba_config

    hf = zamba_config(family) if family.startswith("zamba") else hybrid_config(family, pattern="M*-M*")
    if bias:
        hf.attention_bias = hf.mlp_bias = True
    cfg = SSMConfig.from_hf(hf.to_dict())
    ours = partition.hf_shapes(cfg)
    assert list(ours) == partition.hf_names(cfg)
    theirs = build_hf_model(hf, fresh_seed())
    assert sum(math.prod(s) for s in ours.values()) == sum(p.numel() for p in theirs.parameters()), family
    if family == "falcon_h1":  # SwiGLU: one fused [gate | up] projection per MLP
        assert any(n.endswith("gate_up_proj.weight") for n in ours) and not any(n.endswith(".up_proj.weight") for n in ours)
        assert bias == any(n.endswith("qkv_proj.bias") for n in ours) == any(n.endswith("o_proj.bias") for n in ours)


def _zamba_tensor(cfg, suffix: str) -> str:
    return next(n for n in partition.hf_shapes(cfg) if n.endswith(suffix))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_zamba_head_channel_shards_by_hand(tp):
    """Zamba's per-head x_proj [heads, R + 2N, head_dim] and dt_proj [heads, head_dim, R], every value
    its global channel (head h, channel c -> h * head_dim + c): rank r holds channels
    [r C / tp, (r + 1) C / tp) of C = heads * head_dim, as whole heads when tp divides the 2 heads
    and as one part of a head ([1, ...]) at TP 4."""
    cfg = _hybrid("zamba")
    heads = cfg.num_heads
    for suffix, axis in (("x_proj_weight", 2), ("dt_proj_weight", 1)):
        name = _zamba_tensor(cfg, suffix)
        shape = partition.hf_shapes(cfg)[name]
        hd = shape[axis]
        index = torch.arange(heads * hd, dtype=torch.float32).reshape(heads, hd)  # [head, channel]
        full = index.reshape(heads, *[hd if d == axis else 1 for d in range(1, len(shape))]).expand(shape).clone()
        per_rank = heads * hd // tp
        for r in range(tp):
            got = partition.shard(name, full, cfg, tp, r)
            pieces = max(1, heads // tp)
            want_channels = torch.arange(r * per_rank, (r + 1) * per_rank, dtype=torch.float32).reshape(pieces, -1)
            want_shape = [pieces] + [per_rank // pieces if d == axis else shape[d] for d in range(1, len(shape))]
            assert list(got.shape) == want_shape, (suffix, tp, r)
            want = want_channels.reshape(pieces, *[per_rank // pieces if d == axis else 1
                                                    for d in range(1, len(shape))]).expand(want_shape)
            assert torch.equal(got, want), (suffix, tp, r)


def test_zamba_in_proj_and_heads_of_the_wrong_size_are_refused():
    cfg = _hybrid("zamba")
    name = _zamba_tensor(cfg, "in_proj.weight")
    rows, cols = partition.hf_shapes(cfg)[name]
    with pytest.raises(ValueError, match=f"^{rows - 1} interleaved rows do not split into 2 segments over 1 ranks$"):
        partition.shard(name, torch.zeros(rows - 1, cols), cfg, 1, 0)
    with pytest.raises(ValueError, match=f"^{rows} interleaved rows do not split into 2 segments over 5 ranks$"):
        partition.shard(name, torch.zeros(rows, cols), cfg, 5, 0)
    x_proj = _zamba_tensor(cfg, "x_proj_weight")
    _, R2N, hd = partition.hf_shapes(cfg)[x_proj]
    with pytest.raises(ValueError, match=rf"^expected 2 mamba heads on dim 0, found shape \(3, {R2N}, {hd}\)$"):
        partition.shard(x_proj, torch.zeros(3, R2N, hd), cfg, 1, 0)


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1"])
def test_hybrid_mlp_and_attention_output_layouts_by_hand(family, seed):
    """With every bias on, at TP 2: up_proj (and each half of gate_up_proj = [gate | up]) and its bias
    split their rows (column-parallel), down_proj and o_proj split their input columns
    (row-parallel), and the row-parallel biases are whole on every rank (added once, after the
    all-reduce); qkv's shards glue back to it."""
    from hf_models import hybrid_config

    hf = hybrid_config(family, pattern="M*-M*")
    hf.attention_bias = hf.mlp_bias = True
    cfg = SSMConfig.from_hf(hf.to_dict())
    g = torch.Generator().manual_seed(seed)
    seen = set()
    for name, shape in partition.hf_shapes(cfg).items():
        kind = name.split(".")[-2] + "." + name.split(".")[-1]
        full = torch.randn(shape, generator=g)
        got = [partition.shard(name, full, cfg, 2, r) for r in range(2)]
        if kind in ("up_proj.weight", "up_proj.bias"):
            want = list(full.chunk(2, dim=0))
        elif kind in ("gate_up_proj.weight", "gate_up_proj.bias"):
            gate, up = full.chunk(2, dim=0)
            want = [torch.cat([gate.chunk(2, 0)[r], up.chunk(2, 0)[r]]) for r in range(2)]
        elif kind in ("down_proj.weight", "o_proj.weight"):
            want = list(full.chunk(2, dim=1))
        elif kind in ("down_proj.bias", "o_proj.bias"):
            want = [full, full]
        elif kind in ("qkv_proj.weight", "qkv_proj.bias"):
            assert all(p.shape[0] * 2 == full.shape[0] for p in got), name
            assert torch.equal(partition.merge(name, got, cfg), full), name
            seen.add(kind)
            continue
        else:
            continue
        seen.add(kind)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (seed, name)
    up = "gate_up_proj" if family == "falcon_h1" else "up_proj"
    want = {f"{up}.weight", f"{up}.bias", "down_proj.weight", "down_proj.bias", "o_proj.weight", "qkv_proj.weight"}
    if family == "falcon_h1":  # HF's Nemotron-H has no attention biases (its attention_bias is not read)
        want |= {"o_proj.bias", "qkv_proj.bias"}
    assert seen == want, seen


def test_names_the_model_does_not_have_are_refused():
    """A tensor name outside the model (a layer past the last, a block part its kind lacks) is a
    KeyError naming it, not a guessed rule: a checkpoint with extra tensors is refused, not sharded."""
    cfg = _hybrid("nemotron_h")  # pattern M*-M*: layer 1 attention, layer 2 MLP
    assert cfg.pattern == "M*-M*"
    for name in (f"layers.{len(cfg.pattern)}.norm.weight", "bogus.weight", "layers.0.bogus.weight",
                 "layers.1.attention.qkv_proj.weight", "layers.2.mixer.in_proj.weight", "layers.0.mixer.up_proj.weight"):
        with pytest.raises(KeyError, match="no sharding rule for tensor"):
            partition.rule_for(name, cfg, 2)
