"""The tools/ scripts that run on a CPU, on tiny inputs, checked by the values they print or write.

GPU-only tools (benchmark.py, comm_benchmark.py, baselines.py, prefix_reuse_ttft.py) are listed in
docs/testing.md; convert_hf.py and text_generation_cli.py are covered by test_cli.py / test_server.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "megatron_ssm" / "assets" / "tiny-mamba2"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _tool(name: str):
    """tools/NAME.py imported as a module (its main() not run)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=600) -> str:
    out = subprocess.run([*args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """The shipped tiny Mamba-2 converted for TP 1 and 2 (fp32)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for tp in (1, 2):
        out[tp] = root / f"tp{tp}"
        _run(sys.executable, "tools/convert_hf.py", "--load-dir", str(ASSET), "--save-dir", str(out[tp]),
             "--tp", str(tp), "--dtype", "float32")
    return out


# ---- benchmark_report.py ----------------------------------------------------------------------------

def _bench_row(**kw):
    row = dict(model="m", impl="megatron-ssm", tp=1, batch=4, prompt=64, new=8, ttft_ms=10.0, step_ms=2.0,
               gen_tok_s=100.0, total_tok_s=100.0, peak_mem_gb=1.0)
    return {**row, **kw}


def test_benchmark_report_speed_ups(tmp_path, monkeypatch, capsys):
    rows = [_bench_row(tp=2, total_tok_s=180.0), _bench_row(), _bench_row(impl="mamba-ssm", total_tok_s=150.0),
            _bench_row(batch=8, tp=4, total_tok_s=50.0)]  # no TP=1 run of this workload: no speed-up
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    report = _tool("benchmark_report")
    monkeypatch.setattr(sys, "argv", ["benchmark_report.py", str(path)])
    report.main()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| m |")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    # (impl, TP, batch, speed-up against our TP=1 of the same workload), ours first, by TP
    assert [(c[1], c[2], c[3], c[12]) for c in cells] == [
        ("megatron-ssm", "1", "4", "1.00x"), ("megatron-ssm", "2", "4", "1.80x"), ("mamba-ssm", "1", "4", "1.50x"),
        ("megatron-ssm", "4", "8", "nanx")]
    assert report.load([path])[2]["impl"] == "mamba-ssm" and report.load([path])[0]["impl"] == "megatron-ssm"


def test_benchmark_report_plots(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_bench_row(), _bench_row(tp=2, total_tok_s=180.0), _bench_row(batch=8, gen_tok_s=170.0)]
    written = _tool("benchmark_report").plots(rows, tmp_path)
    assert [p.name for p in written] == ["speedup_vs_tp.png", "throughput_vs_batch.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


# ---- make_synthetic_checkpoint.py ---------------------------------------------------------------------

TINY_PRESETS = {
    "tiny-falcon": ("hf", {
        "architectures": ["FalconMambaForCausalLM"], "model_type": "falcon_mamba", "hidden_size": 64,
        "num_hidden_layers": 3, "intermediate_size": 128, "state_size": 8, "conv_kernel": 4, "time_step_rank": 4,
        "vocab_size": 300, "use_bias": False, "use_conv_bias": True, "layer_norm_epsilon": 1e-5,
        "mixer_rms_eps": 1e-6, "residual_in_fp32": True, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 11, "pad_token_id": 11, "torch_dtype": "bfloat16"}),
    "tiny-mamba2": ("mamba-ssm", {
        "d_model": 64, "d_intermediate": 0, "n_layer": 3, "vocab_size": 300, "ssm_cfg": {"layer": "Mamba2", "headdim": 16},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": True}),
}


def _synthetic(monkeypatch, tmp_path, preset, *extra):
    tool = _tool("make_synthetic_checkpoint")
    monkeypatch.setattr(tool, "PRESETS", TINY_PRESETS)
    out = tmp_path / f"{preset}-{len(list(tmp_path.iterdir()))}"
    assert tool.main(["--preset", preset, "--out", str(out), *extra]) == 0
    return out


def _check_values(name, t):
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        assert torch.all(t == 1), name
    elif t.numel() >= 1000:
        std = t.float().std().item()
        assert 0.018 < std < 0.022 and abs(t.float().mean().item()) < 0.003, (name, std)


def test_synthetic_hf_checkpoint_has_the_configs_shapes(monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from megatron_ssm.checkpoint.hf import hf_name
    from megatron_ssm.checkpoint.partition import hf_shapes
    from megatron_ssm.config import SSMConfig

    out = _synthetic(monkeypatch, tmp_path, "tiny-falcon", "--layers", "2")
    cfg = SSMConfig.from_hf_dir(out)
    assert cfg.num_layers == 2 and cfg.family == "falcon_mamba"
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    want = {hf_name(n): s for n, s in hf_shapes(cfg).items()}
    assert {n: tuple(t.shape) for n, t in tensors.items()} == want
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    for name, t in tensors.items():
        _check_values(name, t)
    again = _synthetic(monkeypatch, tmp_path, "tiny-falcon", "--layers", "2")
    seeded = {}
    for f in sorted(again.glob("*.safetensors")):
        seeded.update(load_file(f))
    assert all(torch.equal(seeded[n], tensors[n]) for n in tensors), "same seed, other values"
    other = _synthetic(monkeypatch, tmp_path, "tiny-falcon", "--layers", "2", "--seed", "1")
    changed = {}
    for f in sorted(other.glob("*.safetensors")):
        changed.update(load_file(f))
    assert not torch.equal(changed["backbone.embeddings.weight"], tensors["backbone.embeddings.weight"])


def test_synthetic_mamba_ssm_checkpoint_reads_back(monkeypatch, tmp_path):
    from megatron_ssm.checkpoint.mamba_ssm import config_from_mamba_ssm
    from megatron_ssm.checkpoint.partition import hf_shapes

    out = _synthetic(monkeypatch, tmp_path, "tiny-mamba2")
    raw = json.loads((out / "config.json").read_text())
    assert raw == TINY_PRESETS["tiny-mamba2"][1]
    cfg = config_from_mamba_ssm(raw, "float32")
    state = torch.load(out / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert state["backbone.embedding.weight"].shape == (cfg.vocab_size, 64)
    assert torch.equal(state["lm_head.weight"], state["backbone.embedding.weight"])  # tied, listed twice
    shapes = hf_shapes(cfg)
    assert len(state) == len(shapes) + 1
    assert tuple(state["backbone.layers.2.mixer.in_proj.weight"].shape) == shapes["layers.2.mixer.in_proj.weight"]
    for name, t in state.items():
        assert t.dtype == torch.float32, name
        _check_values(name, t)


# ---- profile_step.py, allreduce_accuracy.py: whole runs on the tiny model ------------------------------------

def test_profile_step_on_cpu(tiny_ckpts):
    out = _run(sys.executable, "tools/profile_step.py", "--load", str(tiny_ckpts[1]), "--batch", "2", "--steps", "3",
               "--prompt", "8", "--dtype", "float32", "--top", "40")
    head = re.search(r"decode, batch 2, TP=1, 3 steps: ([\d.]+) ms self time per step, ([\d.]+)% in collectives", out)
    assert head and float(head.group(1)) > 0 and float(head.group(2)) == 0.0, out[:2000]
    layers = json.loads((ASSET / "config.json").read_text())["num_hidden_layers"]
    # per decode step and layer: in_proj and out_proj; plus the LM head
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(aten::\w+)\s.*?\s(\d+)\s*$", out, re.M)}
    assert calls.get("aten::mm") == 3 * (2 * layers + 1), calls


def test_profile_step_packed_prefill_on_cpu(tiny_ckpts):
    """--pack: 3 prompts of 8 tokens in packs of at most 16 tokens are two forwards a step (2 prompts,
    then 1), each with in_proj and out_proj per layer and one LM head over the packs' last positions."""
    out = _run(sys.executable, "tools/profile_step.py", "--load", str(tiny_ckpts[1]), "--phase", "prefill", "--batch", "3",
               "--prompt", "8", "--pack", "16", "--steps", "3", "--dtype", "float32", "--top", "60")
    assert re.search(r"prefill, batch 3, packs of 2 prompts, TP=1, 3 steps: [\d.]+ ms self time per step", out), out[:2000]
    layers = json.loads((ASSET / "config.json").read_text())["num_hidden_layers"]
    calls = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s*(aten::\w+)\s.*?\s(\d+)\s*$", out, re.M)}
    assert calls.get("aten::mm") == 3 * 2 * (2 * layers + 1), calls


def _hf_perplexity(window: int, windows: int) -> float:
    from transformers import AutoModelForCausalLM

    from megatron_ssm.tokenizer import Tokenizer

    ids = Tokenizer(str(ASSET)).encode((ASSET / "heldout.txt").read_text())
    text = torch.tensor(ids[: windows * window]).view(windows, window)
    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(text, use_cache=False).logits[:, :-1].double(), -1)
    return math.exp(-logp.gather(-1, text[:, 1:, None]).mean().item())


def test_allreduce_accuracy_at_tp2(tiny_ckpts):
    out = _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "tools/allreduce_accuracy.py", "--load", str(tiny_ckpts[2]), "--text", str(ASSET / "heldout.txt"),
               "--variants", "exact,int8", "--window", "48", "--windows", "3", "--prompts", "2", "--new-tokens", "6")
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in out.splitlines()
                              if re.match(r"\| (exact|int8) \|", line))}
    assert set(rows) == {"exact", "int8"}, out
    exact, int8 = rows["exact"], rows["int8"]
    assert exact[1] == "2" and exact[3] == "+0.000%" and exact[4] == "100.00%" and exact[5] == "100.00%", exact
    want = _hf_perplexity(48, 3)
    assert abs(float(exact[2]) - want) < 1e-3 * want, (exact, want)  # the exact model is HF's model
    assert abs(float(int8[2]) / want - 1) < 0.02 and float(int8[4].rstrip("%")) > 90, int8


