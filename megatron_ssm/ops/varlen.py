"""Packed ("varlen") batches: several sequences laid end to end in one [1, T, ...] row.

`cu_seqlens` [nseq + 1] (int32, on the device) holds the sequence boundaries: sequence i covers
tokens [cu_seqlens[i], cu_seqlens[i + 1]). Every op that mixes time (conv1d, the scans) restarts at
each boundary from a zero state, and returns one final state per sequence. The helpers here derive
what the kernels index by, on the device and without a host sync, so a packed forward can be
captured in a CUDA graph.
"""
from __future__ import annotations

import torch


def cu_seqlens_of(lengths: list[int], device) -> torch.Tensor:
    """[0, l0, l0 + l1, ...] as the int32 tensor the packed ops take."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def seq_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence each of `total` packed tokens belongs to: [total] int32."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True, out_int32=True)


def last_positions(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each sequence's last token: [nseq] int64 (a sequence must not be empty)."""
    return (cu_seqlens[1:] - 1).long()


def check_packed(x: torch.Tensor, cu_seqlens: torch.Tensor, initial_state) -> None:
    if x.shape[0] != 1:
        raise ValueError(f"packed sequences (cu_seqlens) come as one row of tokens, got batch {x.shape[0]}")
    if initial_state is not None:
        raise ValueError("packed sequences start from zero states: initial_state must be None with cu_seqlens")


def validate_packed(cu_seqlens: torch.Tensor, total: int, states: int | None = None) -> None:
    """Refuse boundaries the kernels would index out of bounds with: not [0, ..., total] in
    non-decreasing int32 order, an empty sequence, or more sequences than state rows. One host read;
    skipped while a CUDA graph is captured (whose packs the engine builds itself)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor [nseq + 1], got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    nseq = cu_seqlens.shape[0] - 1
    if states is not None and nseq != states:
        raise ValueError(f"cu_seqlens holds {nseq} sequences for {states} state rows")
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or cu[-1] != total or any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to the {total} packed tokens, got {cu[:8]}"
                         f"{'...' if len(cu) > 8 else ''}")


def split_packed(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) per sequence, on the host: for the reference ops, which loop over sequences."""
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:]))
