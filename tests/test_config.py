"""Reading HF configs and validating a TP degree: every refusal names the problem."""
import math

import pytest

from hf_models import hf_config
from megatron_ssm.config import ConfigError, SSMConfig


def _cfg(family, **kw):
    c = hf_config(family, **kw).to_dict()
    c["architectures"] = [{"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM",
                           "mamba2": "Mamba2ForCausalLM"}[family]]
    return SSMConfig.from_hf(c)


def test_families_and_fields():
    m1, f, m2 = _cfg("mamba"), _cfg("falcon_mamba"), _cfg("mamba2", n_groups=2, tied=False)
    assert (m1.family, f.family, m2.family) == ("mamba", "falcon_mamba", "mamba2")
    assert m1.time_step_rank == math.ceil(64 / 16) and m1.mixer_rms_eps is None
    assert f.mixer_rms_eps == pytest.approx(1e-6)
    assert (m2.num_heads, m2.head_dim, m2.n_groups, m2.chunk_size) == (8, 16, 2, 16)
    assert not m2.tie_word_embeddings and m2.time_step_limit == (0.0, math.inf)
    assert SSMConfig.from_dict(m2.to_dict()) == m2


@pytest.mark.parametrize("tp,ok", [(1, True), (2, True), (4, True), (8, True), (3, False), (16, False)])
def test_mamba2_tp_degrees(tp, ok):
    cfg = _cfg("mamba2", n_groups=2)
    if ok:
        cfg.validate(tp)
    else:
        with pytest.raises(ConfigError, match=f"TP degree {tp}"):
            cfg.validate(tp)


def test_groups_and_tp_must_nest():
    cfg = _cfg("mamba2", n_groups=2)
    cfg.n_groups = 4
    cfg.num_heads, cfg.head_dim, cfg.intermediate_size = 12, 16, 192
    with pytest.raises(ConfigError, match="one must divide the other"):
        cfg.validate(6)


def test_mamba1_channels_must_split():
    with pytest.raises(ConfigError, match="does not divide the 128 Mamba channels"):
        _cfg("mamba").validate(3)


def test_vocab_padding():
    cfg = _cfg("mamba", vocab=250)
    assert cfg.padded_vocab_size(1) == 256 and cfg.padded_vocab_size(4) == 512


def test_not_a_supported_config():
    with pytest.raises(ConfigError, match="not a supported model config"):
        SSMConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 8})
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        SSMConfig.from_hf({"model_type": "mamba", "hidden_size": 8, "vocab_size": 10})
