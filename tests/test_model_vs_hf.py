"""Our model at TP 1, 2 and 4 against HF transformers' own Mamba / FalconMamba / Mamba2 code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from hf_models import build_hf_model, converted_models, fresh_seed, hf_config, hf_greedy, hf_logits, per_group_gated_norm

TOL = 1e-4


# ---- run on every rank -------------------------------------------------------------------------

def _rank_logits(ckpt: str, input_ids: torch.Tensor):
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    model = load_model(ckpt, tp)
    with torch.no_grad():
        full = gather_logits(model(input_ids), model.cfg.vocab_size, tp)
    return full if tp.is_first else None


def _rank_prefill_then_decode(ckpt: str, input_ids: torch.Tensor, split: int, overlap: bool = False):
    """Logits of positions split.. computed by prefilling [:split] then decoding one token at a time.
    overlap: the prefill runs as two micro-chunks with overlapped all-reduces, and all its positions'
    logits are returned too (positions 0..)."""
    from megatron_ssm.inference.cache import StateCache
    from megatron_ssm.inference.sampling import gather_logits
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    tp = tp_context(torch.device("cpu"))
    model = load_model(ckpt, tp)
    model.overlap_min_tokens = 1 if overlap else 0
    b, L = input_ids.shape
    cache = StateCache(model.state_shapes(), b, dtype=model.dtype, device=torch.device("cpu"))
    states = cache.rows(0, b)
    with torch.no_grad():
        prefill = model(input_ids[:, :split], states)
        outs = [prefill if overlap else prefill[:, -1:]]
        for t in range(split, L - 1):
            outs.append(model(input_ids[:, t:t + 1], states))
        full = gather_logits(torch.cat(outs, dim=1), model.cfg.vocab_size, tp)
    return full if tp.is_first else None


def _rank_decode_through_gemv(ckpt: str, input_ids: torch.Tensor, split: int):
    """_rank_prefill_then_decode with every linear of at most GEMV_MAX_ROWS rows in the skinny-GEMM
    kernel (Triton's interpreter, on CPU)."""
    import os

    from megatron_ssm.ops.dispatch import ENTRY_ROWS_ENV, LINEAR_ENV

    # every decode row's block entry inside its first projection's launch too (add_rms_norm_linear)
    os.environ.update({LINEAR_ENV: "triton", ENTRY_ROWS_ENV: "16"})
    try:
        return _rank_prefill_then_decode(ckpt, input_ids, split)
    finally:
        del os.environ[LINEAR_ENV], os.environ[ENTRY_ROWS_ENV]


def _rank_generate(ckpt: str, prompts: list[list[int]], new_tokens: int):
    from megatron_ssm.inference.generate import generate
    from megatron_ssm.model.load import load_model
    from megatron_ssm.parallel import tp_context

    model = load_model(ckpt, tp_context(torch.device("cpu")))
    return generate(model, prompts, new_tokens)


# ---- tests -------------------------------------------------------------------------------------

CASES = [
    pytest.param("mamba", dict(), id="mamba1"),
    pytest.param("mamba", dict(tied=False, use_bias=True), id="mamba1-untied-bias"),
    pytest.param("falcon_mamba", dict(), id="falcon"),
    pytest.param("mamba2", dict(n_groups=1), id="mamba2-g1"),
    pytest.param("mamba2", dict(n_groups=2, tied=True), id="mamba2-g2-tied"),
    pytest.param("mamba2", dict(n_groups=4, tied=False), id="mamba2-g4-untied"),
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(family, options) -> (hf model, {tp: checkpoint dir}), built once per case."""
    get = converted_models(tmp_path_factory, hf_config)

    def model_and_ckpts(family, opts):
        model, _, ckpts, _ = get(family, opts)
        return model, ckpts

    return model_and_ckpts


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", CASES)
def test_prefill_logits_match_hf(ranks, converted, family, opts, tp, seed):
    model, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (2, 37))  # 37: several Mamba-2 chunks of 16 plus a partial one
    ref = hf_logits(model, ids)
    ours = ranks(tp).run(_rank_logits, ckpts[tp], ids)[0]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed}: max |ours - HF| = {err}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2], CASES[3], CASES[5]])
def test_cached_decode_equals_full_recompute(ranks, converted, family, opts, tp, seed):
    model, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (3, 29))
    split = int(torch.randint(1, 20, ()).item())
    ref = hf_logits(model, ids)[:, split - 1:-1]
    ours = ranks(tp).run(_rank_prefill_then_decode, ckpts[tp], ids, split)[0]
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed}, split={split}: max |decode - full| = {err}"


def _rank_decode_step_into_exit(ckpt: str, input_ids: torch.Tensor, split: int):
    """_rank_prefill_then_decode with Mamba-2's one-row step handed to out_proj's consumer
    (mamba2_step_into_entry at TP 1, the step alone where out_proj reduces across ranks)."""
    import os

    from megatron_ssm.ops import dispatch

    calls = []
    ref = dispatch._REFERENCE["mamba2_step_into_entry"]
    dispatch._REFERENCE["mamba2_step_into_entry"] = lambda *a: calls.append(1) or ref(*a)
    os.environ[dispatch.STEP_INTO_EXIT_ENV] = "1"
    try:
        full = _rank_prefill_then_decode(ckpt, input_ids, split)
    finally:
        del os.environ[dispatch.STEP_INTO_EXIT_ENV]
        dispatch._REFERENCE["mamba2_step_into_entry"] = ref
    return None if full is None else (full, len(calls))


@pytest.mark.parametrize("tp", [1, 2])
def test_one_row_decode_with_the_step_into_exit_matches_hf(ranks, converted, tp, seed):
    """One row, so that Mamba-2's fused step runs: with MEGATRON_SSM_STEP_INTO_EXIT the step is left
    to the next block's entry (and the head) as a LazyInput; every decoded position as HF's."""
    model, ckpts = converted("mamba2", dict(n_groups=1))
    ids = torch.randint(0, 250, (1, 21))
    split = int(torch.randint(1, 12, ()).item())
    ref = hf_logits(model, ids)[:, split - 1:-1]
    ours, calls = ranks(tp).run(_rank_decode_step_into_exit, ckpts[tp], ids, split)[0]
    # TP 1: one fused op a layer a decoded token; TP 2: out_proj reduces across ranks, the step runs alone
    layers = model.config.num_hidden_layers
    assert calls == (layers * (ids.shape[1] - 1 - split) if tp == 1 else 0), f"{calls} fused ops (seed {seed})"
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed}, split={split}: max |decode - full| = {err}"


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[3]])
def test_decode_through_the_gemv_kernel_matches_hf(ranks, converted, family, opts, tp, seed):
    """Prefill (3 x 5 = 15 rows) and decode with the parallel linears and the LM head in the
    skinny-GEMM kernel, interpreted: column- and row-parallel (partial outputs all-reduced after),
    with the projections' biases (mamba1-untied-bias) and without."""
    from interpreter import interpreter_problem

    if problem := interpreter_problem():
        pytest.skip(problem)
    model, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (3, 8))
    ref = hf_logits(model, ids)[:, 4:-1]
    ours = ranks(tp).run(_rank_decode_through_gemv, ckpts[tp], ids, 5)[0]
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed}: max |decode through gemv - HF| = {err}"


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family,opts", [CASES[1], CASES[3]])
def test_greedy_generation_matches_hf_generate(ranks, converted, family, opts, tp):
    model, ckpts = converted(family, opts)
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (5, 1, 12)]
    expected = [hf_greedy(model, p, 8) for p in prompts]
    assert ranks(tp).run(_rank_generate, ckpts[tp], prompts, 8) == [expected] * tp, f"seed {seed}"


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family,opts", [CASES[0], CASES[2], CASES[3], CASES[5]])
def test_overlapped_prefill_matches_hf(ranks, converted, family, opts, tp, seed):
    """Prefill cut in two micro-chunks whose all-reduces are left in flight (async gloo here) gives
    HF's logits at every position, and leaves states that decode goes on from."""
    model, ckpts = converted(family, opts)
    ids = torch.randint(0, 250, (2, 41))
    split = int(torch.randint(2, 36, ()).item())
    ref = hf_logits(model, ids)[:, :-1]
    ours = ranks(tp).run(_rank_prefill_then_decode, ckpts[tp], ids, split, True)[0]
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < TOL * max(1.0, ref.abs().max().item()), f"seed {seed}, split={split}: max |overlapped - HF| = {err}"


