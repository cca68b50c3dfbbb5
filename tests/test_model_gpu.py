"""The whole model on one GPU: dispatch kernels and CUDA-graph decode against the torch reference
ops and HF. Single process (TP=1); torchrun-level GPU runs live in tools/gpu_sweep.sh."""
from __future__ import annotations

import pytest
import torch

from hf_models import build_hf_model, fresh_seed, hf_config, hf_logits, per_group_gated_norm, save_hf
from megatron_ssm.checkpoint.convert import convert

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tp():
    from megatron_ssm.parallel import init_distributed, shutdown

    yield init_distributed(device=torch.device("cuda", 0))
    # NCCL's process group left to the interpreter's exit printed "destroy_process_group() was not
    # called" and an xdist worker then hung past its last test (session 10, call 1)
    shutdown()


def _errors_torch_ops_and_kernels(model, ids, ref, monkeypatch) -> tuple[float, float]:
    """The model's max error against HF's logits `ref` (relative to their largest), with the torch
    reference ops on the GPU, then with the dispatch kernels."""
    with torch.no_grad():
        ours = model(ids.cuda())[..., :250].float().cpu()
        monkeypatch.setenv("MEGATRON_SSM_KERNELS", "torch")
        torch_ops = model(ids.cuda())[..., :250].float().cpu()
        monkeypatch.delenv("MEGATRON_SSM_KERNELS")
    scale = ref.abs().max().item()
    return tuple((x - ref).abs().max().item() / scale for x in (torch_ops, ours))


# mamba2 with one group: its one-row decode step runs inside out_proj's launch (mamba2_step_into_entry,
# MEGATRON_SSM_STEP_INTO_EXIT=1 here)
@pytest.mark.parametrize("family,opts", [("mamba", {}), ("falcon_mamba", {}), ("mamba2", {"n_groups": 2}),
                                         ("mamba2", {"n_groups": 1})], ids=["mamba", "falcon_mamba", "mamba2", "mamba2-g1"])
