#!/usr/bin/env python3
"""Write tests/fixtures/megatron/: checkpoints made by megatron-core's OWN Mamba-2 model, with its logits.

megatron-core's MambaMixer needs CUDA and mamba-ssm's Triton kernels, so this runs on the GPU machine
(megatron-core 0.19.2, mamba-ssm installed without its CUDA extension, no TE, no causal_conv1d):

    python tools/make_megatron_fixtures.py --out tests/fixtures/megatron [--check]

It builds megatron-core's HybridModel (MambaModel on 0.16) from a TE-free spec of megatron-core's own
modules (MambaLayer + MambaMixer with local ColumnParallelLinear/RowParallelLinear, torch RMSNorm
norms; n_groups=1, `use_mamba_mem_eff_path=False`), perturbs every weight, and saves

    legacy/      latest_checkpointed_iteration.txt ("10") + iter_0000010/mp_rank_00/model_optim_rng.pt,
                 as Megatron-LM's training loop saves it (args Namespace with an enum, numpy RNG state)
    torch_dist/  the same weights through megatron-core's dist_checkpointing.save
    reference.pt prompt ids, megatron-core's logits for them and its greedy continuation

--check then reads both with our importer, runs our model on the GPU, exports ours back to Megatron
(torch_dist and legacy) and loads those into a fresh megatron-core model, printing every comparison.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch

ITERATION = 10
SHAPE = dict(hidden_size=32, num_layers=3, mamba_state_dim=16, mamba_head_dim=16, mamba_num_groups=1,
             vocab=256, tied=False, pattern="MMM")
# Nemotron-H's layout: Mamba, attention (4 query heads in 2 groups of kv_channels 8), squared-ReLU MLP
HYBRID = dict(SHAPE, num_layers=4, pattern="M*-M", num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48)
PROMPT = [3, 17, 91, 200, 5, 64, 12, 250, 33, 7]
NEW_TOKENS = 8


def prepare_mamba_ssm() -> None:
    """mamba-ssm's package __init__ imports its CUDA extension (selective_scan_cuda), absent here:
    a stub module stands in for it and the Triton submodules MambaMixer imports run as they are."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        import mamba_ssm  # noqa: F401
    except Exception:  # its __init__ pulls in more compiled pieces: load the package bare instead
        spec = importlib.util.find_spec("mamba_ssm")
        bare = importlib.util.module_from_spec(spec)
        sys.modules["mamba_ssm"] = bare


