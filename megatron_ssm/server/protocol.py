"""Request models for the HTTP APIs (pydantic, strict: no coercion of "5" to 5 or of true to 1),
and their translation into `Job`s, one per prompt, already tokenized.

What a request can get wrong about the API is refused by the models (FastAPI answers 400 with the
field's name) or by the `*_jobs` functions here (an `ApiError`); the engine's own rules for a prompt
(not empty, token ids in the vocabulary, within the context budget) are checked by
`Engine.check_request` when the jobs are submitted, on rank 0 and before anything is broadcast.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..inference.sampling import SamplingParams
from .text import TextCodec

MAX_SEED = 2**63 - 1
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_N = 128


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
    chat_template: str | None = None
    special_tokens: dict[str, str | None] = field(default_factory=dict)  # bos_token, eos_token, ... as text


@dataclass
class Job:
    """One prompt's work: generate `max_new_tokens` (0: score the prompt only), `n` times."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    logprobs: bool = False  # log-probs of generated tokens
    prompt_logprobs: bool = False  # log-probs of prompt tokens 1.. (computed in the engine's prefill)
    top_logprobs: int = 0  # alternatives per position, with logprobs / prompt_logprobs
    n: int = 1


# ---- field types ---------------------------------------------------------------------------------

def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\udfff", legal in JSON, not in text
        raise ValueError(f"not valid text: {e.reason} at character {e.start}") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _sampling(temperature: float, top_k: int, top_p: float, seed: int | None, index: int) -> SamplingParams:
    if temperature == 0.0 or top_k == 1:
        return SamplingParams()
    if seed is None:
        seed = secrets.randbits(62)
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=(seed + index) % MAX_SEED)


def _need_codec(info: ModelInfo, param: str) -> TextCodec:
    if info.codec is None:
        raise ApiError("this server has no tokenizer, so it cannot take text prompts; start it with "
                       "--tokenizer-model or send token ids (OpenAI: prompt as a list of ints)", param=param)
    return info.codec


# ---- Megatron: PUT /api --------------------------------------------------------------------------

class MegatronBody(Strict):
    """Megatron-LM's text generation server (megatron/inference/text_generation_server.py): `text`
    is prompt + generation, `tokens` prompt + generated ids, `logprobs` one per token after the
    first. Extensions: temperature 0 means greedy (so does top_k 1), and top_k with top_p is allowed."""

    prompts: list[Text]
    tokens_to_generate: Annotated[int, Field(ge=0)] = 64
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    top_k: Annotated[int, Field(ge=0, le=1000)] = 0
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    top_p_decay: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    top_p_bound: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    logprobs: bool = False
    add_BOS: bool = False
    random_seed: Seed | None = None
    stop_token: int | None = None
    no_log: bool = False
    stop_on_eol: bool = False
    stop_on_double_eol: bool = False
    prevent_newline_after_colon: bool = False
    beam_width: Annotated[int, Field(ge=1)] | None = None
    length_penalty: float = 1.0  # only meaningful with beam search; type-checked, ignored

    @model_validator(mode="before")
    @classmethod
    def _megatron_messages(cls, body):
        # Megatron's own messages for the mistakes its users make
        if not isinstance(body, dict):
            return body
        if "max_len" in body:
            raise ValueError("max_len is no longer used. Replace with tokens_to_generate")
        if "sentences" in body:
            raise ValueError("sentences is no longer used. Replace with prompts")
        if "prompts" not in body:
            raise ValueError("prompts argument required")
        p = body["prompts"]
        if not isinstance(p, list) or not all(isinstance(x, str) for x in p):
            raise ValueError("prompts is not a list of strings")
        if not p:
            raise ValueError("prompts is empty")
        return body


@dataclass
class MegatronRequest:
    prompts: list[str]
    jobs: list[Job]
    logprobs: bool
    stop_on_eol: bool
    stop_on_double_eol: bool
    no_log: bool