def test_gpu_model_matches_hf_and_reference_ops(tp, tmp_path, monkeypatch, family, opts):
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.model.load import load_model

    if opts.get("n_groups") == 1:  # the opt-in path this case is for (off by default)
        from megatron_ssm.ops.dispatch import STEP_INTO_EXIT_ENV

        monkeypatch.setenv(STEP_INTO_EXIT_ENV, "1")
    seed = fresh_seed()
    hf = build_hf_model(hf_config(family, **opts), seed)
    convert(save_hf(hf, tmp_path / "hf"), tmp_path / "ckpt", 1, progress=False)
    ids = torch.randint(3, 250, (2, 70), generator=torch.Generator().manual_seed(seed))
    if family == "mamba2":
        # transformers < 5.2x (the GPU machine's 5.17) normalised Mamba-2's gated norm over all groups
        # at once; mamba-ssm and later transformers per group. The test's own per-group norm makes
        # HF the reference at any version.
        per_group_gated_norm(hf)
    ref = hf_logits(hf, ids)
    model = load_model(tmp_path / "ckpt", tp)  # fp32, our kernels
    err_torch, err_ours = _errors_torch_ops_and_kernels(model, ids, ref, monkeypatch)
    assert err_torch < 1e-3, f"torch reference ops vs HF: relative error {err_torch} (seed {seed})"
    assert err_ours < 5e-3, f"dispatch kernels vs HF: relative error {err_ours} (torch ops: {err_torch}, seed {seed})"  # tf32 in SSD

    prompts = [ids[0, :9].tolist(), ids[1, :3].tolist(), ids[0, 20:41].tolist()]
    graphed = Engine(model, EngineConfig(max_batch=4, cuda_graphs=True, decode_ahead=False)).generate(
        [Request(p, 12) for p in prompts])
    eager = Engine(model, EngineConfig(max_batch=4, cuda_graphs=False, decode_ahead=False)).generate(
        [Request(p, 12) for p in prompts])
    assert graphed == eager, f"seed {seed}: CUDA-graph prefill and decode {graphed} != eager {eager}"
    ahead = Engine(model, EngineConfig(max_batch=4, decode_ahead=True)).generate([Request(p, 12) for p in prompts])
    assert ahead == eager, f"seed {seed}: graphed decode steps launched ahead {ahead} != eager {eager}"
    # Rows finishing at different steps (the graph's bucket goes 4 -> 2 -> 1) and a sampled row among
    # greedy ones: a graph feeds its own greedy tokens back only while they are the step's tokens.
    from megatron_ssm.inference.sampling import SamplingParams

    def mixed(**cfg):
        reqs = [Request(prompts[0], 5), Request(prompts[1], 14, SamplingParams(temperature=1.0, seed=seed)),
                Request(prompts[2], 9)]
        return Engine(model, EngineConfig(max_batch=4, **cfg)).generate(reqs)

    mixed_eager = mixed(cuda_graphs=False, decode_ahead=False)
    for cfg in ({"decode_ahead": True}, {"decode_ahead": False}):
        assert mixed(cuda_graphs=True, **cfg) == mixed_eager, f"seed {seed}: graphed {cfg} != eager, mixed rows"
    # The graphs above chain their kernels by programmatic dependent launch (on by default on
    # Hopper, ops/triton/pdl.py); without it, the same tokens.
    from megatron_ssm.ops.triton import pdl

    if torch.cuda.get_device_capability()[0] >= 9:
        assert pdl.supported(torch.device("cuda", 0)), "programmatic dependent launch refused on Hopper"
    monkeypatch.setenv(pdl.ENV, "0")
    unchained = Engine(model, EngineConfig(max_batch=4, cuda_graphs=True)).generate([Request(p, 12) for p in prompts])
    monkeypatch.delenv(pdl.ENV)
    assert unchained == eager, f"seed {seed}: CUDA graphs without PDL {unchained} != eager {eager}"
    if family == "mamba2":  # the fused decode step (one kernel from conv to gated norm) at every batch, chained by PDL too
        from megatron_ssm.ops.dispatch import FUSED_DECODE_ENV, MAMBA2_FUSED_ROWS_ENV

        monkeypatch.setenv(FUSED_DECODE_ENV, "1")
        monkeypatch.setenv(MAMBA2_FUSED_ROWS_ENV, "64")
        fused = [Engine(model, EngineConfig(max_batch=4, cuda_graphs=graphs)).generate([Request(p, 12) for p in prompts])
                 for graphs in (True, False)]
        monkeypatch.delenv(FUSED_DECODE_ENV)
        monkeypatch.delenv(MAMBA2_FUSED_ROWS_ENV)
        assert fused[0] == fused[1], f"seed {seed}: fused Mamba-2 decode, graphed {fused[0]} != eager {fused[1]}"
    # The packed forward (the engine's prefill, also what the graphs replay) against each prompt alone:
    # logits, not greedy tokens, since tf32 in the SSD kernels may flip a near-tie.
    from megatron_ssm.ops.varlen import cu_seqlens_of

    with torch.no_grad():
        packed = model(torch.tensor([sum(prompts, [])]).cuda(), cu_seqlens=cu_seqlens_of([len(p) for p in prompts], "cuda"))
        alone = torch.cat([model(torch.tensor([p]).cuda()) for p in prompts], 1)
    err = (packed[..., :250] - alone[..., :250]).abs().max().item() / alone[..., :250].abs().max().item()
    assert err < 5e-3, f"seed {seed}: packed forward vs each prompt alone: relative error {err}"
    bf16 = load_model(tmp_path / "ckpt", tp, dtype=torch.bfloat16)
    with torch.no_grad():
        low = bf16(ids.cuda())[..., :250].float().cpu()
    agree = (low.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, f"seed {seed}: bf16 top-1 agreement with HF fp32: {agree}"


@pytest.mark.parametrize("family", ["nemotron_h", "falcon_h1", "zamba", "zamba2"])
def test_gpu_hybrid_matches_hf_and_graphed_decode_covers_attention(tp, tmp_path, monkeypatch, family):
    """A hybrid on the GPU: prefill against HF, the packed forward against each prompt alone (where the
    family packs), and CUDA graphs (the packed prefill of fresh prompts, decode with attention over the
    fixed-size KV cache, lengths as tensors) against eager runs, with prefix reuse on so a graphed step
    also follows a restored KV prefix."""
    from hf_models import build_varied_hf_model, hybrid_config, zamba_config
    from megatron_ssm.inference.engine import Engine, EngineConfig, Request
    from megatron_ssm.model.load import load_model

    if family.startswith("zamba"):  # shared blocks applied at several positions, each its own KV cache
        hf = build_varied_hf_model(zamba_config(family), fresh_seed())
    else:
        hf = build_hf_model(hybrid_config(family), fresh_seed())
    convert(save_hf(hf, tmp_path / "hf"), tmp_path / "ckpt", 1, progress=False)
    ids = torch.randint(3, 250, (2, 70))
    ref = hf_logits(hf, ids)
    model = load_model(tmp_path / "ckpt", tp)
    err_torch, err = _errors_torch_ops_and_kernels(model, ids, ref, monkeypatch)
    assert err_torch < 1e-3, f"torch reference ops on the GPU vs HF: relative error {err_torch}"
    # The kernels' error is the SSD scan's tf32 dots (mamba-ssm's): the torch ops on the same GPU
    # are within 2e-5 of HF. Zamba2's varied weights (std 1/sqrt(fan_in), build_varied_hf_model)
    # make it larger: 9.3e-3, 1.2e-2 and 2.4e-2 on the H200 for three seeds (2026-12-01), against
    # < 5e-3 for the other families. At the third (3000416144) the same run with only the chunk scan
    # on the torch reference passed this check, and with only the rotary embedding on it did not
    # (2.4e-2 again): the scan, not our kernels (session 8, docs/benchmarks.md).
    bound = 3e-2 if family == "zamba2" else 5e-3
    assert err < bound, f"GPU hybrid (kernels) vs HF: relative error {err} (torch ops: {err_torch})"
    prompts = [ids[0, :9].tolist(), ids[1, :3].tolist(), ids[0, :21].tolist()]
    if model.packs_sequences:  # Nemotron-H, Falcon-H1: attention within each packed sequence
        from megatron_ssm.ops.varlen import cu_seqlens_of

        with torch.no_grad():
            packed = model(torch.tensor([sum(prompts, [])]).cuda(),
                           cu_seqlens=cu_seqlens_of([len(p) for p in prompts], "cuda"))[..., :250]
            alone = torch.cat([model(torch.tensor([p]).cuda()) for p in prompts], 1)[..., :250]
        rel = (packed - alone).abs().max().item() / alone.abs().max().item()
        assert rel < 5e-3, f"packed forward vs each prompt alone: relative error {rel}"
    runs = {}
    for graphs in (True, False):
        eng = Engine(model, EngineConfig(max_batch=4, cuda_graphs=graphs, max_sequence_length=64, prefix_block=8,
                                         prefix_cache_bytes=1 << 24))
        runs[graphs] = eng.generate([Request(p, 12) for p in prompts]) + eng.generate([Request(prompts[2], 12)])
    assert runs[True] == runs[False], f"CUDA-graph decode {runs[True]} != eager {runs[False]}"
