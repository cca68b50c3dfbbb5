"""The state cache: every block's per-sequence state, one row per slot.

An SSM's whole context is a fixed-size state per layer and sequence: conv state [slots, conv
channels, K-1] (model dtype) and SSM state [slots, ...] (fp32, where the recurrence accumulates).
Attention blocks of hybrids add their KV cache in the same slots: keys and values [slots, T, kv
heads, head_dim] (T = the longest sequence the engine admits) and the positions filled, `length`
[slots]. Slots are rows; a batch of sequences works on a view or a gathered copy of its rows, and
a sequence's slot index is the same in every block.
"""
from __future__ import annotations

import torch

from ..model.lm import LayerState


def _as_spec(shape) -> dict:
    """Accept the older per-layer form ((conv shape), (ssm shape)) beside name -> (shape, dtype)."""
    if isinstance(shape, dict):
        return shape
    conv, ssm = shape
    return {"conv": (tuple(conv), None), "ssm": (tuple(ssm), torch.float32)}


class StateCache:
    def __init__(self, shapes: list, slots: int, *, dtype: torch.dtype, device: torch.device,
                 scratch: bool = False):
        """shapes: the model's `state_shapes(max_length)`, per block name -> (shape, dtype; None:
        `dtype`). scratch: one more row past the slots, `self.scratch`, where a graphed prefill
        writes the states of its padding sequences (a graph writes a fixed number of rows; no
        sequence ever reads that one)."""
        self.slots = slots
        self.scratch = slots if scratch else None
        self.layers: list[dict[str, torch.Tensor]] = [
            {name: torch.zeros(slots + int(scratch), *shape, dtype=dt or dtype, device=device)
             for name, (shape, dt) in _as_spec(spec).items()}
            for spec in shapes]

    @staticmethod
    def bytes_per_sequence(shapes, dtype: torch.dtype) -> int:
        total = 0
        for spec in shapes:
            for shape, dt in _as_spec(spec).values():
                total += _numel(shape) * (dt or dtype).itemsize
        return total

    # Mamba blocks' tensors, for code that predates the other kinds (every block of a pure SSM).
    @property
    def conv(self) -> list[torch.Tensor]:
        return [t["conv"] for t in self.layers if "conv" in t]

    @property
    def ssm(self) -> list[torch.Tensor]:
        return [t["ssm"] for t in self.layers if "ssm" in t]

    def rows(self, start: int, end: int, kv_length: int | None = None) -> list[LayerState]:
        """Views of slots [start, end): the model's in-place updates land in the cache. kv_length
        cuts keys/values to the positions a step may touch (None: all of them)."""
        return [LayerState(**{n: t[start:end] for n, t in layer.items()}).upto(kv_length) for layer in self.layers]

    def gather(self, slots: torch.Tensor, kv_length: int | None = None) -> list[LayerState]:
        """Copies of arbitrary slots, to be written back with `scatter`; keys/values cut to their first
        kv_length positions (None: all of them)."""
        return [LayerState(**{n: kv_upto(n, t, kv_length).index_select(0, slots) for n, t in layer.items()})
                for layer in self.layers]

    def scatter(self, slots: torch.Tensor, states: list[LayerState]) -> None:
        for layer, st in zip(self.layers, states):
            for n, t in st.tensors().items():
                _time_prefix(layer[n], t).index_copy_(0, slots, t)

    def reset(self, start: int, end: int) -> None:
        """Empty slots [start, end). Keys/values are left as they are: `length` 0 masks them all."""
        for layer in self.layers:
            for n, t in layer.items():
                if n not in ("k", "v"):
                    t[start:end].zero_()

    def copy_slot(self, src: int, dst: int, kv_length: int | None = None) -> None:
        """Slot dst takes slot src's states (keys/values up to kv_length positions: the rest is unused)."""
        for layer in self.layers:
            for n, t in layer.items():
                if n in ("k", "v") and kv_length is not None:
                    t[dst, :kv_length].copy_(t[src, :kv_length])
                else:
                    t[dst].copy_(t[src])

    def load(self, slot: int, saved: list[LayerState]) -> None:
        """Slot `slot` takes one saved sequence's states (rows of 1; keys/values may be a prefix)."""
        for layer, st in zip(self.layers, saved):
            for n, t in st.tensors().items():
                _time_prefix(layer[n][slot:slot + 1], t).copy_(t)


def kv_upto(name: str, t: torch.Tensor, kv_length: int | None) -> torch.Tensor:
    """Keys/values cut to their first kv_length positions; any other state as it is."""
    return t[:, :kv_length] if kv_length is not None and name in ("k", "v") else t


def _time_prefix(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """target's first source.shape[1] positions when source holds fewer (a KV prefix), else target."""
    if source.dim() > 1 and source.shape[1] != target.shape[1]:
        return target[:, :source.shape[1]]
    return target


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