def test_prefix_reuse_ttft_on_cpu(tiny_ckpts):
    """The tool asserts that a prefix hit gives a miss's tokens and that the hit happened; its summary
    line names the sizes it was given."""
    out = _run(sys.executable, "tools/prefix_reuse_ttft.py", "--load", str(tiny_ckpts[1]), "--text",
               str(ASSET / "heldout.txt"), "--shared", "40", "--tail", "6", "--block", "16", "--trials", "1")
    line = re.search(r"TP=1 prompt 40\+6 tokens, block 16: TTFT miss ([\d.]+) ms, hit ([\d.]+) ms .*1 trials, same tokens",
                     out)
    assert line and float(line.group(1)) > 0 and float(line.group(2)) > 0, out



# ---- serving_benchmark.py ---------------------------------------------------------------------------

def test_serving_throughput_within_a_ttft_budget():
    sb = _tool("serving_benchmark")
    rows = [dict(impl="a", ttft_p99_ms=100.0, throughput_tok_s=50.0),
            dict(impl="a", ttft_p99_ms=900.0, throughput_tok_s=400.0),
            dict(impl="a", ttft_p99_ms=3000.0, throughput_tok_s=700.0),
            dict(impl="b", ttft_p99_ms=400.0, throughput_tok_s=30.0),
            dict(impl="b", ttft_p99_ms=200.0, throughput_tok_s=90.0)]  # a higher rate can be worse
    assert sb.throughput_within(rows, 99.0) == {"a": 0.0, "b": 0.0}
    assert sb.throughput_within(rows, 500.0) == {"a": 50.0, "b": 90.0}
    assert sb.throughput_within(rows, 1000.0) == {"a": 400.0, "b": 90.0}
    assert sb.throughput_within(rows, 1e9) == {"a": 700.0, "b": 90.0}


