"""The projections' reference: a plain linear layer, the one op whose kernel only speeds up decode."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T + bias, as F.linear: x [..., K], weight [N, K], bias [N] or None -> [..., N]."""
    return F.linear(x, weight, bias)
