"""Checkpoints written by Megatron-LM / megatron-core, read and written around one name map.

Two layouts, both under DIR/latest_checkpointed_iteration.txt (an iteration number or `release`):

    legacy `torch`:  DIR/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt  (one file per TP x PP rank;
                     {"model": state dict, "args": argparse.Namespace, "checkpoint_version", ...})
    `torch_dist`:    DIR/iter_0000100/{.metadata, *.distcp, common.pt, metadata.json}  (TP-agnostic:
                     torch.distributed.checkpoint holding global tensors; megatron-core splits in_proj
                     into `in_proj.weight.{z,x,B,C,dt}` and conv1d into `conv1d.{weight,bias}.{x,B,C}`)

The model's shape comes from the checkpoint's own `args`. Tensors are read one at a time and handed
out as full HF-shaped tensors under our names (what `convert` and `load` consume), so a Megatron
checkpoint at any TP/PP degree is resharded to any TP degree, or exported to HF, by the same loop.

Names (megatron-core -> ours; `_extra_state` is ignored, anything else unknown is an error):

    embedding.word_embeddings.weight                  embeddings.weight (vocabulary padding cut)
    decoder.layers.i.mixer.in_proj.layer_norm_weight  layers.i.norm.weight   (TE spec: norm fused)
    decoder.layers.i.norm.weight                      layers.i.norm.weight   (local spec)
    decoder.layers.i.mixer.conv1d.weight              layers.i.mixer.conv1d.weight (0.16 legacy)
    decoder.layers.i.mixer.conv1d_weight              layers.i.mixer.conv1d.weight (0.19 legacy)
    decoder.layers.i.mixer.{in_proj,out_proj}.weight, A_log, D, dt_bias, norm.weight: same names
    decoder.final_norm.weight                         norm_f.weight
    output_layer.weight                               lm_head.weight (untied only)

megatron-core's per-rank split of a Mamba-2 layer is ours when tp divides n_groups (in_proj rows
`[z_r|x_r|B_r|C_r|dt_r]`, conv1d `[x_r|B_r|C_r]`), so `partition.shard/merge` serve both directions.

Our own checkpoints and Megatron (the decision this module rests on): Megatron-LM's loader reads
`latest_checkpointed_iteration.txt`, and when the strict load of `model` fails it retries with
strict=False and only prints, so a file whose names it does not know loads as random weights. Our
native files cannot simply become Megatron's: they must also hold what megatron-core cannot build
(Mamba-1, Falcon-Mamba, n_groups < tp, hybrids) and keep HF names for the one partition table. So
our native checkpoints are made *unloadable* by Megatron instead: their tracker file says
`NATIVE_TRACKER`, which is neither an integer nor `release`, and Megatron's `read_metadata` stops
("ERROR: Invalid metadata file ... Exiting") before touching any weights. Megatron users get real
Megatron checkpoints from `tools/convert_hf.py --to-megatron` (this module's writer). Our reader
accepts both the old `release` tracker and the new one.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import shutil
from pathlib import Path

import torch

from ..config import MAMBA2, NEMOTRON_H, RELU2, ConfigError, SSMConfig
from .atomic import AtomicWriter
from .errors import CheckpointError, check_names
from .integrity import read_manifest, verify_files
from .partition import hf_names, hf_shapes, merge, shard, shard_shape
from .spec import TensorSpec
from .torch_stream import TorchFileWriter, TorchStateFile

TRACKER = "latest_checkpointed_iteration.txt"
RANK_FILE = "model_optim_rng.pt"
DIST_METADATA = ".metadata"
DIST_CONFIG = "metadata.json"  # megatron-core's check_is_distributed_checkpoint looks for it
COMMON = "common.pt"
CHECKPOINT_VERSION = 3.0
FORMATS = ("torch", "torch_dist")
# What our native checkpoints' tracker says (see the module docstring): Megatron exits on it.
NATIVE_TRACKER = "megatron-ssm: not a Megatron-LM checkpoint; export one with tools/convert_hf.py --to-megatron"

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TOP = {"embedding.word_embeddings.weight": "embeddings.weight", "decoder.final_norm.weight": "norm_f.weight",
        "output_layer.weight": "lm_head.weight"}
# per-layer megatron suffix -> ours
_LAYER_IN = {
    "mixer.in_proj.layer_norm_weight": "norm.weight", "norm.weight": "norm.weight",
    "mixer.conv1d_weight": "mixer.conv1d.weight", "mixer.conv1d_bias": "mixer.conv1d.bias",
    **{n: n for n in ("mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log", "mixer.D",
                      "mixer.dt_bias", "mixer.norm.weight", "mixer.out_proj.weight")},
    # attention (*) and MLP (-) layers of hybrid patterns: TransformerLayer / MLPLayer names
    "self_attention.linear_qkv.layer_norm_weight": "norm.weight", "input_layernorm.weight": "norm.weight",
    "self_attention.linear_qkv.weight": "mixer.qkv_proj.weight",
    "self_attention.linear_proj.weight": "mixer.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "norm.weight", "pre_mlp_layernorm.weight": "norm.weight",
    "mlp.linear_fc1.weight": "mixer.up_proj.weight", "mlp.linear_fc2.weight": "mixer.down_proj.weight",
}
# ours -> megatron-core per block kind (the norm's name depends on the block and on the spec)
_LAYER_OUT = {
    "M": {"norm.weight": ("mixer.in_proj.layer_norm_weight", "norm.weight")},
    "*": {"norm.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
          "mixer.qkv_proj.weight": ("self_attention.linear_qkv.weight",) * 2,
          "mixer.o_proj.weight": ("self_attention.linear_proj.weight",) * 2},
    "-": {"norm.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
          "mixer.up_proj.weight": ("mlp.linear_fc1.weight",) * 2,
          "mixer.down_proj.weight": ("mlp.linear_fc2.weight",) * 2},
}
QKV = "mixer.qkv_proj.weight"
# torch_dist: packed tensors stored as one global tensor per segment
_DIST_SEGMENTS = {"mixer.in_proj.weight": ("z", "x", "B", "C", "dt"), "mixer.conv1d.weight": ("x", "B", "C"),
                  "mixer.conv1d.bias": ("x", "B", "C")}
_IGNORED_DIST_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state", "chained_", "optimizer_")


def is_extra_state(name: str) -> bool:
    return "_extra_state" in name


def megatron_name(ours: str, *, te: bool = True, conv: str = "0.19", dist: bool = False, pattern: str = "") -> str:
    """Our tensor name -> megatron-core's. te: the stock TE spec (block norm fused into the next
    linear); conv: the megatron-core version whose legacy conv naming to use (torch_dist keys are
    stable); pattern: the block kinds (default all Mamba)."""
    for meg, our in _TOP.items():
        if ours == our:
            return meg
    m = re.match(r"^layers\.(\d+)\.(.+)$", ours)
    if not m:
        raise KeyError(f"no Megatron name for tensor {ours!r}")
    i, local = m.groups()
    kind = pattern[int(i)] if pattern else "M"
    if local in _LAYER_OUT.get(kind, {}):
        local = _LAYER_OUT[kind][local][0 if te else 1]
    elif kind != "M":
        raise KeyError(f"no Megatron name for tensor {ours!r} of a {kind!r} block")
    elif local in ("mixer.conv1d.weight", "mixer.conv1d.bias") and conv_is_parameter(conv) and not dist:
        local = local.replace("conv1d.", "conv1d_")
    return f"decoder.layers.{i}.{local}"


def conv_is_parameter(version: str) -> bool:
    """megatron-core 0.19 made conv1d's weight/bias MambaMixer parameters (`conv1d_weight`); earlier
    versions keep an nn.Conv1d (`conv1d.weight`). Only legacy files see the difference."""
    try:
        return tuple(int(x) for x in version.split(".")[:2]) >= (0, 19)
    except ValueError:
        raise ValueError(f"not a megatron-core version: {version!r} (e.g. 0.16, 0.19)") from None


def our_layer_name(local: str, where: str) -> str:
    try:
        return _LAYER_IN[local]
    except KeyError:
        raise CheckpointError(f"{where}: tensor {local!r} has no counterpart in our Mamba-2 / attention / MLP "
                              f"layers (known: {', '.join(sorted(_LAYER_IN))})") from None


# ---------------------------------------------------------------------------------------------- args

def _stub(qualname: str):
    """Stands in for a megatron class pickled into `args` (enums such as AttnBackend): loading must
    not import or run Megatron code, and nothing here needs more than the value's name."""

    def make(*values):
        return f"{qualname}({', '.join(map(repr, values))})"

    make.__name__ = qualname.rsplit(".", 1)[-1]
    return make