def init_megatron(seed: int) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free one: pytest-xdist runs several of these side by side
        from megatron_ssm.parallel import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        torch.cuda.set_device(0)
        dist.init_process_group("nccl")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def local_stack_spec():
    """megatron-core's own layers without TE: its MambaMixer, SelfAttention (local DotProductAttention)
    and MLP with local parallel linears, torch norms (unfused: input_layernorm, pre_mlp_layernorm)."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    from megatron_ssm.megatron.stack import StackSubmodules, TorchNormStack

    mamba = ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
        norm=WrappedTorchNorm,
        mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
            in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
        mamba_bda=get_bias_dropout_add))
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=WrappedTorchNorm,
        self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                  submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear,
                                                                     core_attention=DotProductAttention,
                                                                     linear_proj=RowParallelLinear)),
        self_attn_bda=get_bias_dropout_add))
    mlp = ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=WrappedTorchNorm,
        mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                            linear_fc2=RowParallelLinear)),
        mlp_bda=get_bias_dropout_add))
    return ModuleSpec(module=TorchNormStack, submodules=StackSubmodules(mamba_layer=mamba, attention_layer=attention,
                                                                        mlp_layer=mlp))


def transformer_config(shape=SHAPE):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer import TransformerConfig

    hybrid = {}
    if "num_query_groups" in shape:
        hybrid = dict(num_query_groups=shape["num_query_groups"], ffn_hidden_size=shape["ffn_hidden_size"],
                      activation_func=squared_relu, gated_linear_unit=False, kv_channels=8)
    return TransformerConfig(
        **hybrid,
        num_layers=shape["num_layers"], hidden_size=shape["hidden_size"], num_attention_heads=4,
        mamba_state_dim=shape["mamba_state_dim"], mamba_head_dim=shape["mamba_head_dim"],
        mamba_num_groups=shape["mamba_num_groups"], normalization="RMSNorm", layernorm_epsilon=1e-5,
        use_mamba_mem_eff_path=False, hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False,
        bias_dropout_fusion=False, params_dtype=torch.float32, is_hybrid_model=True)


def build_megatron_model(seed: int, shape=SHAPE, perturb: bool = True):
    from megatron_ssm.megatron.stack import build_model

    torch.manual_seed(seed)
    model = build_model(transformer_config(shape), local_stack_spec(), vocab_size=shape["vocab"],
                        pattern=shape["pattern"], tied=shape["tied"]).cuda().eval()
    if perturb:  # no constant weights (all-ones norms would hide a mis-mapped norm)
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))
    return model


def megatron_args(shape=SHAPE) -> argparse.Namespace:
    """What Megatron-LM's argument parser would have saved for this model (the fields we read, a few
    we do not, and an enum as Megatron-LM really pickles them)."""
    from megatron.core.transformer.enums import AttnBackend

    hybrid = "num_query_groups" in shape
    return argparse.Namespace(
        num_layers=shape["num_layers"], hidden_size=shape["hidden_size"],
        ffn_hidden_size=shape.get("ffn_hidden_size", 4 * shape["hidden_size"]), num_attention_heads=4,
        num_query_groups=shape.get("num_query_groups"), group_query_attention=hybrid, kv_channels=8,
        squared_relu=hybrid, swiglu=False, add_bias_linear=False, is_hybrid_model=True,
        hybrid_override_pattern=shape["pattern"], hybrid_layer_pattern=shape["pattern"],
        mamba_state_dim=shape["mamba_state_dim"], mamba_head_dim=shape["mamba_head_dim"],
        mamba_num_groups=shape["mamba_num_groups"], mamba_num_heads=None, normalization="RMSNorm",
        norm_epsilon=1e-5, untie_embeddings_and_output_weights=not shape["tied"], vocab_size=None,
        padded_vocab_size=shape["vocab"], make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, bf16=False, fp16=False, params_dtype=torch.float32,
        position_embedding_type="none", tokenizer_type="NullTokenizer", spec=None, seq_length=64,
        max_position_embeddings=64, attention_backend=AttnBackend.auto, ckpt_format="torch",
        fp32_residual_connection=False, iteration=ITERATION)


def megatron_logits(model, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids], device="cuda")
    with torch.no_grad():
        return model(x, position_ids=None, attention_mask=None).float()[0]


def megatron_greedy(model, prompt: list[int], n: int) -> list[int]:
    """megatron-core's own model, greedy, each step recomputing the whole sequence (no cache to trust)."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(megatron_logits(model, ids)[-1].argmax()))
    return ids[len(prompt):]


def save_legacy(model, args, root: Path) -> None:
    """As megatron/training/checkpointing.py saves a `torch` checkpoint at TP=1, PP=1."""
    from megatron.core import tensor_parallel

    path = root / f"iter_{ITERATION:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    rng = [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.cuda.get_rng_state(),
            "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}]
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
             "model": model.state_dict_for_save_checkpoint(), "rng_state": rng,
             "num_floating_point_operations_so_far": 0}
    torch.save(state, path)
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def save_torch_dist(model, args, root: Path) -> None:
    from megatron.core import dist_checkpointing

    it = root / f"iter_{ITERATION:07d}"
    it.mkdir(parents=True)
    args = argparse.Namespace(**{**vars(args), "ckpt_format": "torch_dist"})
    dist_checkpointing.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                             "model": model.sharded_state_dict()}, str(it))
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def load_torch_dist(model, it: Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.transformer.enums import AttnBackend

    # megatron-core reads the common state with weights_only: Megatron-LM allowlists its args first
    with torch.serialization.safe_globals([argparse.Namespace, AttnBackend]):
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(it))
    model.load_state_dict(loaded["model"], strict=True)


def ours_logits(ckpt_dir: Path, ids: list[int], vocab: int = SHAPE["vocab"]) -> torch.Tensor:
    """Our model from a Megatron checkpoint (converted to ours at TP=1 in a temporary directory)."""
    import tempfile

    from megatron_ssm.checkpoint.convert import convert
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    with tempfile.TemporaryDirectory() as tmp:
        convert(ckpt_dir, Path(tmp) / "ours", 1, progress=False)
        model = load_model(Path(tmp) / "ours", tp_context(torch.device("cuda")))
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda"))[0, :, :vocab].float()


