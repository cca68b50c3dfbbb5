"""Request parsing and validation for the two HTTP APIs, before anything reaches the engine.

Megatron's `PUT /api` and OpenAI's `POST /v1/completions` bodies become `Job`s: one per prompt,
already tokenized, with sampling parameters the engine accepts. What a request can get wrong about
the API is found here, on rank 0, and answered with an `ApiError` (4xx, a message naming the
field); the engine's own rules for a prompt (not empty, token ids in the vocabulary, within the
context budget) are checked by `Engine.check_request` when the jobs are submitted, also on rank 0
and before anything is broadcast to the other ranks.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

from ..inference.sampling import SamplingParams
from .text import TextCodec

MAX_SEED = 2**63 - 1


class ApiError(Exception):
    """An error answered to the client: HTTP status plus a JSON body that says what is wrong.

    The body carries both Megatron's shape ({"message": ...}, read by Megatron's CLI) and OpenAI's
    ({"error": {"message", "type", "param", "code"}}, read by the openai client)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"message": self.message,
                "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}


@dataclass
class ModelInfo:
    """What validation needs to know about the served model and the server's limits."""

    name: str
    vocab_size: int
    max_sequence_length: int | None  # prompt + generated tokens; None: unbounded
    eos_id: int | None
    bos_id: int | None
    codec: TextCodec | None
    tp: int = 1
    max_prompts: int = 128


@dataclass
class Job:
    """One prompt's work: generate `max_new_tokens` (0: score the prompt only)."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False  # log-probs of generated tokens
    prompt_logprobs: bool = False  # log-probs of prompt tokens 1.. (computed in the engine's prefill)


# ---- typed field access ------------------------------------------------------------------------

_MISSING = object()


def _get(body: dict, key: str, nullable: bool):
    """The field's value, or _MISSING when it is absent (or null, where null means "default")."""
    if key not in body:
        return _MISSING
    v = body[key]
    if v is None:
        if nullable:
            return _MISSING
        raise ApiError(f"{key} must not be null", param=key)
    return v


def _int(body, key, default, lo=None, hi=None, nullable=False):
    v = _get(body, key, nullable)
    if v is _MISSING:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"{key} must be an integer, got {_show(v)}", param=key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]"
        raise ApiError(f"{key} must be {rng}, got {v}", param=key)
    return v


def _num(body, key, default, lo=None, hi=None, lo_open=False, nullable=False):
    v = _get(body, key, nullable)
    if v is _MISSING:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"{key} must be a finite number, got {_show(v)}", param=key)
    v = float(v)
    bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
    if bad_lo or (hi is not None and v > hi):
        left = "(" if lo_open else "["
        raise ApiError(f"{key} must be in {left}{lo}, {hi}], got {v}", param=key)
    return v


def _bool(body, key, default, nullable=False):
    v = _get(body, key, nullable)
    if v is _MISSING:
        return default
    if not isinstance(v, bool):
        raise ApiError(f"{key} must be true or false, got {_show(v)}", param=key)
    return v


def _value(body, key, default, nullable=True):
    v = _get(body, key, nullable)
    return default if v is _MISSING else v


def _show(v) -> str:
    s = repr(v) if not isinstance(v, str) else f"the string {v[:40]!r}"
    return s if len(s) <= 60 else s[:57] + "..."


def _check_fields(body: dict, known: set[str], api: str) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise ApiError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for {api}; "
                       f"supported: {', '.join(sorted(known))}", param=unknown[0])


def _sampling(temperature: float, top_k: int, top_p: float, seed: int | None, index: int) -> SamplingParams:
    greedy = temperature == 0.0 or top_k == 1
    if greedy:
        return SamplingParams()
    if seed is None:
        seed = secrets.randbits(62)
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=(seed + index) % MAX_SEED)
    try:
        p.validate()
    except ValueError as e:
        raise ApiError(str(e)) from None
    return p


def _need_codec(info: ModelInfo, param: str) -> TextCodec:
    if info.codec is None:
        raise ApiError("this server has no tokenizer, so it cannot take text prompts; start it with "
                       "--tokenizer-model or send token ids (OpenAI: prompt as a list of ints)", param=param)
    return info.codec


# ---- Megatron: PUT /api ------------------------------------------------------------------------

MEGATRON_FIELDS = {"prompts", "tokens_to_generate", "temperature", "top_k", "top_p", "logprobs", "add_BOS",
                   "random_seed", "stop_token", "no_log", "stop_on_eol", "stop_on_double_eol",
                   "prevent_newline_after_colon", "top_p_decay", "top_p_bound", "beam_width", "length_penalty",
                   "max_len", "sentences"}


