"""Tiny random HF models (built here, never downloaded) and helpers to compare against them."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path

import torch

# transformers (5.x) binds its SSM models to mamba-ssm's kernels when that package imports, whatever
# the device: where mamba-ssm is installed (the GPU machine), the HF reference would run mamba-ssm's
# Triton kernels on CPU tensors, or its CUDA extension, which is not built there. The reference is HF's
# own torch code, so its modeling modules are imported (or re-imported) here with mamba-ssm hidden.
HF_SSM_MODELING = ["mamba.modeling_mamba", "falcon_mamba.modeling_falcon_mamba", "mamba2.modeling_mamba2",
                   "nemotron_h.modeling_nemotron_h", "zamba.modeling_zamba", "zamba2.modeling_zamba2",
                   "falcon_h1.modeling_falcon_h1"]
KERNEL_PACKAGES = ("mamba_ssm", "causal_conv1d")


def import_hf_modeling_without_kernels() -> list[str]:
    """Import HF's SSM modeling modules with the kernel packages unimportable; returns the modules
    (re)imported. A no-op where no kernel package is installed (CI)."""
    if not any(importlib.util.find_spec(p) is not None for p in KERNEL_PACKAGES):
        return []
    saved = {p: sys.modules.get(p) for p in KERNEL_PACKAGES}
    done = []
    try:
        for p in KERNEL_PACKAGES:
            sys.modules[p] = None  # import_module(p) now raises ImportError
        for name in HF_SSM_MODELING:
            full = f"transformers.models.{name}"
            try:
                earlier = sys.modules.get(full)
                if earlier is not None and getattr(earlier, "_megatron_ssm_torch_only", False):
                    continue
                # imported earlier with the kernels visible: import it again without them
                module = importlib.reload(earlier) if earlier is not None else importlib.import_module(full)
            except ImportError:
                continue  # a transformers without this family
            module._megatron_ssm_torch_only = True
            done.append(full)
    finally:
        for p, m in saved.items():
            if m is None:
                sys.modules.pop(p, None)
            else:
                sys.modules[p] = m
    return done


import_hf_modeling_without_kernels()

SEED_ENV = "MEGATRON_SSM_TEST_SEED"
# Every seed drawn, with the test and phase that drew it (pytest's PYTEST_CURRENT_TEST, e.g.
# "tests/test_ops.py::test_x[a] (call)"); conftest.py prints a failing test's seeds under its report.
DRAWN: list[tuple[str, int, bool]] = []


def scaled_max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x - y| over max(1, max |y|) where y is finite: relative to the tensor's own scale (a tiny
    random Zamba2's conv states reach 3-4, where fp32 in a packed scan's summation order differs by
    1e-5 to 1e-4). The non-finite places (a padded vocabulary's -inf) must match (else inf); a rank's
    logits slice that is all padding (TP 4 and up) differs by 0."""
    x, y = x.double(), y.double()
    finite = torch.isfinite(y)
    if not torch.equal(torch.isfinite(x), finite):
        return math.inf
    if not finite.any():
        return 0.0
    x, y = x[finite], y[finite]
    return (x - y).abs().max().item() / max(1.0, y.abs().max().item())


def fresh_seed(per_test: bool = False) -> int:
    """A new seed every run, so tests see new inputs. A failing test's report lists the seeds it drew
    (and those its module's fixtures drew); MEGATRON_SSM_TEST_SEED=N makes every draw N, which replays
    a test that draws one seed. per_test: drawn for one test only (the `seed` fixture), so never
    listed under another test's report."""
    fixed = os.environ.get(SEED_ENV)
    seed = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    DRAWN.append((os.environ.get("PYTEST_CURRENT_TEST", ""), seed, per_test))
    return seed


