"""Generation for a fixed batch: prefill each prompt into its cache slot, then decode together."""
from __future__ import annotations

import torch

from ..model.lm import MambaLM
from .cache import StateCache
from .sampling import SamplingParams, sample


@torch.no_grad()
def generate(model: MambaLM, prompts: list[list[int]], max_new_tokens: int,
             params: SamplingParams | None = None, stop_ids: tuple[int, ...] = ()) -> list[list[int]]:
    """Generated token ids for each prompt (prompt excluded), stopping at max_new_tokens or a stop id.

    Every TP rank must call this with the same arguments.
    """
    params = params or SamplingParams()
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model.embeddings.weight.device
    b = len(prompts)
    cache = StateCache(model.state_shapes(), b, dtype=model.dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(params.seed) if not params.greedy else None

    def pick(local_logits: torch.Tensor) -> torch.Tensor:
        return sample(local_logits, params, gen, model.vocab_start, model.cfg.vocab_size, model.tp)

    # Prompts differ in length: each is prefilled alone so no padding ever enters a state.
    nxt = torch.cat([pick(model(torch.tensor([p], device=device), cache.rows(i, i + 1), last_only=True)[:, -1])
                     for i, p in enumerate(prompts)])
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    states = cache.rows(0, b)
    for step in range(max_new_tokens):
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_ids or len(out[i]) >= max_new_tokens
        if all(done):
            break
        nxt = pick(model(nxt.view(b, 1), states)[:, -1])
    return out
