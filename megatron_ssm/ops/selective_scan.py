"""Mamba-1 selective scan (per channel, diagonal A of shape [d, n]) and its one-token update."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .varlen import check_packed, split_packed


def discretize_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None,
                  dt_limit: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor:
    """softplus(dt + dt_bias) in fp32, clamped to dt_limit (Mamba-2's time_step_limit) when it is set."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u, dt, z [b, L, d]; A [d, n] (negative); B, C [b, L, n]; D, dt_bias [d]; state [b, d, n] fp32.

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t;  y_t = C_t h_t + D u_t, gated by silu(z_t).
    dt is softplus(dt + dt_bias). Returns (y [b, L, d] in u's dtype, final state [b, d, n] fp32).
    With cu_seqlens (ops/varlen.py) the one row packs sequences, each from a zero state; the final
    state is then [nseq, d, n].
    """
    if cu_seqlens is not None:
        check_packed(u, cu_seqlens, initial_state)
        cut = lambda t, s, e: None if t is None else t[:, s:e]  # noqa: E731
        parts = [selective_scan(u[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, cut(z, s, e), dt_bias)
                 for s, e in split_packed(cu_seqlens)]
        return torch.cat([y for y, _ in parts], 1), torch.cat([h for _, h in parts], 0)
    b, L, d = u.shape
    dt = discretize_dt(dt, dt_bias)
    A = A.float()
    uf = u.float()
    dA = torch.exp(dt.unsqueeze(-1) * A)  # [b, L, d, n]
    dBu = (dt * uf).unsqueeze(-1) * B.float().unsqueeze(2)
    h = u.new_zeros(b, d, A.shape[-1], dtype=torch.float32) if initial_state is None else initial_state.float()
    Cf = C.float()
    ys = []
    for t in range(L):
        h = dA[:, t] * h + dBu[:, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, t]))
    y = torch.stack(ys, dim=1) if ys else uf.new_zeros(b, 0, d)
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


def selective_state_update(
    state: torch.Tensor,
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step. state [b, d, n] (advanced in place); u, dt, z [b, d]; B, C [b, n]. Returns y [b, d]."""
    dt = discretize_dt(dt, dt_bias)
    uf = u.float()
    h = torch.exp(dt.unsqueeze(-1) * A.float()) * state.float() + (dt * uf).unsqueeze(-1) * B.float().unsqueeze(1)
    state.copy_(h)
    y = torch.einsum("bdn,bn->bd", h, C.float())
    if D is not None:
        y = y + uf * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype)
