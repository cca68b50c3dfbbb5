"""Megatron-LM checkpoints in and out: megatron-core's own files (fixtures it wrote on a GPU) at TP 1/2/4,
bit-exact round trips through legacy `torch` and `torch_dist`, PP>1 legacy files, and every refusal."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, save_hf
from megatron_ssm.checkpoint.convert import convert
from megatron_ssm.checkpoint.errors import CheckpointError
from megatron_ssm.checkpoint.formats import open_checkpoint
from megatron_ssm.checkpoint.megatron_lm import NATIVE_TRACKER, TRACKER, MegatronLMCheckpoint
from megatron_ssm.config import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "megatron"
REF = torch.load(FIXTURES / "reference.pt", weights_only=True)
HYBRID_REF = torch.load(FIXTURES / "reference_hybrid.pt", weights_only=True)  # Nemotron-H layout M*-M
# megatron-core ran on an H200 (its Triton SSD scan, fp32): logits agree to this, tokens exactly
FIXTURE_TOL = 2e-3


def _rank_greedy_and_logits(ckpt: str, prompt: list[int], new_tokens: int):
    from megatron_ssm.inference.generate import generate
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    model = load_model(ckpt, tp)
    with torch.no_grad():
        logits = gather_logits(model(torch.tensor([prompt])), model.cfg.vocab_size, tp)
    tokens = generate(model, [prompt], new_tokens)
    return (logits[0], tokens) if tp.is_first else None


def all_tensors(path, verify: bool = True) -> dict[str, torch.Tensor]:
    with open_checkpoint(path, verify=verify) as src:
        return {n: src.read(n) for n in src.names()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["legacy", "torch_dist", "hybrid_legacy", "hybrid_torch_dist"])
def test_megatron_core_checkpoints_give_megatron_cores_tokens_at_every_tp(tmp_path, ranks, fmt, tp):
    """The fixtures: megatron-core 0.19.2's own HybridModel (Mamba-2 with n_groups=1, which
    megatron-core itself cannot run at TP>1; and a Mamba/attention/MLP hybrid), its logits and greedy
    tokens (tools/make_megatron_fixtures.py; on the H200 ours agreed to 2e-7)."""
    ref = HYBRID_REF if fmt.startswith("hybrid") else REF
    convert(FIXTURES / fmt, tmp_path / "ours", tp, progress=False)
    logits, tokens = ranks(tp).run(_rank_greedy_and_logits, str(tmp_path / "ours"), ref["prompt"],
                                   len(ref["greedy"]))[0]
    torch.testing.assert_close(logits, ref["logits"], atol=FIXTURE_TOL, rtol=FIXTURE_TOL)
    assert tokens[0] == ref["greedy"], (fmt, tp)


def test_fixture_formats_hold_the_same_tensors_and_shape_comes_from_args():
    legacy, dist = all_tensors(FIXTURES / "legacy"), all_tensors(FIXTURES / "torch_dist")
    assert_same(legacy, dist)
    with MegatronLMCheckpoint(FIXTURES / "torch_dist") as ck:
        cfg = ck.config
    shape = REF["shape"]
    assert (cfg.hidden_size, cfg.num_layers, cfg.state_size, cfg.head_dim, cfg.n_groups, cfg.vocab_size) == (
        shape["hidden_size"], shape["num_layers"], shape["mamba_state_dim"], shape["mamba_head_dim"],
        shape["mamba_num_groups"], shape["vocab"])
    assert cfg.tie_word_embeddings == shape["tied"]


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_hf_to_megatron_to_ours_at_another_tp_and_back_is_bit_exact(tmp_path, fmt):
    seed = fresh_seed()
    model = build_hf_model(hf_config("mamba2", n_groups=4, tied=False, vocab=300), seed)
    src = save_hf(model, tmp_path / "hf")
    convert(src, tmp_path / "meg", 2, to_megatron=True, ckpt_format=fmt, progress=False)
    convert(tmp_path / "meg", tmp_path / "ours4", 4, progress=False)
    convert(tmp_path / "ours4", tmp_path / "meg4", 4, to_megatron=True, ckpt_format=fmt, progress=False)
    convert(tmp_path / "meg4", tmp_path / "back", to_hf=True, progress=False)
    assert_same(all_tensors(src), all_tensors(tmp_path / "back")), seed


def test_legacy_export_has_megatron_cores_per_rank_split(tmp_path):
    """Rank r's in_proj rows are [z_r | x_r | B_r | C_r | dt_r] (megatron-core's ColumnParallelLinear over
    the packed output with its sharded_state_dict's z/x/B/C/dt split), conv1d [x_r | B_r | C_r]."""
    seed = fresh_seed()
    model = build_hf_model(hf_config("mamba2", n_groups=2), seed)
    convert(save_hf(model, tmp_path / "hf"), tmp_path / "meg", 2, to_megatron=True, ckpt_format="torch",
            megatron_core="0.16", progress=False)
    full = model.backbone.layers[0].mixer.in_proj.weight.detach()
    conv = model.backbone.layers[0].mixer.conv1d.weight.detach()
    I, bc, H = 128, 2 * 16, 8  # intermediate, n_groups x state, heads of hf_config
    z, x, B, C, dt = full.split([I, I, bc, bc, H])
    cx, cB, cC = conv.split([I, bc, bc])
    for r in range(2):
        blob = torch.load(tmp_path / "meg" / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", weights_only=False)
        assert isinstance(blob["args"], argparse.Namespace) and blob["checkpoint_version"] == 3.0
        sd = blob["model"]
        want = torch.cat([t.chunk(2)[r] for t in (z, x, B, C, dt)])
        assert torch.equal(sd["decoder.layers.0.mixer.in_proj.weight"], want), seed
        assert torch.equal(sd["decoder.layers.0.mixer.conv1d.weight"], torch.cat([t.chunk(2)[r] for t in (cx, cB, cC)]))
        assert "decoder.layers.0.mixer.in_proj.layer_norm_weight" in sd  # TE spec: the block norm is fused
        assert "decoder.layers.0.mixer.in_proj._extra_state" in sd


def _split_into_pipeline_stages(tp_dir: Path, pp_dir: Path, layers: int, pp: int) -> None:
    """A TP x PP legacy checkpoint as Megatron-LM writes one: mp_rank_TT_PPP files, layers numbered
    from 0 within each stage, embedding on the first stage, final norm and head on the last."""
    per = layers // pp
    for src in sorted((tp_dir / "release").iterdir()):
        blob = torch.load(src / "model_optim_rng.pt", weights_only=False)
        for p in range(pp):
            stage = {}
            for k, v in blob["model"].items():
                if k.startswith("decoder.layers."):
                    i, rest = k.removeprefix("decoder.layers.").split(".", 1)
                    if p * per <= int(i) < (p + 1) * per:
                        stage[f"decoder.layers.{int(i) - p * per}.{rest}"] = v
                elif (k.startswith("embedding.") and p == 0) or (not k.startswith("embedding.") and p == pp - 1):
                    stage[k] = v
            args = argparse.Namespace(**{**vars(blob["args"]), "pipeline_model_parallel_size": pp})
            out = pp_dir / "iter_0000020" / f"{src.name}_{p:03d}" / "model_optim_rng.pt"
            out.parent.mkdir(parents=True)
            torch.save({**blob, "model": stage, "args": args, "iteration": 20}, out)
    (pp_dir / TRACKER).write_text("20")


def test_legacy_checkpoint_at_tp2_pp2_reads_back_bit_exact(tmp_path):
    seed = fresh_seed()
    model = build_hf_model(hf_config("mamba2", n_groups=2, tied=False, layers=4), seed)
    src = save_hf(model, tmp_path / "hf")
    convert(src, tmp_path / "meg", 2, to_megatron=True, ckpt_format="torch", progress=False)
    _split_into_pipeline_stages(tmp_path / "meg", tmp_path / "pp", layers=4, pp=2)
    with MegatronLMCheckpoint(tmp_path / "pp") as ck:
        assert (ck.tp, ck.pp) == (2, 2)
    assert_same(all_tensors(src), all_tensors(tmp_path / "pp")), seed


def test_what_megatron_core_cannot_hold_is_refused_and_nothing_is_written(tmp_path):
    for family, opts, tp, why in [("mamba", {}, 1, "no mamba mixer"), ("falcon_mamba", {}, 2, "no falcon_mamba"),
                                  ("mamba2", dict(n_groups=1), 2, "n_groups % tp == 0"),
                                  ("mamba2", dict(n_groups=2, use_bias=True), 1, "bias")]:
        src = save_hf(build_hf_model(hf_config(family, **opts), 0), tmp_path / f"hf-{family}-{tp}-{len(opts)}")
        target = tmp_path / f"meg-{family}-{tp}-{len(opts)}"
        with pytest.raises(ConfigError, match=why):
            convert(src, target, tp, to_megatron=True, progress=False)
        assert not target.exists() and not list(tmp_path.glob(f".{target.name}*"))


def test_unmapped_and_missing_keys_are_named(tmp_path):
    shutil.copytree(FIXTURES / "legacy", tmp_path / "extra")
    f = tmp_path / "extra" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    blob = torch.load(f, map_location="cpu", weights_only=False)
    blob["model"]["decoder.layers.0.mixer.lora_a.weight"] = torch.zeros(3)
    torch.save(blob, f)
    with pytest.raises(CheckpointError, match="mixer.lora_a.weight"):
        open_checkpoint(tmp_path / "extra")
    del blob["model"]["decoder.layers.0.mixer.lora_a.weight"]
    del blob["model"]["decoder.layers.1.mixer.dt_bias"]
    torch.save(blob, f)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers.1.mixer.dt_bias"):
        open_checkpoint(tmp_path / "extra")


def test_legacy_pickles_load_only_allowlisted_globals(tmp_path):
    shutil.copytree(FIXTURES / "legacy", tmp_path / "evil")
    f = tmp_path / "evil" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt"
    blob = torch.load(f, map_location="cpu", weights_only=False)
    blob["args"].hook = Path("/")  # any class outside the allowlist (here pathlib's) must stop the load
    torch.save(blob, f)
    with pytest.raises(CheckpointError, match="pathlib.PosixPath.*not on the allowlist"):
        open_checkpoint(tmp_path / "evil")


def megatron_read_metadata(tracker_filename: str):
    """megatron/training/checkpointing.py's read_metadata (Megatron-LM, late 2026), minus its
    all-reduce: the first thing Megatron's load_checkpoint does with a directory."""
    iteration, release = -1, False
    with open(tracker_filename) as f:
        metastring = f.read().strip()
        try:
            iteration = int(metastring)
        except ValueError:
            release = metastring == "release"
            if not release:
                print(f"ERROR: Invalid metadata file {tracker_filename}. Exiting")
                sys.exit()
            iteration = 0
    assert iteration > -1 or release
    return iteration, release


def test_megatron_refuses_our_native_files_and_reads_our_exports(tmp_path):
    src = save_hf(build_hf_model(hf_config("mamba", tied=True), 0), tmp_path / "hf")
    convert(src, tmp_path / "ours", 2, progress=False)  # Mamba-1: what Megatron could never hold
    assert (tmp_path / "ours" / TRACKER).read_text() == NATIVE_TRACKER
    with pytest.raises(SystemExit):
        megatron_read_metadata(str(tmp_path / "ours" / TRACKER))
    src2 = save_hf(build_hf_model(hf_config("mamba2", n_groups=2), 0), tmp_path / "hf2")
    convert(src2, tmp_path / "meg", 2, to_megatron=True, progress=False)
    assert megatron_read_metadata(str(tmp_path / "meg" / TRACKER)) == (0, True)
    # and we still read our checkpoints written before the change (tracker "release"; the manifest's
    # checksum of the tracker would now object, so unverified)
    (tmp_path / "ours" / TRACKER).write_text("release")
    assert_same(all_tensors(tmp_path / "ours", verify=False), all_tensors(src))


def _rank_direct(ckpt: str, prompt: list[int], new_tokens: int):
    from megatron_ssm.inference.generate import generate
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    return generate(load_model(ckpt, tp_context(torch.device("cpu"))), [prompt], new_tokens)[0]


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_direct_load_of_megatron_checkpoints_reshards_at_load(ranks, fmt):
    """--load MEGATRON_DIR: no conversion; megatron-core's TP=1 files run on 2 ranks."""
    tokens = ranks(2).run(_rank_direct, str(FIXTURES / fmt), REF["prompt"], len(REF["greedy"]))
    assert tokens == [REF["greedy"]] * 2


def test_generate_example_loads_a_megatron_checkpoint_directly(tmp_path):
    import json
    import os
    import subprocess

    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    subprocess.run([sys.executable, str(Path(__file__).parents[1] / "examples" / "generate.py"), "--load",
                    str(FIXTURES / "torch_dist"), "--tensor-model-parallel-size", "1", "--prompt-ids",
                    ",".join(map(str, REF["prompt"])), "--max-new-tokens", str(len(REF["greedy"])),
                    "--output-json", str(out)], check=True, env=env, capture_output=True, timeout=300)
    assert json.loads(out.read_text())["tokens"] == [REF["greedy"]]


def _rank_logits(ckpt: str, input_ids: torch.Tensor):
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    model = load_model(ckpt, tp)
    with torch.no_grad():
        full = gather_logits(model(input_ids), model.cfg.vocab_size, tp)
    return full if tp.is_first else None


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
def test_nemotron_h_hybrid_to_megatron_and_back_is_bit_exact_and_loads_directly(tmp_path, ranks, fmt):
    """Megatron's hybrid layout: M / * / - layers, attention's linear_qkv interleaved by query group."""
    from hf_models import hf_logits, hybrid_config

    seed = fresh_seed()
    model = build_hf_model(hybrid_config("nemotron_h", pattern="M*-M", kv_heads=2), seed)
    src = save_hf(model, tmp_path / "hf")
    convert(src, tmp_path / "meg", 2, to_megatron=True, ckpt_format=fmt, progress=False)
    if fmt == "torch":
        sd = torch.load(tmp_path / "meg" / "release" / "mp_rank_01" / "model_optim_rng.pt", weights_only=False)["model"]
        qkv = model.model.layers[1].mixer
        q, k, v = qkv.q_proj.weight, qkv.k_proj.weight, qkv.v_proj.weight  # 4 heads, 2 kv heads of 16
        # rank 1 holds query group 1: [q heads 2, 3 | k head 1 | v head 1]
        want = torch.cat([q[32:64], k[16:32], v[16:32]])
        assert torch.equal(sd["decoder.layers.1.self_attention.linear_qkv.weight"], want), seed
        assert "decoder.layers.2.mlp.linear_fc1.layer_norm_weight" in sd and "decoder.layers.2.mlp.linear_fc2.weight" in sd
    convert(tmp_path / "meg", tmp_path / "back", to_hf=True, progress=False)
    assert_same(all_tensors(src), all_tensors(tmp_path / "back"))
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(seed))
    got = ranks(2).run(_rank_logits, str(tmp_path / "meg"), ids)[0]
    torch.testing.assert_close(got, hf_logits(model, ids), atol=1e-4, rtol=1e-4, msg=lambda m: f"seed {seed}: {m}")


def _rank_load_only(ckpt: str):
    import faulthandler
    import sys

    faulthandler.dump_traceback_later(60, exit=True, file=sys.stderr)
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    faulthandler.cancel_dump_traceback_later()
    return True