def test_serving_benchmark_on_cpu(tiny_ckpts, tmp_path):
    out = _run(sys.executable, "tools/serving_benchmark.py", "--load", str(tiny_ckpts[1]), "--device", "cpu",
               "--dtype", "float32", "--rates", "50,400", "--requests", "6", "--prompt-min", "4", "--prompt-max", "24",
               "--new-min", "2", "--new-max", "5", "--max-batch", "4", "--json-out", str(tmp_path / "s.jsonl"),
               "--budgets", "1e9")
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [r["rate"] for r in rows] == [50.0, 400.0], rows
    for r in rows:
        assert r["requests"] == 6 and 6 <= r["generated"] <= 30, r  # every request answered, none past its max
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["throughput_tok_s"] > 0, r
    best = max(r["throughput_tok_s"] for r in rows)
    assert re.search(rf"<= 1000000000 ms \| {best:.0f}\b", out), out



def _rank_ablate_step_patches() -> list[str]:
    """ablate_step.py's variants on tiny Mamba-1 and Mamba-2 models: each changes the step (its
    stand-ins replace ops the decode step really calls, else a GPU run would time the whole step
    under a stage's name), and leaving it restores the model (a step from the same states then
    equals the step before any patching)."""
    import contextlib
    import dataclasses

    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.model.lm import MambaLM
    from megatron_ssm.parallel import tp_context

    ablate = _tool("ablate_step")
    tp = tp_context(torch.device("cpu"))
    tiny = {"falcon-mamba-7b": dict(hidden_size=16, intermediate_size=32, num_layers=2, time_step_rank=4,
                                    vocab_size=64),
            "mamba2-2.7b": dict(hidden_size=16, intermediate_size=32, num_layers=2, vocab_size=64, head_dim=8,
                                num_heads=4)}
    variants = {"falcon-mamba-7b": ["in_proj", "conv", "x_proj", "dt_proj", "update", "out_proj", "x_proj+dt_proj",
                                    "add_norm"],
                "mamba2-2.7b": ["in_proj", "conv", "update", "norm", "out_proj", "conv+update+norm", "add_norm"]}
    done = []
    for name, sizes in tiny.items():
        _, cfg = ablate.load_config(str(ROOT / "configs" / f"{name}.yaml"))
        cfg = dataclasses.replace(cfg, **sizes, pattern="M" * 2)
        torch.manual_seed(0)
        model = MambaLM(cfg, tp, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.3)
        ids = torch.randint(0, 64, (2, 1))

        def step(states):
            cache = StateCache(model.state_shapes(8), 2, dtype=model.dtype, device=tp.device)
            for layer, saved in zip(cache.layers, states):
                for k, t in layer.items():
                    t.copy_(saved[k])
            return model(ids, cache.rows(0, 2))

        states = [{k: torch.randn_like(t) for k, t in layer.items()}
                  for layer in StateCache(model.state_shapes(8), 2, dtype=model.dtype, device=tp.device).layers]
        with torch.no_grad():
            whole = step(states)
            for variant in variants[name]:
                with contextlib.ExitStack() as stack:
                    for stage in variant.split("+"):
                        ablate._patches(model, stage, stack)
                    cut = step(states)
                assert not torch.equal(cut, whole), f"{name} {variant}: the step did not change"
                assert torch.equal(step(states), whole), f"{name} {variant}: not restored"
                done.append(f"{name} {variant}")
    return done


def test_ablate_step_leaves_out_what_the_step_calls(ranks):
    done = ranks(1).run(_rank_ablate_step_patches)[0]
    assert len(done) == 15, done
