"""Checkpoint conversion: every input format, exact round trips over TP degrees, HF export, and the
refusals (existing target, interrupted write, bad tensors, broken or mismatched checkpoints)."""
from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import build_hf_model, fresh_seed, hf_config, hf_logits, save_hf
from megatron_ssm.checkpoint.atomic import leftovers
from megatron_ssm.checkpoint.convert import PAUSE_ENV, convert
from megatron_ssm.checkpoint.errors import CheckpointError
from megatron_ssm.checkpoint.hf import our_name
from megatron_ssm.checkpoint.megatron import MANIFEST, checkpoint_tp_size, load_rank, rank_file
from megatron_ssm.checkpoint.partition import shard
from test_model_vs_hf import TOL, _rank_logits

ROOT = Path(__file__).resolve().parents[1]


# ---- helpers -----------------------------------------------------------------------------------

def make_hf(root: Path, family: str, dtype=torch.float32, **opts):
    model = build_hf_model(hf_config(family, **opts), fresh_seed()).to(dtype)
    return model, save_hf(model, root / "hf")


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, read with the safetensors package (not our reader)."""
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.is_file() else {"model.safetensors"}
    out = {}
    for f in files:
        out.update({our_name(k): v for k, v in load_file(path / f).items()})
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def rank_state(ckpt: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(rank_file(ckpt, rank), weights_only=True)["model"]


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/convert_hf.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=120)


def _rank_load_error(ckpt: str):
    """Every rank tries to load; returns its CheckpointError message (None if it loaded)."""
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    try:
        load_model(ckpt, tp_context(torch.device("cpu")))
    except CheckpointError as e:
        return str(e)
    return None


def _rank_load_error_when_one_rank_fails(ckpt: str, bad_rank: int):
    """As _rank_load_error, but `bad_rank` fails inside its own load (a fault only it can see)."""
    from megatron_ssm.model import load as load_mod
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    real = load_mod._load

    def flaky(*args):
        if tp.rank == bad_rank:
            raise CheckpointError(f"rank {bad_rank}: simulated unreadable shard")
        return real(*args)

    load_mod._load = flaky
    try:
        return _rank_load_error(ckpt)
    finally:
        load_mod._load = real


# ---- exact round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("family,dtype,opts", [
    pytest.param("mamba", torch.float32, dict(tied=False, use_bias=True), id="mamba1-untied-bias-fp32"),
    pytest.param("falcon_mamba", torch.bfloat16, dict(), id="falcon-bf16"),
    pytest.param("mamba2", torch.bfloat16, dict(n_groups=2, tied=False), id="mamba2-g2-bf16"),
    pytest.param("mamba2", torch.float16, dict(n_groups=4), id="mamba2-g4-fp16"),
])
def test_hf_tp4_tp2_tp1_hf_is_bit_exact(tmp_path, family, dtype, opts):
    model, hf = make_hf(tmp_path, family, dtype, **opts)
    convert(hf, tmp_path / "tp4", 4, progress=False)
    convert(tmp_path / "tp4", tmp_path / "tp2", 2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "tp1", 1, progress=False)
    convert(tmp_path / "tp1", tmp_path / "back", to_hf=True, progress=False)
    original = hf_state(hf)
    assert_same(hf_state(tmp_path / "back"), original)
    # rank files are plain torch.load files holding exactly partition.shard's pieces
    for r in range(4):
        state = rank_state(tmp_path / "tp4", r)
        cfg = load_rank(tmp_path / "tp4", r, 4)[0]
        assert_same(state, {k: shard(k, original[k], cfg, 4, r) for k in state})
    # and transformers loads the export as the same model
    back = load_hf(tmp_path / "back")
    assert_same({k: v for k, v in back.state_dict().items()}, dict(model.state_dict()))


def test_reshard_to_a_degree_with_more_vocab_padding(tmp_path, ranks):
    """vocab 250 pads to 256 rows at TP2 but 512 at TP4: resharding must re-pad, and the model must run."""
    model, hf = make_hf(tmp_path, "mamba2", n_groups=2, vocab=250)
    convert(hf, tmp_path / "tp2", 2, progress=False)
    convert(tmp_path / "tp2", tmp_path / "tp4", 4, progress=False)
    emb = [rank_state(tmp_path / "tp4", r)["embeddings.weight"] for r in range(4)]
    assert [e.shape[0] for e in emb] == [128] * 4
    full = torch.cat(emb)
    assert torch.equal(full[:250], model.state_dict()["backbone.embeddings.weight"])
    assert not full[250:].any()
    ids = torch.randint(0, 250, (2, 21))
    ours = ranks(4).run(_rank_logits, str(tmp_path / "tp4"), ids)[0]
    ref = hf_logits(model, ids)
    assert (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


def test_dtype_changes_only_when_asked(tmp_path):
    _, hf = make_hf(tmp_path, "mamba")
    convert(hf, tmp_path / "bf16", 2, dtype="bfloat16", progress=False)
    cfg, state = load_rank(tmp_path / "bf16", 1, 2)
    assert cfg.torch_dtype == "bfloat16" and {v.dtype for v in state.values()} == {torch.bfloat16}
    convert(tmp_path / "bf16", tmp_path / "hf16", to_hf=True, dtype="float16", progress=False)
    original = hf_state(hf)
    assert_same(hf_state(tmp_path / "hf16"), {k: v.bfloat16().half() for k, v in original.items()})


# ---- input formats -----------------------------------------------------------------------------

def test_sharded_safetensors_and_pytorch_model_bin_inputs(tmp_path):
    model, _ = make_hf(tmp_path, "mamba2", n_groups=2, tied=False)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    expected = {our_name(k): v for k, v in model.state_dict().items()}
    for name, src in (("from-sharded", sharded), ("from-bin", binary)):
        convert(src, tmp_path / f"{name}-tp2", 2, progress=False)
        convert(tmp_path / f"{name}-tp2", tmp_path / name, to_hf=True, progress=False, max_shard_bytes=50_000)
        assert_same(hf_state(tmp_path / name), expected)
    assert (tmp_path / "from-bin" / "model.safetensors.index.json").is_file()  # our export shards too


def save_mamba_ssm(model, path: Path, vocab: int, ssm_cfg: dict, tied: bool) -> Path:
    """The same weights as `model`, in mamba-ssm's native layout (unpadded vocab_size in config.json;
    the state dict keeps the tied lm_head, as mamba-ssm's does)."""
    path.mkdir()
    state = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v
             for k, v in model.state_dict().items()}
    torch.save(state, path / "pytorch_model.bin")
    (path / "config.json").write_text(json.dumps(dict(
        d_model=64, d_intermediate=0, n_layer=2, vocab_size=vocab, ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={},
        rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=16, tie_embeddings=tied)))
    return path


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_mamba_ssm_format_to_tp2_and_hf_gives_the_same_logits(tmp_path, ranks, layer):
    # 250 tokens pad to 256 rows in mamba-ssm: the reference HF model has those 256 rows
    if layer == "Mamba2":
        model = build_hf_model(hf_config("mamba2", vocab=256, n_groups=1, tied=True), fresh_seed())
        ssm_cfg, tied = dict(layer="Mamba2", d_state=16, headdim=16, ngroups=1, chunk_size=16), True
    else:
        model = build_hf_model(hf_config("mamba", vocab=256, tied=False), fresh_seed())
        ssm_cfg, tied = dict(d_state=8), False
    native = save_mamba_ssm(model, tmp_path / "native", 250, ssm_cfg, tied)
    convert(native, tmp_path / "tp2", 2, progress=False)
    ids = torch.randint(0, 250, (2, 37))
    ref = hf_logits(model, ids)
    ours = ranks(2).run(_rank_logits, str(tmp_path / "tp2"), ids)[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())
    convert(tmp_path / "tp2", tmp_path / "hf", to_hf=True, progress=False)
    assert torch.equal(hf_logits(load_hf(tmp_path / "hf"), ids), ref)


