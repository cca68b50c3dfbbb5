"""The two CLIs end to end (convert_hf.py, then torchrun generate.py), and their errors on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, hf_greedy, save_hf

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def convert(hf_dir, out, tp, *extra):
    return run([sys.executable, "tools/convert_hf.py", "--load-dir", str(hf_dir), "--save-dir", str(out),
                "--tp", str(tp), "--no-progress", *extra])


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "examples/generate.py", *args])


@pytest.fixture(scope="module")
def mamba2_hf(tmp_path_factory):
    model = build_hf_model(hf_config("mamba2", n_groups=2, tied=False), fresh_seed())
    return model, save_hf(model, tmp_path_factory.mktemp("cli") / "hf")


@pytest.fixture(scope="module")
def mamba2_tp2(mamba2_hf, tmp_path_factory):
    """mamba2_hf through the converter CLI at TP 2 (each convert_hf.py run imports torch afresh)."""
    out = tmp_path_factory.mktemp("cli") / "tp2"
    res = convert(mamba2_hf[1], out, 2)
    assert res.returncode == 0, res.stderr
    return out


def test_convert_then_torchrun_generate_matches_hf(mamba2_hf, mamba2_tp2, tmp_path):
    model, _ = mamba2_hf
    g = torch.Generator().manual_seed(fresh_seed())
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (7, 3)]
    out = tmp_path / "out.json"
    res = torchrun(2, "--load", str(mamba2_tp2), *sum((["--prompt-ids", ",".join(map(str, p))] for p in prompts), []),
                   "--max-new-tokens", "6", "--temperature", "0", "--output-json", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["tokens"] == [hf_greedy(model, p, 6) for p in prompts]


def test_checkpoint_at_wrong_world_size_is_refused(mamba2_tp2):
    res = torchrun(1, "--load", str(mamba2_tp2), "--prompt-ids", "5,6", "--max-new-tokens", "2")
    assert res.returncode != 0
    assert "tensor-parallel degree 2" in res.stderr and "1 ranks" in res.stderr


def test_tp_degree_that_does_not_divide_heads_is_refused(mamba2_hf, tmp_path):
    _, hf_dir = mamba2_hf
    res = convert(hf_dir, tmp_path / "tp3", 3)
    assert res.returncode == 2
    assert "TP degree 3 does not divide the 8 Mamba-2 heads" in res.stderr
    assert not (tmp_path / "tp3").exists()


def test_missing_or_broken_hf_files_are_named(mamba2_hf, tmp_path):
    _, hf_dir = mamba2_hf
    res = convert(tmp_path / "nowhere", tmp_path / "out", 1)
    assert res.returncode == 2 and "does not exist" in res.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    res = convert(broken, tmp_path / "out", 1)
    assert res.returncode == 2 and "model.safetensors" in res.stderr
    (broken / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes()[:1000])
    res = convert(broken, tmp_path / "out", 1)
    assert res.returncode == 2 and "model.safetensors" in res.stderr
    assert not (tmp_path / "out").exists()


def test_hybrid_convert_then_torchrun_generate_matches_hf(tmp_path):
    """A Nemotron-H (Mamba-2 with n_groups 1 < tp, attention, MLP) through both CLIs at TP=2."""
    from hf_models import hybrid_config

    model = build_hf_model(hybrid_config("nemotron_h", pattern="M*-M", n_groups=1), fresh_seed())
    hf_dir = save_hf(model, tmp_path / "hf")
    g = torch.Generator().manual_seed(fresh_seed())
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (6, 2)]
    res = convert(hf_dir, tmp_path / "tp2", 2)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out.json"
    res = torchrun(2, "--load", str(tmp_path / "tp2"), *sum((["--prompt-ids", ",".join(map(str, p))] for p in prompts), []),
                   "--max-new-tokens", "6", "--temperature", "0", "--output-json", str(out))
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["tokens"] == [hf_greedy(model, p, 6) for p in prompts]