@dataclass
class MegatronRequest:
    prompts: list[str]
    jobs: list[Job]
    logprobs: bool
    stop_on_eol: bool
    stop_on_double_eol: bool
    no_log: bool


def parse_megatron(body: dict, info: ModelInfo) -> MegatronRequest:
    """Megatron-LM's text generation server semantics (megatron/inference/text_generation_server.py):
    `text` is prompt + generation, `tokens` prompt + generated ids, `logprobs` one per token after the
    first. Extensions: temperature 0 means greedy (so does top_k 1), and top_k with top_p is allowed."""
    if "max_len" in body:
        raise ApiError("max_len is no longer used. Replace with tokens_to_generate", param="max_len")
    if "sentences" in body:
        raise ApiError("sentences is no longer used. Replace with prompts", param="sentences")
    _check_fields(body, MEGATRON_FIELDS, "PUT /api")
    if "prompts" not in body:
        raise ApiError("prompts argument required", param="prompts")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise ApiError("prompts is not a list of strings", param="prompts")
    if not prompts:
        raise ApiError("prompts is empty", param="prompts")
    if len(prompts) > info.max_prompts:
        raise ApiError(f"Maximum number of prompts is {info.max_prompts}", param="prompts")
    new = _int(body, "tokens_to_generate", 64, lo=0)
    logprobs = _bool(body, "logprobs", False)
    if new == 0 and not logprobs:
        raise ApiError("tokens_to_generate=0 implies logprobs should be True", param="tokens_to_generate")
    temperature = _num(body, "temperature", 1.0, 0.0, 100.0)
    top_k = _int(body, "top_k", 0, 0, 1000)
    top_p = _num(body, "top_p", 0.0, 0.0, 1.0)
    for key in ("top_p_decay", "top_p_bound"):
        if _num(body, key, 0.0, 0.0, 1.0) != 0.0:
            raise ApiError(f"{key} is not supported by this server", param=key)
    add_bos = _bool(body, "add_BOS", False)
    if any(len(p) == 0 for p in prompts) and not add_bos:
        raise ApiError("Empty prompts require add_BOS=true", param="prompts")
    stop_on_eol = _bool(body, "stop_on_eol", False)
    stop_on_double_eol = _bool(body, "stop_on_double_eol", False)
    if _bool(body, "prevent_newline_after_colon", False):
        raise ApiError("prevent_newline_after_colon is not supported by this server",
                       param="prevent_newline_after_colon")
    seed = _int(body, "random_seed", None, lo=0, hi=MAX_SEED)
    no_log = _bool(body, "no_log", False)
    if "beam_width" in body:
        _int(body, "beam_width", 1, lo=1)
        raise ApiError("beam search (beam_width) is not supported by this server", param="beam_width")
    _num(body, "length_penalty", 1.0)  # only meaningful with beam search; type-checked, ignored
    default_stop = info.eos_id if info.eos_id is not None else -1
    stop_token = _int(body, "stop_token", default_stop)
    codec = _need_codec(info, "prompts")
    # Megatron prepends its end-of-document token for add_BOS (what separated documents in training)
    bos = info.eos_id if info.eos_id is not None else info.bos_id
    if add_bos and bos is None:
        raise ApiError("add_BOS: the tokenizer has neither an end-of-document nor a BOS token", param="add_BOS")
    jobs = []
    for i, text in enumerate(prompts):
        ids = ([bos] if add_bos else []) + codec.encode(text)
        jobs.append(Job(ids, new, _sampling(temperature, top_k, top_p or 1.0, seed, i),
                        stop_ids=(stop_token,) if 0 <= stop_token < info.vocab_size else (),
                        logprobs=logprobs, prompt_logprobs=logprobs))
    return MegatronRequest(prompts, jobs, logprobs, stop_on_eol, stop_on_double_eol, no_log)


# ---- OpenAI: POST /v1/completions ----------------------------------------------------------------

OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
                 "logprobs", "echo", "stop", "seed", "best_of", "presence_penalty", "frequency_penalty",
                 "logit_bias", "user", "suffix",
                 # extensions (as vLLM names them)
                 "top_k", "ignore_eos", "stop_token_ids"}


@dataclass
class CompletionRequest:
    prompt_texts: list[str | None]  # the prompt as text when given as text (for echo)
    jobs: list[Job]
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    stop: list[str]
    model: str