def seeds_drawn_for(nodeid: str) -> list[str]:
    """The seeds drawn by this test (setup and call), then those drawn while setting up earlier
    tests of its module (module-scoped fixtures: models, checkpoints)."""
    module = nodeid.split("::")[0]
    mine = [f"{who.rsplit(' ', 1)[-1]} {s}" for who, s, _ in DRAWN if who.startswith(nodeid + " ")]
    fixtures = [f"{who} {s}" for who, s, per_test in DRAWN if who.split("::")[0] == module and not per_test
                and who.endswith("(setup)") and not who.startswith(nodeid + " ")]
    return mine + [f"fixture, drawn in {f}" for f in fixtures]


def hf_config(family: str, *, n_groups: int = 1, tied: bool = True, use_bias: bool = False, vocab: int = 250,
              layers: int = 2):
    from transformers import FalconMambaConfig, Mamba2Config, MambaConfig

    common = dict(vocab_size=vocab, num_hidden_layers=layers, tie_word_embeddings=tied, use_bias=use_bias,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "mamba2":
        return Mamba2Config(hidden_size=64, expand=2, num_heads=8, head_dim=16, state_size=16, n_groups=n_groups,
                            chunk_size=16, **common)
    cls = FalconMambaConfig if family == "falcon_mamba" else MambaConfig
    return cls(hidden_size=64, expand=2, state_size=8, **common)


def hybrid_config(family: str, *, pattern: str = "M*-M", heads: int = 4, kv_heads: int = 2, n_groups: int = 2,
                  tied: bool = False, vocab: int = 250, layers: int = 2, mamba_norm: bool = True,
                  multipliers: bool = True):
    """A tiny Nemotron-H (layers from `pattern`) or Falcon-H1 (`layers` parallel layers) config."""
    from transformers import FalconH1Config, NemotronHConfig

    common = dict(vocab_size=vocab, hidden_size=64, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=16, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "nemotron_h":
        kinds = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
        return NemotronHConfig(layers_block_type=[kinds[k] for k in pattern], intermediate_size=96,
                               mamba_num_heads=8, mamba_head_dim=16, n_groups=n_groups, ssm_state_size=16,
                               chunk_size=16, **common)
    extra = {}
    if multipliers:  # muP multipliers away from 1, so a missing or misplaced one shows
        extra = dict(embedding_multiplier=1.3, lm_head_multiplier=0.7, attention_in_multiplier=0.9,
                     attention_out_multiplier=1.2, key_multiplier=0.8, ssm_in_multiplier=1.1,
                     ssm_out_multiplier=0.6, mlp_multipliers=[1.4, 0.75],
                     ssm_multipliers=[0.9, 1.2, 0.7, 1.3, 0.8])
    return FalconH1Config(intermediate_size=96, num_hidden_layers=layers, mamba_d_ssm=128, mamba_n_heads=8,
                          mamba_d_head=16, mamba_n_groups=n_groups, mamba_d_state=16, mamba_chunk_size=16,
                          mamba_rms_norm=mamba_norm, mamba_norm_before_gate=False,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0}, **common, **extra)


def build_hf_model(config, seed: int):
    """An HF model with random weights, every parameter perturbed so that none is a constant
    (all-ones norm weights would hide a mis-sharded norm)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    return model


def per_group_gated_norm(model, groups: int | None = None) -> None:
    """Replace the gated RMSNorm of every Mamba-2 mixer of an HF model by one written here from
    mamba-ssm's definition: y * silu(gate), normalised over each group of d_inner / n_groups channels.
    transformers before 5.2x normalised over all groups at once; with this patch the HF model is a
    reference at every transformers version (on newer ones it changes nothing, which
    test_model_vs_hf checks). `groups` overrides the mixers' n_groups (1: the old whole-width norm)."""
    import types

    import torch.nn.functional as F

    def forward(norm, hidden_states, gate=None, *, n_groups):
        dtype = hidden_states.dtype
        h = hidden_states.float()
        if gate is not None:
            h = h * F.silu(gate.float())
        g = h.unflatten(-1, (n_groups, -1))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * g.flatten(-2).to(dtype)

    for layer in model.backbone.layers:
        mixer = layer.mixer
        mixer.norm.forward = types.MethodType(lambda self, h, gate=None, _n=groups or mixer.n_groups: forward(
            self, h, gate, n_groups=_n), mixer.norm)


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits.float()


def assert_hf_round_trip(model, hf: Path, back: Path, dtype: torch.dtype, low_id: int = 0) -> None:
    """`back` (converted from `hf`, `model`'s save, through our layouts and back to HF) holds the
    same tensors bit for bit, the same config, and loads in transformers to the same logits."""
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_ssm.config import SSMConfig

    original, again_tensors = load_file(hf / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(again_tensors) == sorted(original)
    for k in original:
        assert again_tensors[k].dtype == original[k].dtype and torch.equal(again_tensors[k], original[k]), k
    assert SSMConfig.from_hf(json.loads((back / "config.json").read_text())) == \
        SSMConfig.from_hf(json.loads((hf / "config.json").read_text()))
    again, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(low_id, 250, (1, 9))
    assert torch.equal(hf_logits(again.to(dtype).eval(), ids), hf_logits(model, ids))


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def zamba_config(family: str, *, kv_heads: int = 4, mem_blocks: int = 2, attention_adapters: bool = True,
                 rope: bool = True, n_groups: int = 2, tied: bool = True, vocab: int = 250):
    """Tiny Zamba ('zamba': Mamba-1 with 2 mamba heads, one shared block) or Zamba2 ('zamba2': Mamba-2,
    `mem_blocks` shared blocks with LoRA adapters) with hidden 64, 4 attention heads of 32 channels
    (head_dim = 2 * hidden / heads), and at least two applications of every shared block."""
    common = dict(vocab_size=vocab, hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads,
                  intermediate_size=96, tie_word_embeddings=tied, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=256)
    if family == "zamba":
        from transformers import ZambaConfig

        return ZambaConfig(num_hidden_layers=5, n_mamba_heads=2, mamba_d_state=8,
                           layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid"], **common)
    from transformers import Zamba2Config

    return Zamba2Config(num_hidden_layers=6, n_mamba_heads=8, mamba_d_state=16, mamba_ngroups=n_groups,
                        chunk_size=16, num_mem_blocks=mem_blocks, use_shared_attention_adapter=attention_adapters,
                        adapter_rank=8, use_mem_rope=rope,
                        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "hybrid", "hybrid"], **common)


def hf_forward_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens by full forwards without any cache: the reference where HF's own cached decode
    differs from its prefill (Zamba2's decode skips the dt clamp its prefill applies)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids[0, len(prompt):].tolist()


def build_varied_hf_model(config, seed: int):
    """As build_hf_model, with every matrix redrawn at std 1/sqrt(fan_in), embeddings at std 0.1 and
    zero biases made nonzero, so that a tiny model's greedy tokens vary instead of repeating one token
    (which would let a wrong decode path pass a token comparison)."""
    model = build_hf_model(config, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() >= 2 and ("proj" in name or "conv1d" in name) or name.endswith("linear.weight") \
                    or "adapter" in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif not p.any():  # zero-initialised biases: a multiplicative perturbation leaves them zero
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def converted_models(tmp_path_factory, config_for, build=None, tps=(1, 2, 4)):
    """get(family, opts) -> (hf model, hf dir, {tp: our checkpoint dir}, seed), each case built once
    per module: an HF model from `config_for(family, **opts)` with fresh random weights (`build`,
    default build_hf_model), saved, and converted at every TP degree in `tps`."""
    from megatron_ssm.checkpoint.convert import convert

    build = build or build_hf_model
    built = {}

    def get(family, opts):
        key = (family, tuple(sorted(opts.items())))
        if key not in built:
            seed = fresh_seed()
            root = tmp_path_factory.mktemp(family)
            model = build(config_for(family, **opts), seed)
            hf_dir = save_hf(model, root / "hf")
            ckpts = {}
            for tp in tps:
                ckpts[tp] = str(root / f"tp{tp}")
                convert(hf_dir, ckpts[tp], tp, progress=False)
            built[key] = (model, hf_dir, ckpts, seed)
        return built[key]

    return get
