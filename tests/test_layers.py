"""Small pieces of the model layers that the end-to-end comparisons with HF would not pin down."""
from __future__ import annotations

import torch
import torch.nn as nn

from megatron_ssm.model.layers import decay_rates


def test_decay_rates_follow_in_place_weight_updates():
    """A = -exp(A_log) is cached, and recomputed after A_log is written in place (a checkpoint load)."""
    mixer = nn.Module()
    mixer.A_log = nn.Parameter(torch.randn(5, 3), requires_grad=False)
    first = decay_rates(mixer)
    assert torch.equal(first, -torch.exp(mixer.A_log))
    assert decay_rates(mixer) is first  # cached: no kernels on later calls
    new = torch.randn(5, 3)
    with torch.no_grad():
        mixer.A_log.copy_(new)
    assert torch.equal(decay_rates(mixer), -torch.exp(new))
