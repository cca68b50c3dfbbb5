"""On CUDA with megatron-core and mamba-ssm's Triton kernels: megatron-core's own Mamba-2 model and
ours give the same logits and greedy tokens from one checkpoint that megatron-core wrote."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


@pytest.fixture(scope="module")
def mk():
    if importlib.util.find_spec("mamba_ssm") is None or importlib.util.find_spec("einops") is None:
        pytest.skip("needs mamba-ssm (Triton kernels) and einops for megatron-core's MambaMixer")
    import make_megatron_fixtures as mk

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mk.prepare_mamba_ssm()
    mk.init_megatron(7)
    return mk


@pytest.mark.parametrize("fmt", ["legacy", "torch_dist"])
def test_megatron_core_model_and_ours_agree(mk, fmt, tmp_path):
    model = mk.build_megatron_model(7)
    save = mk.save_legacy if fmt == "legacy" else mk.save_torch_dist
    save(model, mk.megatron_args(), tmp_path / fmt)
    prompt = torch.randint(0, mk.SHAPE["vocab"], (12,), generator=torch.Generator().manual_seed(7)).tolist()
    theirs = mk.megatron_logits(model, prompt).cpu()
    ours = mk.ours_logits(tmp_path / fmt, prompt).cpu()
    print(f"{fmt}: max |ours - megatron-core| = {(ours - theirs).abs().max():.3g}")
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
