"""megatron-core's own MambaModel/HybridModel built from our ModuleSpecs (megatron_ssm.megatron.specs):
the same logits as our MambaLM and HF at TP 1/2/4, gradients equal to HF's at TP 2 for every family,
megatron-core's parameter attributes, and torch_dist files through megatron-core's own loader."""
from __future__ import annotations

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, hf_logits, save_hf
from megatron_ssm.checkpoint.convert import convert

TOL = 1e-4


def megatron_model(family: str, cfg, seq: int = 64, init: bool = False):
    """megatron-core's model from our spec, on CPU, shaped like our config `cfg`."""
    from megatron.core.transformer import TransformerConfig

    from megatron_ssm.megatron.specs import stack_spec
    from megatron_ssm.megatron.stack import build_model

    tc = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=4,
        mamba_state_dim=cfg.state_size, mamba_head_dim=cfg.head_dim or 64, mamba_num_groups=cfg.n_groups,
        mamba_num_heads=cfg.num_heads or None, normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=False, bias_dropout_fusion=False,
        params_dtype=torch.float32, use_cpu_initialization=True, perform_initialization=init,
        tensor_model_parallel_size=torch.distributed.get_world_size(), fp32_residual_connection=cfg.residual_in_fp32)
    overrides = {} if cfg.is_mamba2 else {"time_step_rank": cfg.time_step_rank}
    if cfg.is_mamba2:
        overrides["chunk_size"] = cfg.chunk_size
    return build_model(tc, stack_spec(family, **overrides), vocab_size=cfg.padded_vocab_size(tc.tensor_model_parallel_size),
                       pattern="M" * cfg.num_layers, tied=cfg.tie_word_embeddings, max_sequence_length=seq)


def _full_logits(model, ids, vocab):
    """megatron-core's output is this rank's vocabulary slice (parallel_output): gather it (gloo)."""
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.parallel import tp_context

    out = model(ids, position_ids=None, attention_mask=None)
    return gather_logits(out.float(), vocab, tp_context(torch.device("cpu")))


def _rank_spec_logits(family: str, ckpt: str, input_ids: torch.Tensor):
    from megatron_ssm.checkpoint.formats import open_checkpoint
    from megatron_ssm.megatron.weights import load_into
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    with open_checkpoint(ckpt) as src:
        cfg = src.config
    model = megatron_model(family, cfg).eval()
    load_into(model, ckpt, tp.size, tp.rank)
    with torch.no_grad():
        logits = _full_logits(model, input_ids, cfg.vocab_size)
    return logits if tp.is_first else None


CASES = [pytest.param("mamba2", dict(n_groups=1), id="mamba2-g1"),
         pytest.param("mamba2", dict(n_groups=4, tied=False), id="mamba2-g4-untied"),
         pytest.param("mamba", dict(), id="mamba1"),
         pytest.param("falcon_mamba", dict(tied=False), id="falcon")]


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", CASES)
def test_megatron_model_from_our_spec_matches_hf(tmp_path, ranks, family, opts, tp):
    seed = fresh_seed()
    model = build_hf_model(hf_config(family, **opts), seed)
    ids = torch.randint(0, 250, (2, 19), generator=torch.Generator().manual_seed(seed))
    ckpt = save_hf(model, tmp_path / "hf")
    got = ranks(tp).run(_rank_spec_logits, family, str(ckpt), ids)[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=TOL, rtol=TOL, msg=lambda m: f"seed {seed}: {m}")


def our_name(megatron_name: str) -> str:
    """megatron-core local-spec name -> ours (the inverse of checkpoint.megatron_lm.megatron_name)."""
    top = {"embedding.word_embeddings.weight": "embeddings.weight", "decoder.final_norm.weight": "norm_f.weight",
           "output_layer.weight": "lm_head.weight"}
    return top.get(megatron_name) or megatron_name.removeprefix("decoder.")


def _rank_grads(family: str, ckpt: str, ids: torch.Tensor):
    """Loss of megatron-core's model (our spec) on ids and every parameter's gradient on this rank."""
    from megatron_ssm.checkpoint.formats import open_checkpoint
    from megatron_ssm.megatron.weights import load_into
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    with open_checkpoint(ckpt) as src:
        cfg = src.config
    model = megatron_model(family, cfg).train()
    load_into(model, ckpt, tp.size, tp.rank)
    loss = model(ids[:, :-1], position_ids=None, attention_mask=None, labels=ids[:, 1:]).mean()
    loss.backward()
    attrs = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None))
             for n, p in model.named_parameters()}
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters()}, attrs


