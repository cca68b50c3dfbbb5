"""Reductions the engine runs on a step's logits."""
from __future__ import annotations

import torch


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest value over the last dim and its first index (torch.max's ties)."""
    return x.max(dim=-1)
