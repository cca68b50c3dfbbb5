"""Joining spans of one sequence that were scanned independently (context-parallel prefill).

A selective SSM's recurrence h_t = a_t * h_{t-1} + u_t is linear in the state, so a span scanned
from a zero state is off from the true scan only by the state h_in that enters it:

    h_t = P_t * h_in + h_t(from zero),    P_t = a_1 * ... * a_t  (decay from the span's start to t)
    y_t = y_t(from zero) + C_t . (P_t * h_in)

For spans j = 0, 1, ... with total decay D_j = P_end and final state S_j (from zero, or from the
real initial state for span 0), the entering states follow h_in_0 = 0, h_in_{j+1} = D_j h_in_j + S_j,
and the sequence's final state is D_last h_in_last + S_last. So spans only exchange (D_j, S_j), whose
size does not depend on the span length, and correct their outputs without re-running the scan.

Mamba-2: a_t = exp(dt_t A_h), a scalar per head, so P_t is [b, L, heads]. Mamba-1: a_t =
exp(dt_t A_dn) per channel and state index; since A is constant in time, P_t = exp(A * cumsum(dt))
needs only the cumulative dt [b, L, d]. conv1d needs the K-1 inputs before a span (`conv_window`).
"""
from __future__ import annotations

import torch

from .selective_scan import discretize_dt


def entry_states(decays: list[torch.Tensor], finals: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """decays[j] (broadcastable to finals[j]) and finals[j] of consecutive spans -> (the state entering
    each span, the state after the last). The first span's entering state is zero: it scanned from
    the sequence's own initial state already."""
    h = torch.zeros_like(finals[0])
    entering = []
    for decay, final in zip(decays, finals):
        entering.append(h)
        h = decay * h + final
    return entering, h


def ssd_log_decay(dt: torch.Tensor, A: torch.Tensor, dt_bias: torch.Tensor | None,
                  dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """Mamba-2's log of P_t: cumsum over the span of dt_t * A per head. dt [b, L, h] raw -> [b, L, h] fp32."""
    return torch.cumsum(discretize_dt(dt, dt_bias, dt_limit) * A.float(), dim=1)


def ssd_entry_correction(C: torch.Tensor, log_decay: torch.Tensor, h_in: torch.Tensor) -> torch.Tensor:
    """What the state h_in [b, h, p, n] entering a span adds to its Mamba-2 outputs:
    C [b, L, g, n], log_decay [b, L, h] -> [b, L, h, p] fp32 (heads grouped as the scan groups them)."""
    b, L, g, n = C.shape
    h, p = h_in.shape[1:3]
    grouped = h_in.float().view(b, g, h // g, p, n)
    out = torch.einsum("blgn,bgkpn->blgkp", C.float(), grouped).reshape(b, L, h, p)
    return out * torch.exp(log_decay).unsqueeze(-1)


def selective_scan_cum_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None) -> torch.Tensor:
    """Mamba-1's cumulative discretised dt over the span: [b, L, d] raw -> [b, L, d] fp32; P_t = exp(A * it)."""
    return torch.cumsum(discretize_dt(dt, dt_bias), dim=1)


def selective_scan_entry_correction(C: torch.Tensor, cum_dt: torch.Tensor, A: torch.Tensor, h_in: torch.Tensor,
                                    max_elements: int = 1 << 26) -> torch.Tensor:
    """What the state h_in [b, d, n] entering a span adds to Mamba-1's (ungated) outputs:
    C [b, L, n], cum_dt [b, L, d], A [d, n] -> [b, L, d] fp32. The decay is per channel and state
    index, so it is formed [b, T, d, n] for T time steps at a time (bounded memory at any length)."""
    b, L, d = cum_dt.shape
    n = A.shape[-1]
    step = max(1, max_elements // max(1, b * d * n))
    A, h_in, C = A.float(), h_in.float(), C.float()
    parts = []
    for t in range(0, L, step):
        decayed = torch.exp(cum_dt[:, t:t + step].unsqueeze(-1) * A) * h_in.unsqueeze(1)  # [b, T, d, n]
        parts.append(torch.einsum("btdn,btn->btd", decayed, C[:, t:t + step]))
    return torch.cat(parts, dim=1) if parts else cum_dt.new_zeros(b, 0, d)


def conv_tail(x: torch.Tensor, width: int) -> torch.Tensor:
    """The last `width` inputs of a span, x [b, L, C] -> [b, C, width], zero-padded on the left when the
    span is shorter (`conv_window` then takes only the real ones)."""
    tail = x[:, -width:].transpose(1, 2) if width else x.new_zeros(x.shape[0], x.shape[2], 0)
    return torch.nn.functional.pad(tail, (width - tail.shape[-1], 0))


def conv_window(prior: torch.Tensor, tails: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    """The K-1 conv inputs before the span that follows spans with `tails` (from `conv_tail`) of these
    lengths, which follow the inputs `prior` [b, C, K-1]. Spans shorter than K-1 reach further back."""
    width = prior.shape[-1]
    pieces = [prior] + [t[..., width - min(n, width):] for t, n in zip(tails, lengths)]
    if not width:
        return prior
    return torch.cat([p.to(prior.dtype) for p in pieces], dim=-1)[..., -width:].contiguous()  # kernels want it dense