_NUMPY_OK = {"ndarray", "dtype", "_reconstruct", "scalar"}
# what torch's weights-only unpickler allows by itself (tensors, storages, containers)
_TORCH_SAFE_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.", "_codecs.encode")


class _TorchSafe:
    def __contains__(self, name: str) -> bool:
        return name.startswith(_TORCH_SAFE_PREFIXES)


_TORCH_SAFE = _TorchSafe()


def _pickled_globals(path, where: str) -> set[str]:
    """Every global a torch.save file's pickle names (GLOBAL, and STACK_GLOBAL's two strings),
    read with the standard library's pickletools: nothing is unpickled."""
    import pickletools
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            record = next(n for n in z.namelist() if n.endswith("data.pkl"))
            data = z.read(record)
    except (zipfile.BadZipFile, StopIteration, OSError) as e:
        raise CheckpointError(f"{where} is not a torch.save zip file ({e})") from None
    names, strings, memo, memoized = set(), [], {}, 0
    last = None  # the value the previous op pushed, when it was a string
    for op, arg, _ in pickletools.genops(data):
        pushed = None
        if op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            names.add(".".join(strings[-2:]))
        elif isinstance(arg, str) and ("UNICODE" in op.name or op.name.endswith("STRING")):
            pushed = arg
        elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
            pushed = memo[arg]
        elif op.name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
            index = memoized if op.name == "MEMOIZE" else arg
            memoized += op.name == "MEMOIZE"
            if last is not None:
                memo[index] = last
            pushed = last
        if pushed is not None:
            strings.append(pushed)
        last = pushed
    return names


def _allowed_globals(path, where: str | None = None) -> list:
    """The explicit allowlist for one legacy pickle: argparse.Namespace, numpy's RNG-state types,
    and stand-ins for Megatron's own (enum) types. Anything else stops the load, named."""
    import importlib

    allowed = []
    where = where or str(path)
    for name in sorted(_pickled_globals(path, where)):
        if name in _TORCH_SAFE:
            continue
        module, _, attr = name.rpartition(".")
        if name == "argparse.Namespace":
            allowed.append(argparse.Namespace)
        elif module.split(".")[0] == "numpy" and (attr in _NUMPY_OK or attr.endswith("DType")):
            allowed.append(getattr(importlib.import_module(module), attr))
            if attr == "dtype":  # the dtype's class is built without being named as a global
                import numpy as np

                allowed += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float64, np.uint8)]
        elif module.split(".")[0] in ("megatron", "transformer_engine"):
            allowed.append((_stub(name), name))
        else:
            raise CheckpointError(f"{where} pickles {name}, which is not on the allowlist for Megatron checkpoints "
                                  f"(argparse.Namespace, numpy RNG state, megatron enums); refusing to unpickle it")
    return allowed