def _attempt(report: dict, key: str, fn) -> None:
    """One comparison; a failure is recorded (with its message), not fatal to the others."""
    import traceback

    try:
        report[key] = fn()
    except Exception as e:  # noqa: BLE001 - reported in the summary
        report[key] = f"FAILED: {e!r}"
        traceback.print_exc()


def check(out: Path, ref: dict, seed: int) -> dict:
    """Our importer and exporter against megatron-core's own model, on this GPU."""
    import tempfile

    from megatron_ssm.checkpoint.convert import convert, source_specs
    from megatron_ssm.checkpoint.formats import open_checkpoint
    from megatron_ssm.checkpoint.megatron_lm import export

    report = {}

    def ours_vs_megatron(path, reference):
        logits = ours_logits(path, reference["prompt"], reference["shape"]["vocab"]).cpu()
        return {"max_abs_diff": float((logits - reference["logits"]).abs().max()),
                "argmax_equal": bool((logits.argmax(-1) == reference["logits"].argmax(-1)).all())}

    for fmt in ("legacy", "torch_dist"):
        _attempt(report, f"ours_from_megatron_{fmt}", lambda fmt=fmt: ours_vs_megatron(out / fmt, ref))
    tmp = Path(tempfile.mkdtemp())

    def dist_roundtrip():
        convert(out / "legacy", tmp / "ours", 1, progress=False)
        convert(tmp / "ours", tmp / "meg_dist", 1, to_megatron=True, ckpt_format="torch_dist",
                megatron_spec="local", progress=False)
        fresh = build_megatron_model(seed + 1)
        load_torch_dist(fresh, tmp / "meg_dist" / "release")
        return float((megatron_logits(fresh, PROMPT).cpu() - ref["logits"]).abs().max())

    def legacy_roundtrip():
        with open_checkpoint(tmp / "ours") as src:
            export(src, tmp / "meg_legacy", 1, source_specs(src, src.config), ckpt_format="torch", te=False)
        fresh = build_megatron_model(seed + 2)
        blob = torch.load(tmp / "meg_legacy" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
        result = fresh.load_state_dict(blob["model"], strict=True)
        return {"strict_load": str(result),
                "max_abs_diff": float((megatron_logits(fresh, PROMPT).cpu() - ref["logits"]).abs().max())}

    _attempt(report, "megatron_loads_our_torch_dist", dist_roundtrip)
    _attempt(report, "megatron_loads_our_legacy_strict", legacy_roundtrip)
    if (out / "hybrid_legacy").is_dir():
        href = torch.load(out / "reference_hybrid.pt", weights_only=False)
        _attempt(report, "ours_from_megatron_hybrid_legacy", lambda: ours_vs_megatron(out / "hybrid_legacy", href))
        _attempt(report, "ours_from_megatron_hybrid_torch_dist",
                 lambda: ours_vs_megatron(out / "hybrid_torch_dist", href))
    return report


def write_fixture(model, shape, out: Path, prefix: str, reference_name: str, extra: dict) -> dict:
    margs = megatron_args(shape)
    save_legacy(model, margs, out / f"{prefix}legacy")
    save_torch_dist(model, margs, out / f"{prefix}torch_dist")
    import megatron.core

    ref = {"prompt": PROMPT, "logits": megatron_logits(model, PROMPT).cpu(),
           "greedy": megatron_greedy(model, PROMPT, NEW_TOKENS), "megatron_core": str(megatron.core.__version__),
           "torch": str(torch.__version__), "shape": shape,
           "state_dict_keys": sorted(k for k in model.state_dict() if "_extra_state" not in k), **extra}
    torch.save(ref, out / reference_name)
    return {k: v for k, v in ref.items() if k != "logits"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/megatron"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--check", action="store_true", help="also compare our importer/exporter on this GPU")
    args = ap.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    prepare_mamba_ssm()
    init_megatron(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"mamba2": write_fixture(build_megatron_model(args.seed), SHAPE, args.out, "", "reference.pt",
                                       {"seed": args.seed})}
    try:  # the hybrid is an addition: its failure must not cost the Mamba-2 fixture
        hybrid = build_megatron_model(args.seed + 10, HYBRID)
        summary["hybrid"] = write_fixture(hybrid, HYBRID, args.out, "hybrid_", "reference_hybrid.pt",
                                          {"seed": args.seed + 10})
    except Exception as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        summary["hybrid"] = f"FAILED: {e!r}"
    if args.check:
        summary["check"] = check(args.out, torch.load(args.out / "reference.pt", weights_only=False), args.seed)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