@pytest.mark.parametrize("family,opts", CASES)
def test_gradients_through_our_tp_mixers_equal_hfs_at_tp2(tmp_path, ranks, family, opts):
    import torch.nn.functional as F

    from megatron_ssm.checkpoint.formats import open_checkpoint
    from megatron_ssm.checkpoint.partition import merge

    seed = fresh_seed()
    hf = build_hf_model(hf_config(family, vocab=256, **opts), seed)  # 256: no vocabulary padding at TP 2
    ids = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(seed))
    ckpt = save_hf(hf, tmp_path / "hf")
    results = ranks(2).run(_rank_grads, family, str(ckpt), ids)
    hf.train()
    logits = hf(ids[:, :-1], use_cache=False).logits
    ref_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    ref_loss.backward()
    ref = {k.removeprefix("backbone."): p.grad for k, p in hf.named_parameters()}
    assert abs(results[0][0] - float(ref_loss)) < 1e-4, seed
    with open_checkpoint(ckpt) as src:
        cfg = src.config
    grads = {our_name(n): merge(our_name(n), [r[1][n] for r in results], cfg) for n in results[0][1]}
    if cfg.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], atol=1e-5, rtol=1e-3, msg=lambda m: f"{name} (seed {seed}): {m}")
    # every parameter a rank holds only a part of carries megatron-core's TP attributes
    attrs = results[0][2]
    for name, (is_tp, dim) in attrs.items():
        if ".mixer." in name:
            assert is_tp and dim is not None, name


def _rank_dist_load(ckpt_it: str, shape_from: str, input_ids: torch.Tensor):
    """megatron-core's own dist_checkpointing.load of a torch_dist directory into the model built
    from our spec, through the adapter's sharded_state_dict."""
    from megatron.core import dist_checkpointing

    from megatron_ssm.checkpoint.formats import open_checkpoint
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    with open_checkpoint(shape_from) as src:
        cfg = src.config
    model = megatron_model("mamba2", cfg).eval()
    import argparse

    from megatron.core.transformer.enums import AttnBackend

    # what Megatron-LM's training allowlists before loading (its args Namespace and enums)
    with torch.serialization.safe_globals([argparse.Namespace, AttnBackend]):
        loaded = dist_checkpointing.load(model.sharded_state_dict(), ckpt_it)
    missing = model.load_state_dict(loaded, strict=False)
    assert not [k for k in missing.missing_keys if "_extra_state" not in k], missing
    with torch.no_grad():
        logits = _full_logits(model, input_ids, cfg.vocab_size)
    return logits if tp.is_first else None


def test_megatron_cores_torch_dist_fixture_loads_into_our_spec_model(tmp_path, ranks):
    """megatron-core 0.19 wrote it; loaded by the installed megatron-core's loader into our spec."""
    import shutil

    from megatron_ssm.checkpoint.megatron_lm import _read_common_state
    from test_megatron_checkpoint import FIXTURE_TOL, FIXTURES, REF

    it = tmp_path / "iter_0000010"
    shutil.copytree(FIXTURES / "torch_dist" / "iter_0000010", it)
    if not hasattr(__import__("megatron.core.dist_checkpointing.serialization", fromlist=["x"]),
                   "load_common_state_dict") or "0.16" in __import__("megatron.core").core.__version__:
        # megatron-core before 0.19 reads the common state only from common.pt, which 0.19 no longer
        # writes (it keeps a `common_state` object in the checkpoint): give it one, as our exporter does
        torch.save(_read_common_state(it), it / "common.pt")
    got = ranks(1).run(_rank_dist_load, str(it), str(FIXTURES / "torch_dist"), torch.tensor([REF["prompt"]]))[0]
    torch.testing.assert_close(got[0], REF["logits"], atol=FIXTURE_TOL, rtol=FIXTURE_TOL)


def test_our_torch_dist_export_loads_through_megatron_cores_loader_at_tp2(tmp_path, ranks):
    seed = fresh_seed()
    model = build_hf_model(hf_config("mamba2", n_groups=2, tied=False), seed)
    ids = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(seed))
    convert(save_hf(model, tmp_path / "hf"), tmp_path / "meg", 1, to_megatron=True, ckpt_format="torch_dist",
            megatron_spec="local", progress=False)
    got = ranks(2).run(_rank_dist_load, str(tmp_path / "meg" / "release"), str(tmp_path / "meg"), ids)[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=TOL, rtol=TOL, msg=lambda m: f"seed {seed}: {m}")


def test_example_builds_megatron_cores_model_with_our_mixers_and_trains(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    src = save_hf(build_hf_model(hf_config("mamba", tied=True), 3), tmp_path / "hf")  # Mamba-1: megatron-core has none
    out = subprocess.run([sys.executable, str(root / "examples" / "megatron_model.py"), "--load", str(src),
                          "--new-tokens", "3", "--train-steps", "3"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-2000:]
    losses = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0], out.stdout