def load_pickle(path: Path, key: str | None = None) -> TorchStateFile:
    """A Megatron torch.save file, opened lazily (tensors read on demand) with weights_only and the
    allowlist above."""
    try:
        allowed = _allowed_globals(path)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    with torch.serialization.safe_globals(allowed):
        return TorchStateFile(path, key=key)


def _get(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def config_from_args(args, where: str) -> SSMConfig:
    """Our model description from a Megatron checkpoint's `args` Namespace."""
    if not isinstance(args, argparse.Namespace):
        raise CheckpointError(f"{where}: holds no `args` Namespace (not written by Megatron-LM?)")
    num_layers = int(_get(args, "num_layers", 0))
    pattern = _get(args, "hybrid_layer_pattern") or _get(args, "hybrid_override_pattern") or ""
    layers = pattern.replace("|", "")  # 0.19 marks pipeline stages with |
    if pattern:
        if set(layers) - {"M", "*", "-"}:
            raise ConfigError(f"{where}: hybrid layer pattern {pattern!r} has layers other than Mamba (M), attention "
                              f"(*) and MLP (-): {''.join(sorted(set(layers) - set('M*-')))} are not supported")
        if len(layers) != num_layers:
            raise ConfigError(f"{where}: hybrid pattern {pattern!r} has {len(layers)} layers, num_layers says "
                              f"{num_layers}")
    elif _get(args, "hybrid_attention_ratio", 0.0) or _get(args, "hybrid_mlp_ratio", 0.0):
        raise ConfigError(f"{where}: hybrid_attention_ratio/hybrid_mlp_ratio without a pattern: megatron-core "
                          f"allocates those layers itself; save with --hybrid-override-pattern instead")
    layers = layers or "M" * num_layers
    hybrid = _hybrid_fields(args, layers, where) if set(layers) != {"M"} else {}
    if _get(args, "normalization", "RMSNorm") != "RMSNorm":
        raise ConfigError(f"{where}: normalization {args.normalization!r} (only RMSNorm Mamba stacks exist)")
    hidden = int(args.hidden_size)
    head_dim = int(_get(args, "mamba_head_dim", 64))
    heads = int(_get(args, "mamba_num_heads", 0)) or 2 * hidden // head_dim  # MambaMixer's expand=2
    padded = int(_get(args, "padded_vocab_size", 0))
    vocab = int(_get(args, "vocab_size", 0)) or padded
    if not vocab:
        raise CheckpointError(f"{where}: args hold neither vocab_size nor padded_vocab_size")
    eps = float(_get(args, "norm_epsilon", _get(args, "layernorm_epsilon", 1e-5)))
    if not math.isclose(eps, 1e-5):
        # megatron-core's MambaMixer builds its gated norm with eps=1e-5 whatever the args say, and our
        # config has one eps for both norms: refuse rather than compute a different model.
        raise ConfigError(f"{where}: norm_epsilon {eps} differs from the 1e-5 megatron-core's gated norm uses")
    dtype = "bfloat16" if _get(args, "bf16", False) else "float16" if _get(args, "fp16", False) else "float32"
    cfg = SSMConfig(
        family=NEMOTRON_H if hybrid else MAMBA2, hidden_size=hidden, num_layers=num_layers, vocab_size=vocab,
        intermediate_size=heads * head_dim, state_size=int(_get(args, "mamba_state_dim", 128)), conv_kernel=4,
        use_bias=False, use_conv_bias=True, norm_eps=eps,
        residual_in_fp32=bool(_get(args, "fp32_residual_connection", False)),
        tie_word_embeddings=not _get(args, "untie_embeddings_and_output_weights", False),
        num_heads=heads, head_dim=head_dim, n_groups=int(_get(args, "mamba_num_groups", 8)), chunk_size=128,
        torch_dtype=dtype,
        extra={"megatron": {"padded_vocab_size": padded or vocab,
                            "tokenizer_type": _get(args, "tokenizer_type"),
                            "tokenizer_model": str(_get(args, "tokenizer_model", "")) or None}},
        **hybrid,
    )
    cfg.validate(1)
    return cfg


def _hybrid_fields(args, pattern: str, where: str) -> dict:
    """The attention and MLP fields of a Nemotron-H-style hybrid (megatron-core's `*` and `-` layers)."""
    if _get(args, "position_embedding_type", "none") != "none":
        raise ConfigError(f"{where}: position_embedding_type {args.position_embedding_type!r}: only hybrids without "
                          f"position embeddings (Nemotron-H) are read")
    if _get(args, "add_qkv_bias", False) or _get(args, "add_bias_linear", False):
        raise ConfigError(f"{where}: linear biases (add_bias_linear / add_qkv_bias) are not supported in hybrids")
    fields = {"pattern": pattern}
    if "*" in pattern:
        heads = int(args.num_attention_heads)
        groups = int(_get(args, "num_query_groups", 0)) if _get(args, "group_query_attention", False) else heads
        fields.update(num_attention_heads=heads, num_kv_heads=groups or heads,
                      attention_head_dim=int(_get(args, "kv_channels", 0)) or args.hidden_size // heads)
    if "-" in pattern:
        if _get(args, "swiglu", False) or not _get(args, "squared_relu", False):
            raise ConfigError(f"{where}: MLP layers must use squared ReLU (Nemotron-H; swiglu={_get(args, 'swiglu')}, "
                              f"squared_relu={_get(args, 'squared_relu')})")
        fields.update(mlp_kind=RELU2, mlp_intermediate_size=int(args.ffn_hidden_size))
    return fields


def interleave_qkv(full: torch.Tensor, cfg: SSMConfig) -> torch.Tensor:
    """Ours [q | k | v] -> megatron-core's linear_qkv rows, by query group: [q_g | k_g | v_g] per group."""
    d, groups = cfg.attention_head_dim, cfg.num_kv_heads
    per = cfg.num_attention_heads // groups
    q, k, v = full.split([cfg.num_attention_heads * d, groups * d, groups * d])
    parts = [q.reshape(groups, per * d, -1), k.reshape(groups, d, -1), v.reshape(groups, d, -1)]
    return torch.cat(parts, dim=1).reshape(full.shape)


def deinterleave_qkv(full: torch.Tensor, cfg: SSMConfig) -> torch.Tensor:
    d, groups = cfg.attention_head_dim, cfg.num_kv_heads
    per = cfg.num_attention_heads // groups
    q, k, v = full.reshape(groups, (per + 2) * d, -1).split([per * d, d, d], dim=1)
    return torch.cat([q.reshape(-1, full.shape[1]), k.reshape(-1, full.shape[1]), v.reshape(-1, full.shape[1])])


def args_for(cfg: SSMConfig, tp: int, padded_vocab: int, *, te: bool, ckpt_format: str) -> argparse.Namespace:
    """The `args` a Megatron-LM run of this model would have saved (what its loader and
    check_checkpoint_args read), for `--to-megatron`."""
    meg = cfg.extra.get("megatron", {}) if isinstance(cfg.extra, dict) else {}
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.mlp_intermediate_size or 4 * cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads or cfg.num_heads,
        kv_channels=cfg.attention_head_dim or cfg.head_dim, num_query_groups=cfg.num_kv_heads or None,
        group_query_attention=bool(cfg.num_kv_heads), add_position_embedding=False, position_embedding_type="none",
        max_position_embeddings=4096, seq_length=4096,
        is_hybrid_model=True, hybrid_override_pattern=cfg.pattern,
        squared_relu="-" in cfg.pattern, swiglu=False,
        hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0,
        mamba_state_dim=cfg.state_size, mamba_head_dim=cfg.head_dim, mamba_num_groups=cfg.n_groups,
        mamba_num_heads=cfg.num_heads, normalization="RMSNorm", norm_epsilon=cfg.norm_eps,
        untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
        disable_bias_linear=True, add_bias_linear=False, fp32_residual_connection=cfg.residual_in_fp32,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=128,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, context_parallel_size=1,
        expert_model_parallel_size=1, sequence_parallel=False,
        bf16=cfg.torch_dtype == "bfloat16", fp16=cfg.torch_dtype == "float16",
        params_dtype={"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.torch_dtype, torch.float32),
        transformer_impl="transformer_engine" if te else "local", spec=None,
        tokenizer_type=meg.get("tokenizer_type"), tokenizer_model=meg.get("tokenizer_model"),
        ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format == "torch_dist",
        iteration=0, consumed_train_samples=0, consumed_valid_samples=0,
        data_parallel_random_init=False, phase_transition_iterations=None,
    )


def refuse_unrepresentable(cfg: SSMConfig, tp: int) -> None:
    """Raise ConfigError for what megatron-core's MambaMixer cannot hold, before anything is written."""
    if cfg.family not in (MAMBA2, NEMOTRON_H):
        raise ConfigError(f"megatron-core has no {cfg.family} mixer (Mamba-2 and Nemotron-H-style hybrids only): "
                          f"cannot export a {cfg.family} model to Megatron-LM; keep it in our format or HF")
    if set(cfg.pattern) - set("M*-") or cfg.mamba_norm != "gated" or cfg.multipliers or cfg.ssm_multipliers:
        raise ConfigError(f"pattern {cfg.pattern!r} / this model's variants have no megatron-core layers")
    if "*" in cfg.pattern:
        if cfg.num_kv_heads % tp:
            raise ConfigError(f"megatron-core splits attention by query group: {cfg.num_kv_heads} kv heads at TP {tp} "
                              f"cannot be represented")
        if cfg.attention_bias or cfg.rope_theta is not None:
            raise ConfigError("attention with biases or rotary embeddings is not exported (Nemotron-H has neither)")
    if "-" in cfg.pattern and (cfg.mlp_kind != RELU2 or cfg.mlp_bias):
        raise ConfigError(f"MLP kind {cfg.mlp_kind!r} (bias {cfg.mlp_bias}) is not exported; squared ReLU only")
    if cfg.n_groups % tp:
        raise ConfigError(f"megatron-core needs n_groups % tp == 0 (MambaMixer asserts it); n_groups "
                          f"{cfg.n_groups} at TP {tp} cannot be represented: export at a TP degree dividing "
                          f"{cfg.n_groups}, or run it here, where n_groups < tp is supported")
    if cfg.use_bias or cfg.out_proj_bias:
        raise ConfigError("megatron-core's MambaMixer has no in_proj/out_proj bias (it asserts bias=False)")
    if not math.isclose(cfg.norm_eps, 1e-5):
        raise ConfigError(f"norm eps {cfg.norm_eps}: megatron-core's gated norm always uses 1e-5")
    cfg.validate(tp)


# -------------------------------------------------------------------------------------------- reading

def read_tracker(root: Path) -> str:
    """The iteration directory name the tracker file points at (iter_XXXXXXX or release)."""
    text = (root / TRACKER).read_text().strip()
    if text == "release":
        return "release"
    try:
        return f"iter_{int(text):07d}"
    except ValueError:
        raise CheckpointError(f"{root}/{TRACKER} says {text[:60]!r}: neither an iteration nor 'release'") from None


def is_megatron_lm(root: str | Path) -> bool:
    """True for a directory Megatron-LM wrote, False for ours: ours say NATIVE_TRACKER (or, written
    before it, `release` with our manifest or rank files holding `config`); an iteration number or a
    torch_dist directory is Megatron's. Unreadable rank files count as Megatron's, so that its
    reader is the one that says what is wrong with them."""
    root = Path(root)
    try:
        text = (root / TRACKER).read_text().strip()
    except OSError:
        return False
    if text == NATIVE_TRACKER:
        return False
    try:
        it = root / read_tracker(root)
    except CheckpointError:
        return False
    if text != "release" or (it / DIST_METADATA).is_file():
        return True
    manifest = read_manifest(root)
    if manifest is not None:
        return manifest.get("format") == MegatronLMWriter.format
    if not it.is_dir():
        return False
    ranks = sorted(p for p in it.iterdir() if _RANK_DIR.match(p.name))
    if not ranks or not (ranks[0] / RANK_FILE).is_file():
        return False
    try:
        f = load_pickle(ranks[0] / RANK_FILE)
    except CheckpointError:
        return True
    f.close()
    return not (isinstance(f.obj, dict) and "config" in f.obj)


def _read_common_state(it: Path) -> dict:
    """megatron-core 0.19's `common_state` ShardedObject: torch.save([common dict]) bytes in the dcp."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    key = "common_state/shard_0_1"
    raw: dict[str, bytes] = {}

    class RawBytes(dcp.DefaultLoadPlanner):
        """dcp's own planner would torch.load these bytes with weights_only=False: keep them raw."""

        def load_bytes(self, read_item, value) -> None:
            raw[read_item.dest_index.fqn] = value.read()

    try:
        dcp.load({key: io.BytesIO()}, storage_reader=FileSystemReader(str(it)), planner=RawBytes(), no_dist=True)
        raw = raw[key]
    except Exception as e:
        raise CheckpointError(f"{it}: neither {COMMON} nor a readable {key} (where Megatron keeps args): {e}") from None
    allowed = _allowed_globals(io.BytesIO(raw), where=f"{it}/{key}")
    with torch.serialization.safe_globals(allowed):
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    if not (isinstance(obj, list) and obj and isinstance(obj[0], dict)):
        raise CheckpointError(f"{it}/{key} does not hold megatron-core's common state")
    return obj[0]


class MegatronLMCheckpoint:
    """A Megatron-LM checkpoint read as full HF-shaped tensors under our names (.config, .names(),
    .spec(name), .read(name)), one tensor in memory at a time."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.path = Path(root)
        manifest = read_manifest(self.path)  # one of our exports: check its checksums first
        if verify and manifest is not None:
            verify_files(self.path, sorted(manifest["files"]), manifest)
        self.iteration_dir = self.path / read_tracker(self.path)
        if not self.iteration_dir.is_dir():
            raise CheckpointError(f"{self.path}/{TRACKER} points at {self.iteration_dir.name}, which does not exist")
        self._files: list[TorchStateFile] = []
        try:
            if (self.iteration_dir / DIST_METADATA).is_file():
                self.format = "megatron-lm torch_dist"
                self._open_dist()
            else:
                self.format = "megatron-lm torch"
                self._open_legacy()
        except BaseException:
            self.close()
            raise
        self._check()

    # legacy ------------------------------------------------------------------------------------
    def _open_legacy(self) -> None:
        it = self.iteration_dir
        ranks = {}
        for p in it.iterdir():
            m = _RANK_DIR.match(p.name)
            if m:
                if m.group(3) is not None:
                    raise CheckpointError(f"{p}: expert-parallel checkpoints are not supported (Mamba stacks only)")
                ranks[(int(m.group(1)), int(m.group(2) or 0))] = p / RANK_FILE
        if not ranks:
            raise CheckpointError(f"{it} holds no mp_rank_* directories")
        tp = 1 + max(t for t, _ in ranks)
        pp = 1 + max(p for _, p in ranks)
        for t in range(tp):
            for p in range(pp):
                if (t, p) not in ranks or not ranks[(t, p)].is_file():
                    raise CheckpointError(f"{it} (TP={tp}, PP={pp}) lacks the file of TP rank {t}, PP rank {p}: "
                                          f"{ranks.get((t, p), it / f'mp_rank_{t:02d}_{p:03d}' / RANK_FILE)}")
        self.tp, self.pp = tp, pp
        files = {}
        for key in sorted(ranks):
            f = load_pickle(ranks[key], key="model")
            self._files.append(f)
            files[key] = f
        first = files[(0, 0)].obj
        self.args = first.get("args")
        self.config = config_from_args(self.args, str(ranks[(0, 0)]))
        saved = (_get(self.args, "tensor_model_parallel_size", tp), _get(self.args, "pipeline_model_parallel_size", pp))
        if saved != (tp, pp):
            raise CheckpointError(f"{it}: args say TP={saved[0]}, PP={saved[1]}; the directory holds TP={tp}, PP={pp}")
        if _get(self.args, "virtual_pipeline_model_parallel_size"):
            raise CheckpointError(f"{it}: virtual pipeline stages (model0, model1, ...) are not supported")
        # Pipeline stages number their layers from 0: the global index is the layers of earlier stages + local.
        self._where: dict[str, list[tuple[TorchStateFile, str]]] = {}
        offset = 0
        for p in range(pp):
            local_layers = set()
            for t in range(tp):
                f = files[(t, p)]
                for key in f.obj["model"]:
                    if is_extra_state(key):
                        continue
                    ours = self._our_name(key, offset, str(f.path), local_layers)
                    if ours is None:
                        continue
                    slots = self._where.setdefault(ours, [None] * tp)
                    if slots[t] is None:
                        slots[t] = (f, key)
            offset += len(local_layers)

    def _our_name(self, key: str, offset: int, where: str, local_layers: set) -> str | None:
        if key in _TOP:
            ours = _TOP[key]
            # With tied embeddings and PP>1 the last stage keeps a copy of the embedding as output_layer.
            if ours == "lm_head.weight" and self.config.tie_word_embeddings:
                return None
            return ours
        m = _LAYER.match(key)
        if not m:
            raise CheckpointError(f"{where}: tensor {key!r} has no counterpart in a Mamba-2 model")
        local_layers.add(int(m.group(1)))
        return f"layers.{offset + int(m.group(1))}.{our_layer_name(m.group(2), where)}"

    # torch_dist --------------------------------------------------------------------------------
    def _open_dist(self) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        it = self.iteration_dir
        common = it / COMMON
        if common.is_file():  # megatron-core up to 0.18 (and what we write: every version reads it)
            f = load_pickle(common)
            self._files.append(f)
            self.args = f.obj.get("args")
        else:  # 0.19 keeps the common state as one sharded object inside the checkpoint
            self.args = _read_common_state(it).get("args")
        self.config = config_from_args(self.args, str(common))
        self.tp, self.pp = 1, 1  # torch_dist tensors are global
        try:
            meta = FileSystemReader(str(it)).read_metadata()
        except Exception as e:
            raise CheckpointError(f"cannot read {it / DIST_METADATA}: {e}") from None
        self._dist_meta = {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self._dist_parts: dict[str, list[str]] = {}
        for key in self._dist_meta:
            if is_extra_state(key) or key.startswith(_IGNORED_DIST_PREFIXES):
                continue
            base, seg = key, None
            m = re.match(r"^(.*)\.(z|x|B|C|dt)$", key)
            if m:
                base, seg = m.groups()
            if base in _TOP:
                ours = _TOP[base]
                if ours == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue
            else:
                lm = _LAYER.match(base)
                if not lm:
                    raise CheckpointError(f"{it}: tensor {key!r} has no counterpart in a Mamba-2 model")
                ours = f"layers.{lm.group(1)}.{our_layer_name(lm.group(2), str(it))}"
            local = re.sub(r"^layers\.\d+\.", "", ours)
            want = _DIST_SEGMENTS.get(local)
            if (seg is None) != (want is None) or (seg is not None and seg not in want):
                raise CheckpointError(f"{it}: tensor {key!r} is not split as megatron-core splits {local}")
            self._dist_parts.setdefault(ours, []).append(key)
        for ours, keys in self._dist_parts.items():
            want = _DIST_SEGMENTS.get(re.sub(r"^layers\.\d+\.", "", ours))
            if want:
                found = {k.rsplit(".", 1)[1] for k in keys}
                if found != set(want):
                    raise CheckpointError(f"{it}: {ours} lacks the megatron-core segment(s) "
                                          f"{', '.join(sorted(set(want) - found))}")
                prefix = keys[0].rsplit(".", 1)[0]
                self._dist_parts[ours] = [f"{prefix}.{s}" for s in want]

    def _read_dist(self, key: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        md = self._dist_meta[key]
        out = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
        dcp.load(out, storage_reader=FileSystemReader(str(self.iteration_dir)), no_dist=True)
        return out[key]

    # common ------------------------------------------------------------------------------------
    def _names_found(self) -> list[str]:
        return list(self._dist_parts if self.format.endswith("torch_dist") else self._where)

    def _check(self) -> None:
        cfg, where = self.config, str(self.iteration_dir)
        found = self._names_found()
        expected = hf_names(cfg)
        if not cfg.use_conv_bias:
            expected = [n for n in expected if not n.endswith("conv1d.bias")]
        check_names(found, expected, where)
        if not self.format.endswith("torch_dist"):
            for name, slots in self._where.items():
                missing = [t for t, s in enumerate(slots) if s is None]
                if missing:
                    raise CheckpointError(f"{where}: tensor {name} is missing from TP rank(s) {missing}")
        self._names = expected
        shapes = hf_shapes(cfg)
        self._specs = {}
        for name in expected:
            shape = self._full_shape(name)
            want = shapes[name]
            if name in ("embeddings.weight", "lm_head.weight"):
                if shape[1] != want[1] or shape[0] < want[0]:
                    raise CheckpointError(f"{where}: {name} has shape {shape}, args imply ({want[0]}+ padding, {want[1]})")
                shape = want
            elif shape != want:
                raise CheckpointError(f"{where}: {name} has shape {shape}, its args imply {want}")
            self._specs[name] = TensorSpec(name, shape, self._dtype(name))

    def _full_shape(self, name: str) -> tuple[int, ...]:
        if self.format.endswith("torch_dist"):
            sizes = [tuple(self._dist_meta[k].size) for k in self._dist_parts[name]]
            return (sum(s[0] for s in sizes),) + sizes[0][1:]
        shards = [f.specs[k].shape for f, k in self._where[name]]
        local = re.sub(r"^layers\.\d+\.", "", name)
        if name in ("embeddings.weight", "lm_head.weight"):
            return (sum(s[0] for s in shards),) + shards[0][1:]
        full = hf_shapes(self.config).get(name)
        for r, s in enumerate(shards):
            want = shard_shape(name, full, self.config, self.tp, r)
            if s != want:
                raise CheckpointError(f"{self._where[name][r][0].path}: {local} has shape {s}, TP rank {r} of "
                                      f"TP={self.tp} should hold {want}")
        return full

    def _dtype(self, name: str) -> torch.dtype:
        if self.format.endswith("torch_dist"):
            return self._dist_meta[self._dist_parts[name][0]].properties.dtype
        f, k = self._where[name][0]
        return f.specs[k].dtype

    def names(self) -> list[str]:
        return list(self._names)

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def read(self, name: str) -> torch.Tensor:
        if self.format.endswith("torch_dist"):
            full = torch.cat([self._read_dist(k) for k in self._dist_parts[name]])
            if name.endswith(QKV):
                return deinterleave_qkv(full, self.config)
            return full[: self.config.vocab_size] if name in ("embeddings.weight", "lm_head.weight") else full
        if name.endswith(QKV):  # megatron-core's column split of its query-group-interleaved rows
            return deinterleave_qkv(torch.cat([f.read(k) for f, k in self._where[name]]), self.config)
        return merge(name, [f.read(k) for f, k in self._where[name]], self.config)

    def close(self) -> None:
        for f in self._files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_rank(root: str | Path, rank: int, tp: int, verify: bool = True) -> tuple[SSMConfig, dict[str, torch.Tensor]]:
    """TP rank `rank`'s shard of a Megatron-LM checkpoint for a run of `tp` ranks, whatever TP/PP it
    was saved at (direct load: `--load MEGATRON_DIR`). Each full tensor is read once and cut with
    our partition rules, so memory stays near one tensor plus this rank's shard."""
    with MegatronLMCheckpoint(root, verify) as src:
        cfg = src.config
        try:
            cfg.validate(tp)
        except ConfigError as e:
            raise CheckpointError(f"{root}: cannot run at TP={tp}: {e}") from None
        return cfg, {n: shard(n, src.read(n), cfg, tp, rank) for n in src.names()}


# -------------------------------------------------------------------------------------------- writing

def padded_vocab(cfg: SSMConfig, tp: int) -> int:
    """Megatron's _vocab_size_with_padding: a multiple of make_vocab_size_divisible_by (128) x tp."""
    return cfg.padded_vocab_size(tp)


def _packed_objects_planner():
    from torch.distributed.checkpoint import DefaultSavePlanner

    class Planner(DefaultSavePlanner):
        """Writes BytesIO values as they are, as megatron-core's planner does (its sharded objects
        are already torch.save'd lists); the default planner would torch.save the BytesIO again."""

        def transform_object(self, write_item, object):
            return object if isinstance(object, io.BytesIO) else super().transform_object(write_item, object)

    return Planner


def _PackedObjectsPlanner():
    return _packed_objects_planner()()


class MegatronLMWriter(AtomicWriter):
    format = "megatron-lm"  # in our manifest (checksums) beside Megatron's files; Megatron ignores it

    """Writes a release checkpoint Megatron-LM loads: `torch` (one file per TP rank, TE-spec names)
    or `torch_dist` (global tensors, megatron-core's z/x/B/C/dt split). Tensors arrive one at a time
    (`write(our_name, full)`); torch_dist stages each in a file-backed tensor so memory stays small."""

    def __init__(self, target: str | Path, cfg: SSMConfig, tp: int, specs: list[TensorSpec], *,
                 ckpt_format: str = "torch_dist", te: bool = True, conv: str = "0.19", force: bool = False):
        if ckpt_format not in FORMATS:
            raise ValueError(f"--ckpt-format must be one of {FORMATS}, got {ckpt_format!r}")
        refuse_unrepresentable(cfg, tp)
        super().__init__(target, force)
        self.cfg, self.tp, self.specs, self.fmt, self.te, self.conv = cfg, tp, specs, ckpt_format, te, conv
        self.padded = padded_vocab(cfg, tp)
        self.args = args_for(cfg, tp, self.padded, te=te, ckpt_format=ckpt_format)

    def _name(self, ours: str, dist: bool = False) -> str:
        return megatron_name(ours, te=self.te, conv=self.conv, dist=dist, pattern=self.cfg.pattern)

    def _shard(self, name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
        """Rank `rank`'s rows as megatron-core's parallel linears hold them: our partition rules,
        except attention's qkv, which megatron-core interleaves by query group before its column split."""
        if name.endswith(QKV):
            return interleave_qkv(full, self.cfg).chunk(self.tp)[rank].contiguous()
        return shard(name, full, self.cfg, self.tp, rank)

    def _linear_modules(self) -> list[str]:
        """megatron-core's parallel linears, whose (empty) extra state its loaders expect."""
        per_kind = {"M": ("mixer.in_proj", "mixer.out_proj"),
                    "*": ("self_attention.linear_qkv", "self_attention.linear_proj"),
                    "-": ("mlp.linear_fc1", "mlp.linear_fc2")}
        mods = [f"decoder.layers.{i}.{m}" for i, k in enumerate(self.cfg.pattern) for m in per_kind[k]]
        return mods + ([] if self.cfg.tie_word_embeddings else ["output_layer"])

    def _full_spec(self, s: TensorSpec) -> TensorSpec:
        if s.name in ("embeddings.weight", "lm_head.weight"):
            return TensorSpec(s.name, (self.padded,) + s.shape[1:], s.dtype)
        return s

    def __enter__(self):
        super().__enter__()
        self.dir = self.tmp / "release"
        self.dir.mkdir()
        header = {"args": self.args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
        if self.fmt == "torch":
            self._writers = []
            extra = [f"{m}._extra_state" for m in self._linear_modules()] if self.te else []
            for r in range(self.tp):
                specs = [TensorSpec(self._name(s.name),
                                    shard_shape(s.name, self._full_spec(s).shape, self.cfg, self.tp, r), s.dtype)
                         for s in self.specs]
                path = self.dir / f"mp_rank_{r:02d}" / RANK_FILE
                path.parent.mkdir()
                # TE modules restore nothing from a None extra state (their FP8 metadata starts fresh).
                self._writers.append(TorchFileWriter(
                    path, specs, lambda state: {"model": {**state, **dict.fromkeys(extra)}, **header,
                                                "rng_state": [], "opt_param_scheduler": None}))
        else:
            self._stage = self.tmp / ".staging"
            self._stage.mkdir()
            self._staged: dict[str, torch.Tensor | io.BytesIO] = {}
            # megatron-core saves every parallel linear's (empty, for local ones) extra state as a
            # sharded object, and a strict load asks for it: write what an unused one holds.
            for m in self._linear_modules():
                buf = io.BytesIO()
                torch.save([None], buf)
                buf.seek(0)
                self._staged[f"{m}._extra_state/shard_0_1"] = buf
            torch.save(header, self.dir / COMMON)
            (self.dir / DIST_CONFIG).write_text(json.dumps(
                {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                 "common_backend_version": 1}))
        return self

    def write(self, name: str, full: torch.Tensor) -> None:
        if self.fmt == "torch":
            for r, w in enumerate(self._writers):
                w.write(self._name(name), self._shard(name, full, r))
            return
        key = self._name(name, dist=True)
        if name.endswith(QKV):
            full = interleave_qkv(full, self.cfg)
        if name in ("embeddings.weight", "lm_head.weight") and full.shape[0] < self.padded:
            full = torch.cat([full, full.new_zeros(self.padded - full.shape[0], *full.shape[1:])])
        local = re.sub(r"^layers\.\d+\.", "", name)
        segments = _DIST_SEGMENTS.get(local)
        if segments:
            I, bc, H = self.cfg.intermediate_size, self.cfg.n_groups * self.cfg.state_size, self.cfg.num_heads
            sizes = {"z": I, "x": I, "B": bc, "C": bc, "dt": H}
            parts = full.split([sizes[s] for s in segments])
            for s, part in zip(segments, parts):
                self._stage_tensor(f"{key}.{s}", part)
        else:
            self._stage_tensor(key, full)

    def _stage_tensor(self, key: str, t: torch.Tensor) -> None:
        """Keep the tensor on disk (a file-backed tensor), not in memory, until the single dcp.save."""
        path = self._stage / f"{len(self._staged)}.bin"
        staged = torch.from_file(str(path), shared=True, size=max(1, t.numel()), dtype=t.dtype)[: t.numel()]
        staged = staged.view(t.shape)
        staged.copy_(t)
        self._staged[key] = staged

    def _finish(self) -> None:
        if self.fmt == "torch":
            for w in self._writers:
                w.close()
        else:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint import FileSystemWriter

            dcp.save(self._staged, storage_writer=FileSystemWriter(str(self.dir), single_file_per_rank=True),
                     planner=_PackedObjectsPlanner(), no_dist=True)
            self._staged.clear()
            shutil.rmtree(self._stage)
        (self.tmp / TRACKER).write_text("release")

    def _discard(self) -> None:
        if self.fmt != "torch":
            self._staged = {}



def export(src, save_dir: str | Path, tp: int, specs: list[TensorSpec], *, ckpt_format: str = "torch_dist",
           te: bool = True, conv: str | None = None, force: bool = False, progress=None) -> None:
    """Write source `src` (any reader of full tensors) as a Megatron-LM checkpoint at TP=`tp`."""
    conv = conv or installed_megatron_core()
    cfg = src.config
    with MegatronLMWriter(save_dir, cfg, tp, specs, ckpt_format=ckpt_format, te=te, conv=conv, force=force) as w:
        for s in specs:
            w.write(s.name, src.read(s.name).to(s.dtype))
            if progress:
                progress(s)
        w.copy_tokenizer(src.path)


def installed_megatron_core() -> str:
    """'0.16' or '0.19' style version of the megatron-core here (it decides the legacy conv names)."""
    try:
        from megatron.core import package_info

        major, minor = package_info.__version__.split(".")[:2]
        return f"{major}.{minor}"
    except Exception:
        return "0.19"
