"""Checkpoint conversion: every input format, exact round trips over TP degrees, HF export, and the
refusals (existing target, interrupted write, bad tensors, broken or mismatched checkpoints)."""
from __future__ import annotations

import json
import os
import re
import signal
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_models import build_hf_model, fresh_seed, hf_config, hf_logits, save_hf
from megatron_ssm.checkpoint.atomic import leftovers
from megatron_ssm.checkpoint.convert import convert
from megatron_ssm.checkpoint.errors import CheckpointError
from megatron_ssm.checkpoint.hf import our_name
from megatron_ssm.checkpoint.integrity import MANIFEST, ChecksumError, write_manifest
from megatron_ssm.checkpoint.megatron import checkpoint_tp_size, load_rank, rank_file
from test_model_vs_hf import TOL, _rank_logits

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "megatron_ssm" / "assets" / "tiny-mamba2"


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


def reference_shard(name: str, full: torch.Tensor, hf_cfg, tp: int, r: int) -> torch.Tensor:
    """Rank r's piece of HF tensor `name`, written for this test from what each row means (not from
    partition.py): Mamba-2 in_proj rows are [z | x | B | C | dt], a rank takes its heads' channels of
    z and x, the B/C groups its heads read (head h reads group h // (heads / groups)) and its heads'
    dt; Mamba-1 in_proj is [x | z]; vocabulary rows are zero-padded to a multiple of 128 * tp."""
    def mine(n: int) -> list[int]:
        return list(range(r * n // tp, (r + 1) * n // tp))

    local = re.sub(r"^layers\.\d+\.", "", name)
    if name in ("embeddings.weight", "lm_head.weight"):
        rows = -(-full.shape[0] // (128 * tp)) * 128 * tp
        padded = torch.zeros(rows, *full.shape[1:], dtype=full.dtype)
        padded[: full.shape[0]] = full
        return padded[mine(rows)]
    if name == "norm_f.weight" or local in ("norm.weight", "mixer.out_proj.bias"):
        return full
    if local == "mixer.out_proj.weight" or local == "mixer.x_proj.weight":
        return full[:, mine(full.shape[1])]
    if hf_cfg.model_type == "mamba2":
        I, H, G, N = hf_cfg.expand * hf_cfg.hidden_size, hf_cfg.num_heads, hf_cfg.n_groups, hf_cfg.state_size
        heads = mine(H)
        channels = [h * (I // H) + p for h in heads for p in range(I // H)]
        bc = [g * N + n for g in sorted({h // (H // G) for h in heads}) for n in range(N)]
        if local.startswith("mixer.in_proj."):
            return full[channels + [I + c for c in channels] + [2 * I + i for i in bc]
                        + [2 * I + G * N + i for i in bc] + [2 * I + 2 * G * N + h for h in heads]]
        if local.startswith("mixer.conv1d."):
            return full[channels + [I + i for i in bc] + [I + G * N + i for i in bc]]
        return full[heads] if local in ("mixer.dt_bias", "mixer.A_log", "mixer.D") else full[channels]
    I = hf_cfg.intermediate_size
    if local.startswith("mixer.in_proj."):
        return full[mine(I) + [I + c for c in mine(I)]]
    return full[mine(I)]  # conv1d, dt_proj, A_log, D: one row per channel


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
    # rank files are plain torch.load files holding exactly each rank's piece of every tensor
    for r in range(4):
        state = rank_state(tmp_path / "tp4", r)
        assert_same(state, {k: reference_shard(k, original[k], model.config, 4, r) for k in original})
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


def test_torch_files_are_read_with_and_without_storage_offsets(tmp_path, monkeypatch):
    """The offset path, the eager fallback (a torch that records no offsets, forced here) and a
    pre-zip file give the same tensors, including views into a shared storage."""
    from megatron_ssm.checkpoint import torch_stream

    torch.manual_seed(fresh_seed())
    big = torch.randn(10, 4)
    state = {"a": big, "b": big[2:5], "c": big.t(), "d": torch.randn(6).bfloat16(), "e": torch.arange(7)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)

    def read_all(path: Path) -> tuple[bool, dict[str, torch.Tensor]]:
        f = torch_stream.TorchStateFile(path)
        try:
            eager = all(t.device.type != "meta" for t in f._tensors.values())
            return eager, {k: f.read(k) for k in f.specs}
        finally:
            f.close()

    assert read_all(tmp_path / "zip.pt")[0] is (torch_stream.storage_offset(
        torch.load(tmp_path / "zip.pt", map_location="meta", weights_only=True)["a"]) is None)
    for name in ("zip.pt", "legacy.pt"):
        eager, got = read_all(tmp_path / name)
        assert eager or name == "zip.pt"
        assert_same(got, {k: v.contiguous() for k, v in state.items()})
    monkeypatch.setattr(torch_stream, "storage_offset", lambda t: None)
    eager, got = read_all(tmp_path / "zip.pt")
    assert eager
    assert_same(got, {k: v.contiguous() for k, v in state.items()})


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

def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` with its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_force_replaces_only_our_checkpoints_and_empty_directories(tmp_path):
    model, hf = make_hf(tmp_path, "mamba")
    convert(hf, tmp_path / "out", 1, progress=False)
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        convert(hf, tmp_path / "out", 2, progress=False)
    convert(hf, tmp_path / "out", 2, force=True, progress=False)  # ours: replaced
    assert checkpoint_tp_size(tmp_path / "out") == 2
    convert(tmp_path / "out", tmp_path / "hf-out", to_hf=True, progress=False)
    convert(tmp_path / "out", tmp_path / "hf-out", to_hf=True, force=True, progress=False)  # our HF export too
    (tmp_path / "empty").mkdir()
    convert(hf, tmp_path / "empty", 1, force=True, progress=False)
    assert checkpoint_tp_size(tmp_path / "empty") == 1

    # anything else is refused with --force, and nothing in it is touched
    others = {"notes": {"thesis.txt": "chapter 1", "config.json": "{}"},
              "megatron-training": {"latest_checkpointed_iteration.txt": "100",
                                    "iter_0000100/mp_rank_00/model_optim_rng.pt": "weights"}}
    for name, files in others.items():
        for rel, text in files.items():
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).write_text(text)
    model.save_pretrained(tmp_path / "hf-model")  # an HF model directory this tool did not write
    (tmp_path / "out" / "notes.txt").write_text("mine")  # a user's file inside our checkpoint
    for name, why in (("notes", "not written by megatron-ssm"), ("megatron-training", "not written by megatron-ssm"),
                      ("hf-model", "not written by megatron-ssm"), ("out", "also holds notes.txt")):
        before = tree(tmp_path / name)
        with pytest.raises(CheckpointError, match=why) as e:
            convert(hf, tmp_path / name, 1, force=True, progress=False)
        assert "Nothing was deleted" in str(e.value)
        assert tree(tmp_path / name) == before, name
        assert not leftovers(tmp_path / name)
    res = cli("--load-dir", str(hf), "--save-dir", str(tmp_path / "notes"), "--tp", "1", "--force", "--no-progress")
    assert res.returncode == 2 and "not written by megatron-ssm" in res.stderr, res.stderr
    assert (tmp_path / "notes" / "thesis.txt").read_text() == "chapter 1"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="is not a directory"):
        convert(hf, tmp_path / "a-file", 1, force=True, progress=False)
    with pytest.raises(CheckpointError, match="both"):
        convert(tmp_path / "out", tmp_path / "out", 1, force=True, progress=False)


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _rank_load(ckpt: str, verify):
    """Every rank loads; returns (error type, message), or None if it loaded."""
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    try:
        load_model(ckpt, tp_context(torch.device("cpu")), verify=verify)
    except CheckpointError as e:
        return type(e).__name__, str(e)
    return None


def _rank_load_without_verifying(ckpt: str):
    os.environ["MEGATRON_SSM_NO_VERIFY"] = "1"
    try:
        return _rank_load(ckpt, None)
    finally:
        del os.environ["MEGATRON_SSM_NO_VERIFY"]


def test_a_flipped_byte_is_named_on_every_rank_and_by_the_converter(tmp_path, ranks):
    _, hf = make_hf(tmp_path, "mamba2", n_groups=2)
    ckpt = tmp_path / "tp2"
    convert(hf, ckpt, 2, progress=False)
    manifest = json.loads((ckpt / MANIFEST).read_text())
    assert manifest["hash"] == "xxh3_128" and set(manifest["files"]) == {
        "latest_checkpointed_iteration.txt", "release/mp_rank_00/model_optim_rng.pt",
        "release/mp_rank_01/model_optim_rng.pt"}
    shard = rank_file(ckpt, 1)
    size = shard.stat().st_size
    _flip_byte(shard, size // 2)  # inside the tensor data: the file still loads, with other values
    assert shard.stat().st_size == size
    results = ranks(2).run(_rank_load, str(ckpt), None)
    assert [r[0] for r in results] == ["ChecksumError"] * 2, results
    for kind, message in results:
        assert str(shard) in message and "does not match its xxh3_128 checksum" in message
    with pytest.raises(ChecksumError, match=re.escape(str(shard))):
        convert(ckpt, tmp_path / "resharded", 1, progress=False)
    assert not (tmp_path / "resharded").exists()
    # skipping the check loads it (the damage is then the user's choice)
    assert ranks(2).run(_rank_load, str(ckpt), False) == [None, None]
    convert(ckpt, tmp_path / "resharded", 1, progress=False, verify=False)
    res = cli("--load-dir", str(ckpt), "--save-dir", str(tmp_path / "cli"), "--tp", "1", "--no-progress")
    assert res.returncode == 2 and "checksum" in res.stderr and str(shard) in res.stderr
    res = cli("--load-dir", str(ckpt), "--save-dir", str(tmp_path / "cli"), "--tp", "1", "--no-progress", "--no-verify")
    assert res.returncode == 0, res.stderr
    # the server's switch: MEGATRON_SSM_NO_VERIFY=1 (load_model's default)
    assert ranks(2).run(_rank_load_without_verifying, str(ckpt)) == [None, None]
    # a damaged HF export of ours is caught by the converter as well
    convert(tmp_path / "resharded", tmp_path / "hf-out", to_hf=True, progress=False)
    _flip_byte(tmp_path / "hf-out" / "model.safetensors", (tmp_path / "hf-out" / "model.safetensors").stat().st_size - 3)
    with pytest.raises(ChecksumError, match="model.safetensors does not match"):
        convert(tmp_path / "hf-out", tmp_path / "again", 1, progress=False)


def test_checkpoints_without_checksums_still_load_with_a_warning(tmp_path):
    _, hf = make_hf(tmp_path, "mamba")
    ckpt = tmp_path / "tp2"
    convert(hf, ckpt, 2, progress=False)
    expected = [rank_state(ckpt, r) for r in range(2)]
    # the manifest of earlier versions: sizes only
    files = {f"release/mp_rank_{r:02d}/model_optim_rng.pt": rank_file(ckpt, r).stat().st_size for r in range(2)}
    (ckpt / MANIFEST).write_text(json.dumps({"format": "megatron-ssm", "tensor_model_parallel_size": 2, "files": files}))
    for manifest in ("sizes only", "none"):
        for r in range(2):
            with pytest.warns(UserWarning, match="no checksum recorded"):
                assert_same(load_rank(ckpt, r, 2)[1], expected[r])
        with pytest.warns(UserWarning, match="no checksum recorded"):
            convert(ckpt, tmp_path / f"from-{manifest}", 1, force=True, progress=False)
        (ckpt / MANIFEST).unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fresh conversion has checksums: no warning
        load_rank(tmp_path / "from-none", 0, 1)
    # --force still replaces a checkpoint of ours with a sizes-only manifest (its tracker unlisted)
    (ckpt / MANIFEST).write_text(json.dumps({"format": "megatron-ssm", "tensor_model_parallel_size": 2, "files": files}))
    convert(hf, ckpt, 1, force=True, progress=False)
    assert checkpoint_tp_size(ckpt) == 1


def _killed_mid_conversion(src: Path, target: Path, *extra: str) -> None:
    """Run the CLI in a child that SIGKILLs itself after writing 3 tensors (tests/kill_during_convert.py)."""
    res = subprocess.run([sys.executable, "tests/kill_during_convert.py", "3", "--load-dir", str(src),
                          "--save-dir", str(target), "--no-progress", *extra], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr


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
    write_manifest(tmp_path / "misshaped", {"format": "megatron-ssm", "tensor_model_parallel_size": 2})
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
                   "--no-progress", "--no-verify", "mamba-ssm", "megatron-ssm", "HF transformers"):
        assert option in res.stdout, option
    _, hf = make_hf(tmp_path, "mamba2", n_groups=2)
    shutil.copy(ASSET / "tokenizer.model", hf / "tokenizer.model")
    res = cli("--load-dir", str(hf), "--save-dir", str(tmp_path / "tp2"), "--tp", "2")
    assert res.returncode == 0, res.stderr
    assert "tensors" in res.stderr and "B/s" in res.stderr
    res = cli("--load-dir", str(tmp_path / "tp2"), "--save-dir", str(tmp_path / "back"), "--to-hf", "--no-progress")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == (hf / "tokenizer.model").read_bytes()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # made from tokenizer.model at the first step
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "tp2" / name).read_bytes()
    res = cli("--load-dir", str(hf), "--save-dir", str(tmp_path / "x"), "--tp", "2", "--to-hf")
    assert res.returncode == 2 and "not allowed with argument" in res.stderr