def _prompts(v, info: ModelInfo) -> tuple[list[str | None], list[list[int]]]:
    def ids_ok(p):
        return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)

    if isinstance(v, str):
        texts = [v]
    elif isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        texts = list(v)
    elif ids_ok(v) and v:
        texts, token_lists = [None], [list(v)]
    elif isinstance(v, list) and v and all(ids_ok(p) for p in v):
        texts, token_lists = [None] * len(v), [list(p) for p in v]
    elif isinstance(v, list) and not v:
        raise ApiError("prompt is an empty list", param="prompt")
    else:
        raise ApiError("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                       f"token ids, got {_show(v)}", param="prompt")
    if len(texts) > info.max_prompts:
        raise ApiError(f"at most {info.max_prompts} prompts per request, got {len(texts)}", param="prompt")
    if texts[0] is not None:
        codec = _need_codec(info, "prompt")
        token_lists = [codec.encode(t) for t in texts]
    return texts, token_lists


def parse_openai(body: dict, info: ModelInfo) -> CompletionRequest:
    _check_fields(body, OPENAI_FIELDS, "POST /v1/completions")
    model = _value(body, "model", info.name)
    if not isinstance(model, str):
        raise ApiError(f"model must be a string, got {_show(model)}", param="model")
    if "prompt" not in body or body["prompt"] is None:
        raise ApiError("prompt is required", param="prompt")
    n = _int(body, "n", 1, lo=1, nullable=True)
    if n != 1:
        raise ApiError(f"n must be 1 (one completion per prompt), got {n}", param="n")
    best_of = _int(body, "best_of", 1, lo=1, nullable=True)
    if best_of != 1:
        raise ApiError(f"best_of must be 1, got {best_of}", param="best_of")
    stream = _bool(body, "stream", False, nullable=True)
    opts = _value(body, "stream_options", None)
    include_usage = False
    if opts is not None:
        if not stream:
            raise ApiError("stream_options is only allowed with stream=true", param="stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"}:
            raise ApiError("stream_options must be an object with only include_usage", param="stream_options")
        include_usage = _bool(opts, "include_usage", False, nullable=True)
    echo = _bool(body, "echo", False, nullable=True)
    max_tokens = _int(body, "max_tokens", 16, lo=0, nullable=True)
    if max_tokens == 0 and not echo:
        raise ApiError("max_tokens=0 is only allowed with echo=true (scoring the prompt)", param="max_tokens")
    temperature = _num(body, "temperature", 1.0, 0.0, 100.0, nullable=True)
    top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True, nullable=True)
    top_k = _int(body, "top_k", 0, lo=-1, nullable=True)
    top_k = 0 if top_k == -1 else top_k
    logprobs = _int(body, "logprobs", None, lo=0, hi=5, nullable=True)
    if logprobs is not None and logprobs > 1:
        raise ApiError(f"logprobs must be 0 or 1: this server returns the log-probability of the chosen token "
                       f"only, not the top {logprobs} alternatives", param="logprobs")
    seed = _int(body, "seed", None, lo=0, hi=MAX_SEED, nullable=True)
    stop = _value(body, "stop", None)
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(f"stop must be a string or a list of strings, got {_show(stop)}", param="stop")
    if len(stop) > 4:
        raise ApiError(f"stop takes at most 4 sequences, got {len(stop)}", param="stop")
    if any(not s for s in stop):
        raise ApiError("stop sequences must not be empty strings", param="stop")
    for key in ("presence_penalty", "frequency_penalty"):
        if _num(body, key, 0.0, -2.0, 2.0, nullable=True) != 0.0:
            raise ApiError(f"{key} is not supported by this server (only 0)", param=key)
    bias = _value(body, "logit_bias", None)
    if bias not in (None, {}):
        raise ApiError("logit_bias is not supported by this server", param="logit_bias")
    if _value(body, "suffix", None) is not None:
        raise ApiError("suffix is not supported by this server", param="suffix")
    user = _value(body, "user", "")
    if not isinstance(user, str):
        raise ApiError(f"user must be a string, got {_show(user)}", param="user")
    ignore_eos = _bool(body, "ignore_eos", False, nullable=True)
    extra_stop = _value(body, "stop_token_ids", [])
    if not (isinstance(extra_stop, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in extra_stop)):
        raise ApiError(f"stop_token_ids must be a list of token ids, got {_show(extra_stop)}", param="stop_token_ids")
    stop_ids = tuple(t for t in extra_stop if 0 <= t < info.vocab_size)
    if not ignore_eos and info.eos_id is not None:
        stop_ids = (info.eos_id,) + stop_ids
    texts, token_lists = _prompts(body["prompt"], info)
    jobs = []
    for i, ids in enumerate(token_lists):
        jobs.append(Job(ids, max_tokens, _sampling(temperature, top_k, top_p, seed, i), stop_ids,
                        logprobs=logprobs is not None, prompt_logprobs=echo and logprobs is not None))
    return CompletionRequest(texts, jobs, stream, include_usage, echo, logprobs, stop, model)
