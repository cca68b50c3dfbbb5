"""The SSM state cache: an SSM's whole context is a fixed-size state per layer and sequence.

Per layer: conv state [slots, conv channels, K-1] (model dtype) and SSM state [slots, ...] (fp32,
where the recurrence accumulates). Slots are rows; a batch of sequences works on a view or a
gathered copy of its rows.
"""
from __future__ import annotations

import torch

from ..model.lm import LayerState


class StateCache:
    def __init__(self, shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], slots: int, *,
                 dtype: torch.dtype, device: torch.device):
        self.slots = slots
        # One row past the slots: `scratch`, where a graphed prefill writes the states of its padding
        # sequences (a graph writes a fixed number of rows; no sequence ever reads this one).
        self.scratch = slots
        self.conv = [torch.zeros(slots + 1, *c, dtype=dtype, device=device) for c, _ in shapes]
        self.ssm = [torch.zeros(slots + 1, *s, dtype=torch.float32, device=device) for _, s in shapes]

    @staticmethod
    def bytes_per_sequence(shapes, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return sum(_numel(c) * item + _numel(s) * 4 for c, s in shapes)

    def rows(self, start: int, end: int) -> list[LayerState]:
        """Views of slots [start, end): the model's in-place updates land in the cache."""
        return [LayerState(c[start:end], s[start:end]) for c, s in zip(self.conv, self.ssm)]

    def gather(self, slots: torch.Tensor) -> list[LayerState]:
        """Copies of arbitrary slots, to be written back with `scatter`."""
        return [LayerState(c.index_select(0, slots), s.index_select(0, slots)) for c, s in zip(self.conv, self.ssm)]

    def scatter(self, slots: torch.Tensor, states: list[LayerState]) -> None:
        for c, s, st in zip(self.conv, self.ssm, states):
            c.index_copy_(0, slots, st.conv)
            s.index_copy_(0, slots, st.ssm)

    def reset(self, start: int, end: int) -> None:
        for c, s in zip(self.conv, self.ssm):
            c[start:end].zero_()
            s[start:end].zero_()


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