@pytest.mark.parametrize("n_groups", [2, 4])
def test_per_group_norm_patch_is_hf_at_this_transformers(seed, n_groups):
    """The test's own per-group gated norm (the GPU test's HF reference at older transformers) gives
    this transformers' logits, and a norm over all groups at once does not."""
    model = build_hf_model(hf_config("mamba2", n_groups=n_groups), seed)
    ids = torch.randint(0, 250, (2, 19))
    ref = hf_logits(model, ids)
    per_group_gated_norm(model)
    assert torch.allclose(hf_logits(model, ids), ref, atol=1e-5), f"seed {seed}"
    per_group_gated_norm(model, groups=1)
    assert not torch.allclose(hf_logits(model, ids), ref, atol=1e-3), f"seed {seed}: one group equals {n_groups}"


_KERNELS_CALLED = '''
def _boom(*args, **kwargs):
    raise RuntimeError("a mamba-ssm kernel ran inside the HF reference")
selective_scan_fn = mamba_inner_fn = selective_state_update = _boom
mamba_chunk_scan_combined = mamba_split_conv1d_scan_combined = _boom
'''

_BUILD_EVERY_FAMILY = '''
import mamba_ssm, torch, hf_models
hf_models.import_hf_modeling_without_kernels()  # again: a no-op once done
configs = [hf_models.hf_config(f) for f in ("mamba", "falcon_mamba", "mamba2")]
configs += [hf_models.hybrid_config(f) for f in ("nemotron_h", "falcon_h1")]
configs += [hf_models.zamba_config(f) for f in ("zamba", "zamba2")]
for config in configs:
    logits = hf_models.hf_logits(hf_models.build_hf_model(config, 1), torch.randint(3, 250, (1, 7)))
    assert torch.isfinite(logits).all(), config.model_type
print("ok", len(configs))
'''


def test_hf_reference_is_hf_torch_code_where_mamba_ssm_is_installed(tmp_path):
    """transformers binds its SSM models to mamba-ssm's kernels when that package imports (the GPU
    machine has it, without its CUDA extension): hf_models imports HF's modeling with it hidden. Here
    a stand-in mamba_ssm whose every kernel raises is importable; each family's HF model must not
    call it."""
    import subprocess
    import sys

    (tmp_path / "mamba_ssm").mkdir()
    (tmp_path / "mamba_ssm" / "__init__.py").write_text(_KERNELS_CALLED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(Path(__file__).parent)]))
    done = subprocess.run([sys.executable, "-c", _BUILD_EVERY_FAMILY], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["ok", "7"], done.stderr[-3000:]