def megatron_jobs(body: MegatronBody, info: ModelInfo) -> MegatronRequest:
    prompts, new, logprobs = body.prompts, body.tokens_to_generate, body.logprobs
    if len(prompts) > info.max_prompts:
        raise ApiError(f"Maximum number of prompts is {info.max_prompts}", param="prompts")
    if new == 0 and not logprobs:
        raise ApiError("tokens_to_generate=0 implies logprobs should be True", param="tokens_to_generate")
    for key in ("top_p_decay", "top_p_bound"):
        if getattr(body, key) != 0.0:
            raise ApiError(f"{key} is not supported by this server", param=key)
    if any(len(p) == 0 for p in prompts) and not body.add_BOS:
        raise ApiError("Empty prompts require add_BOS=true", param="prompts")
    if body.prevent_newline_after_colon:
        raise ApiError("prevent_newline_after_colon is not supported by this server",
                       param="prevent_newline_after_colon")
    if body.beam_width is not None:
        raise ApiError("beam search (beam_width) is not supported by this server", param="beam_width")
    stop_token = body.stop_token if body.stop_token is not None else (info.eos_id if info.eos_id is not None else -1)
    codec = _need_codec(info, "prompts")
    # Megatron prepends its end-of-document token for add_BOS (what separated documents in training)
    bos = info.eos_id if info.eos_id is not None else info.bos_id
    if body.add_BOS and bos is None:
        raise ApiError("add_BOS: the tokenizer has neither an end-of-document nor a BOS token", param="add_BOS")
    jobs = []
    for i, text in enumerate(prompts):
        ids = ([bos] if body.add_BOS else []) + codec.encode(text)
        jobs.append(Job(ids, new, _sampling(body.temperature, body.top_k, body.top_p or 1.0, body.random_seed, i),
                        stop_ids=(stop_token,) if 0 <= stop_token < info.vocab_size else (),
                        logprobs=logprobs, prompt_logprobs=logprobs))
    return MegatronRequest(prompts, jobs, logprobs, body.stop_on_eol, body.stop_on_double_eol, body.no_log)


# ---- OpenAI: shared fields -----------------------------------------------------------------------

class StreamOptions(Strict):
    include_usage: bool | None = None


class _Sampled(Strict):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(max_length=4)] | None = None
    seed: Seed | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # extensions, as vLLM names them
    top_k: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None


@dataclass
class CompletionRequest:
    prompt_texts: list[str | None]  # each prompt as text when given as text (for echo)
    jobs: list[Job]  # one per prompt; a job's n forks are choices index*n .. index*n + n-1
    n: int  # choices per prompt returned
    best_of: int  # forks generated per prompt (>= n): the n of highest log-probability are returned
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: int | None
    stop: list[str]
    model: str