# ---- safety ------------------------------------------------------------------------------------

def test_existing_target_needs_force_and_force_spares_other_directories(tmp_path):
    _, hf = make_hf(tmp_path, "mamba")
    convert(hf, tmp_path / "out", 1, progress=False)
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        convert(hf, tmp_path / "out", 2, progress=False)
    convert(hf, tmp_path / "out", 2, force=True, progress=False)
    assert checkpoint_tp_size(tmp_path / "out") == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        convert(hf, tmp_path / "notes", 1, force=True, progress=False)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="both"):
        convert(tmp_path / "out", tmp_path / "out", 1, force=True, progress=False)


def _killed_mid_conversion(src: Path, target: Path, *extra: str) -> None:
    """Run the CLI with the test pause hook, wait until it has written 3 tensors, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "tools/convert_hf.py", "--load-dir", str(src), "--save-dir", str(target),
                             "--no-progress", *extra], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, PAUSE_ENV: "3", "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        while "paused after 3 tensors" not in lines.get(timeout=60):
            pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_interrupted_conversion_leaves_nothing_that_loads(tmp_path):
    _, hf = make_hf(tmp_path, "mamba2", n_groups=2)
    target = tmp_path / "tp2"
    _killed_mid_conversion(hf, target, "--tp", "2")
    assert not target.exists() and leftovers(target)
    with pytest.raises(CheckpointError, match="interrupted conversion left"):
        load_rank(target, 0, 2)
    with pytest.raises(CheckpointError, match="interrupted conversion left"):
        convert(target, tmp_path / "elsewhere", 1, progress=False)
    # the next run cleans up and succeeds
    convert(hf, target, 2, progress=False)
    assert checkpoint_tp_size(target) == 2 and not leftovers(target)
    # an interrupted --force replacement keeps the old checkpoint intact
    before = [rank_state(target, r) for r in range(2)]
    _killed_mid_conversion(hf, target, "--tp", "1", "--force")
    assert checkpoint_tp_size(target) == 2
    for r in range(2):
        assert_same(rank_state(target, r), before[r])
    # and so does an interrupted HF export
    _killed_mid_conversion(target, tmp_path / "hf-out", "--to-hf")
    assert not (tmp_path / "hf-out").exists()


# ---- bad inputs are named ----------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    _, hf = make_hf(tmp_path, "mamba")
    state = load_file(hf / "model.safetensors")

    def variant(name: str, change) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text((hf / "config.json").read_text())
        s = dict(state)
        change(s)
        save_file(s, d / "model.safetensors", metadata={"format": "pt"})
        return d

    cases = {
        "missing tensor(s) layers.1.mixer.dt_proj.bias": lambda s: s.pop("backbone.layers.1.mixer.dt_proj.bias"),
        "unexpected tensor(s) layers.0.mixer.extra": lambda s: s.update({"backbone.layers.0.mixer.extra": torch.ones(2)}),
        "tensor layers.0.mixer.x_proj.weight has shape (9, 128)":
            lambda s: s.update({"backbone.layers.0.mixer.x_proj.weight": torch.ones(9, 128)}),
    }
    for i, (message, change) in enumerate(cases.items()):
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            convert(variant(f"v{i}", change), tmp_path / f"out{i}", 2, progress=False)
        assert not (tmp_path / f"out{i}").exists() and not leftovers(tmp_path / f"out{i}")
    truncated = variant("truncated", lambda s: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        convert(truncated, tmp_path / "out-t", 2, progress=False)


def test_broken_megatron_checkpoints_fail_on_every_rank_with_a_clear_message(tmp_path, ranks):
    _, hf = make_hf(tmp_path, "mamba")
    good = tmp_path / "good"
    convert(hf, good, 2, progress=False)
    # TP degree differs from the world size
    assert ranks(4).run(_rank_load_error, str(good)) == [
        f"{good} was written for tensor-parallel degree 2 but this run has 4 ranks per tensor-parallel group; "
        f"run with --nproc_per_node 2 (times the context-parallel size) or reshard with tools/convert_hf.py --tp 4"] * 4
    # a rank's shard is missing
    convert(hf, tmp_path / "missing", 2, progress=False)
    rank_file(tmp_path / "missing", 1).unlink()
    errors = ranks(2).run(_rank_load_error, str(tmp_path / "missing"))
    assert errors[0] == errors[1] and "missing the shard of TP rank 1" in errors[0]
    # a rank's file is truncated
    convert(hf, tmp_path / "truncated", 2, progress=False)
    f = rank_file(tmp_path / "truncated", 1)
    f.write_bytes(f.read_bytes()[:-4096])
    errors = ranks(2).run(_rank_load_error, str(tmp_path / "truncated"))
    assert errors[0] == errors[1] and "TP rank 1 is truncated" in errors[0]
    with pytest.raises(CheckpointError, match="truncated"):
        convert(tmp_path / "truncated", tmp_path / "resharded", 1, progress=False)
    # a rank holds a mis-shaped tensor (its manifest updated to match): named on every rank
    convert(hf, tmp_path / "misshaped", 2, progress=False)
    f = rank_file(tmp_path / "misshaped", 1)
    blob = torch.load(f, weights_only=True)
    blob["model"]["layers.0.mixer.D"] = torch.ones(3)
    torch.save(blob, f)
    manifest = json.loads((tmp_path / "misshaped" / MANIFEST).read_text())
    manifest["files"]["release/mp_rank_01/model_optim_rng.pt"] = f.stat().st_size
    (tmp_path / "misshaped" / MANIFEST).write_text(json.dumps(manifest))
    errors = ranks(2).run(_rank_load_error, str(tmp_path / "misshaped"))
    assert errors[0] == errors[1] and "tensor layers.0.mixer.D has shape (3,), TP rank 1" in errors[0]
    # a checkpoint from before manifests: still every missing rank is named
    (tmp_path / "missing" / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="missing the shard of TP rank 1"):
        checkpoint_tp_size(tmp_path / "missing")
    assert ranks(2).run(_rank_load_error, str(good)) == [None, None]
    # a fault only one rank sees during its own load still stops every rank (none left waiting)
    errors = ranks(2).run(_rank_load_error_when_one_rank_fails, str(good), 1)
    assert "could not load their shard" in errors[0] and "TP rank(s) 1" in errors[0]
    assert errors[1] == "rank 1: simulated unreadable shard"


# ---- CLI -----------------------------------------------------------------------------------------

def test_cli_help_documents_every_option_and_progress_shows_tensors_and_bytes(tmp_path):
    res = cli("--help")
    assert res.returncode == 0
    for option in ("--load-dir", "--save-dir", "--tp", "--to-hf", "--dtype", "--force", "--max-shard-size",
                   "--no-progress", "mamba-ssm", "megatron-ssm", "HF transformers"):
        assert option in res.stdout, option
    _, hf = make_hf(tmp_path, "mamba2", n_groups=2)
    (hf / "tokenizer.model").write_bytes(os.urandom(64))
    res = cli("--load-dir", str(hf), "--save-dir", str(tmp_path / "tp2"), "--tp", "2")
    assert res.returncode == 0, res.stderr
    assert "tensors" in res.stderr and "B/s" in res.stderr
    res = cli("--load-dir", str(tmp_path / "tp2"), "--save-dir", str(tmp_path / "back"), "--to-hf", "--no-progress")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    res = cli("--load-dir", str(hf), "--save-dir", str(tmp_path / "x"), "--tp", "2", "--to-hf")
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
