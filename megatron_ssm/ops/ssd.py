"""Mamba-2 state-space duality (SSD): the chunked scan for prefill and the one-token update.

Heads share B and C within a group; A is one scalar per head. The chunked form computes, per chunk,
an attention-like intra-chunk term plus the contribution of the state carried into the chunk.

`ssd_chunk_scan` follows, step for step, the minimal SSD reference of the Mamba-2 paper's authors:
`ssd_minimal_discrete` and `segsum` in mamba-ssm's `mamba_ssm/modules/ssd_minimal.py` (Tri Dao and
Albert Gu, "Transformers are SSMs", 2024; mamba-ssm is Apache-2.0 licensed, Copyright (c) 2024 Tri Dao,
Albert Gu). Written again here with an initial state, groups (heads sharing B/C), D, dt's softplus,
bias and clamp, and chunk padding for any length; tests/test_ops.py checks it against a step-by-step
recurrence written from the equations, not against mamba-ssm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .selective_scan import discretize_dt
from .varlen import check_packed, split_packed


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., T] -> [..., T, T] with out[i, j] = sum(x[j+1..i]) for j <= i, -inf above the diagonal."""
    T = x.shape[-1]
    xe = x.unsqueeze(-1).expand(*x.shape, T)
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    cs = torch.cumsum(xe.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return cs.masked_fill(~keep, -torch.inf)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [b, L, h, p]; dt [b, L, h]; A, D, dt_bias [h]; B, C [b, L, g, n]; state [b, h, p, n] fp32.

    Returns (y [b, L, h, p] in x's dtype, final state [b, h, p, n] fp32). With cu_seqlens
    (ops/varlen.py) the one row packs sequences, each from a zero state; the final state is then
    [nseq, h, p, n].
    """
    if cu_seqlens is not None:
        check_packed(x, cu_seqlens, initial_state)
        parts = [ssd_chunk_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], chunk_size, D, dt_bias,
                                None, dt_limit) for s, e in split_packed(cu_seqlens)]
        return torch.cat([y for y, _ in parts], 1), torch.cat([f for _, f in parts], 0)
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    dt = discretize_dt(dt, dt_bias, dt_limit)
    xf = x.float()
    Bh = B.float().repeat_interleave(h // g, dim=2)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    pad = (-L) % chunk_size
    if pad:
        xf, dt, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, dt, Bh, Ch))
    nc = (L + pad) // chunk_size
    # chunks: [b, c, l, h, ...]
    xd = (xf * dt.unsqueeze(-1)).view(b, nc, chunk_size, h, p)
    Adt = (A.float() * dt).view(b, nc, chunk_size, h).permute(0, 3, 1, 2)  # [b, h, c, l]
    Bc = Bh.view(b, nc, chunk_size, h, n)
    Cc = Ch.view(b, nc, chunk_size, h, n)
    A_cum = torch.cumsum(Adt, dim=-1)

    # 1. within each chunk
    decay = torch.exp(_segsum(Adt))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", Cc, Bc) * decay
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xd)

    # 2. state each chunk adds at its end
    to_end = torch.exp(A_cum[..., -1:] - A_cum)  # [b, h, c, l]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, to_end, xd)

    # 3. carry states across chunks, starting from the initial state
    start = x.new_zeros(b, 1, h, p, n, dtype=torch.float32) if initial_state is None \
        else initial_state.float().unsqueeze(1)
    states = torch.cat([start, chunk_states], dim=1)  # [b, c+1, h, p, n]
    carry = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", carry, states)
    final_state = states[:, -1]

    # 4. output contribution of the state entering each chunk
    from_start = torch.exp(A_cum)  # [b, h, c, l]
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states[:, :-1], from_start)

    y = y.reshape(b, nc * chunk_size, h, p)[:, :L]
    if D is not None:
        y = y + x.float() * D.float().view(h, 1)
    return y.to(x.dtype), final_state


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
) -> torch.Tensor:
    """One decode step. state [b, h, p, n] (advanced in place); x [b, h, p]; dt [b, h]; B, C [b, g, n].

    Returns y [b, h, p]."""
    h = x.shape[1]
    g = B.shape[1]
    dt = discretize_dt(dt, dt_bias, dt_limit)
    Bh = B.float().repeat_interleave(h // g, dim=1)
    Ch = C.float().repeat_interleave(h // g, dim=1)
    xf = x.float()
    dA = torch.exp(dt * A.float())  # [b, h]
    new = state.float() * dA[..., None, None] + (dt.unsqueeze(-1) * xf).unsqueeze(-1) * Bh.unsqueeze(2)
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + xf * D.float().view(h, 1)
    return y.to(x.dtype)