def _common(body: _Sampled, info: ModelInfo, max_tokens: int, *, echo: bool, logprobs: int | None,
            best_of: int | None, token_lists: list[list[int]]) -> tuple[list[Job], int, int, bool, list[str]]:
    n = body.n or 1
    best_of = best_of or n
    if best_of < n:
        raise ApiError(f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    if best_of > MAX_N:
        raise ApiError(f"best_of must be <= {MAX_N}, got {best_of}", param="best_of")
    stream = bool(body.stream)
    if body.stream_options is not None and not stream:
        raise ApiError("stream_options is only allowed with stream=true", param="stream_options")
    if stream and best_of > n:
        raise ApiError("best_of > n cannot be streamed (the best are known only at the end)", param="best_of")
    if max_tokens == 0 and best_of > 1:
        raise ApiError("n and best_of > 1 need max_tokens >= 1", param="n")
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    top_k = body.top_k or 0
    top_k = 0 if top_k == -1 else top_k
    stop = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if any(not s for s in stop):
        raise ApiError("stop sequences must not be empty strings", param="stop")
    for key in ("presence_penalty", "frequency_penalty"):
        if getattr(body, key) not in (None, 0.0):
            raise ApiError(f"{key} is not supported by this server (only 0)", param=key)
    if body.logit_bias:
        raise ApiError("logit_bias is not supported by this server", param="logit_bias")
    stop_ids = tuple(t for t in body.stop_token_ids or () if t < info.vocab_size)
    if not body.ignore_eos and info.eos_id is not None:
        stop_ids = (info.eos_id,) + stop_ids
    if len(token_lists) > info.max_prompts:
        raise ApiError(f"at most {info.max_prompts} prompts per request, got {len(token_lists)}", param="prompt")
    jobs = []
    for i, ids in enumerate(token_lists):
        # every fork of every prompt samples with its own seed: seed + its choice index
        sampling = _sampling(temperature, top_k, top_p, body.seed, i * best_of)
        jobs.append(Job(ids, max_tokens, sampling, stop_ids, logprobs=logprobs is not None or best_of > n,
                        prompt_logprobs=echo and logprobs is not None, top_logprobs=logprobs or 0, n=best_of))
    return jobs, n, best_of, stream, stop


# ---- OpenAI: POST /v1/completions ----------------------------------------------------------------

class CompletionBody(_Sampled):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: Text | None = None


def completion_jobs(body: CompletionBody, info: ModelInfo) -> CompletionRequest:
    v = body.prompt
    if isinstance(v, list) and not v:
        raise ApiError("prompt is an empty list", param="prompt")
    if isinstance(v, str) or isinstance(v[0], str):
        texts = [v] if isinstance(v, str) else list(v)
        codec = _need_codec(info, "prompt")
        token_lists = [codec.encode(t) for t in texts]
    elif isinstance(v[0], int):
        texts, token_lists = [None], [list(v)]
    else:
        texts, token_lists = [None] * len(v), [list(p) for p in v]
    echo = bool(body.echo)
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    if max_tokens == 0 and not echo:
        raise ApiError("max_tokens=0 is only allowed with echo=true (scoring the prompt)", param="max_tokens")
    if body.suffix is not None:
        raise ApiError("suffix is not supported by this server", param="suffix")
    jobs, n, best_of, stream, stop = _common(body, info, max_tokens, echo=echo, logprobs=body.logprobs,
                                             best_of=body.best_of, token_lists=token_lists)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return CompletionRequest(texts, jobs, n, best_of, stream, include_usage, echo, body.logprobs, stop,
                             body.model or info.name)


# ---- OpenAI: POST /v1/chat/completions -----------------------------------------------------------

class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None


class ChatBody(_Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    add_generation_prompt: bool = True  # vLLM's extension


@dataclass
class ChatRequest:
    prompt: str
    completion: CompletionRequest


def chat_prompt(body: ChatBody, info: ModelInfo) -> str:
    """The conversation as text, rendered by the tokenizer's chat template."""
    from .chat import render

    if not info.chat_template:
        raise ApiError("this model's tokenizer has no chat template (no chat_template in tokenizer_config.json): "
                       "use /v1/completions, or start the server with --chat-template", param="messages")
    # A None content is left out, as transformers' apply_chat_template does (the template then sees
    # it undefined), so a template renders the prompt HF would
    messages = [{"role": m.role,
                 **({} if m.content is None else
                    {"content": m.content if not isinstance(m.content, list) else "".join(p.text for p in m.content)}),
                 **({"name": m.name} if m.name else {})} for m in body.messages]
    return render(info.chat_template, messages, body.add_generation_prompt, info.special_tokens)


# A chat without max_tokens runs to the context limit, as OpenAI's does; with no limit (a pure SSM's
# default) it stops after this many tokens unless a stop or EOS token comes first.
CHAT_MAX_TOKENS_UNBOUNDED = 4096


def chat_jobs(body: ChatBody, info: ModelInfo) -> ChatRequest:
    codec = _need_codec(info, "messages")
    prompt = chat_prompt(body, info)
    max_tokens = body.max_completion_tokens or body.max_tokens or (
        CHAT_MAX_TOKENS_UNBOUNDED if info.max_sequence_length is None
        else max(1, info.max_sequence_length - 1 - len(codec.encode(prompt))))
    if body.top_logprobs and not body.logprobs:
        raise ApiError("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    ids = codec.encode(prompt)
    jobs, n, best_of, stream, stop = _common(body, info, max_tokens, echo=False, logprobs=logprobs, best_of=None,
                                             token_lists=[ids])
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return ChatRequest(prompt, CompletionRequest([prompt], jobs, n, best_of, stream, include_usage, False, logprobs,
                                                 stop, body.model or info.name))


# ---- tokenizer endpoints (vLLM's shapes, which lm-eval's remote tokenizer reads) --------------------

class TokenizeBody(Strict):
    prompt: Text
    add_special_tokens: bool = False
    model: str | None = None


class DetokenizeBody(Strict):
    tokens: list[TokenId]
    model: str | None = None
