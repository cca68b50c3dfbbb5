"""Generation for a fixed list of prompts, through the engine."""
from __future__ import annotations

from dataclasses import replace

from ..model.lm import MambaLM
from ..parallel import CPContext
from .engine import Engine, EngineConfig, Request
from .sampling import SamplingParams


def generate(model: MambaLM, prompts: list[list[int]], max_new_tokens: int,
             params: SamplingParams | None = None, stop_ids: tuple[int, ...] = (),
             config: EngineConfig | None = None, cp: CPContext | None = None) -> list[list[int]]:
    """Generated token ids for each prompt (prompt excluded). Every rank must call this alike. cp: the
    context-parallel group long prompts are prefilled over (see Engine)."""
    params = params or SamplingParams()
    # the KV cache of a hybrid's attention layers needs only the longest request's positions
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    engine = Engine(model, config or EngineConfig(max_batch=len(prompts), max_sequence_length=max(1, longest)), cp=cp)
    # each prompt its own seed, so equal prompts in one batch do not draw the same tokens
    return engine.generate([Request(list(p), max_new_tokens, replace(params, seed=params.seed + i), tuple(stop_ids))
                            for i, p in enumerate(prompts)])
