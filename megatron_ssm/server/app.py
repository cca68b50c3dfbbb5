"""The HTTP front end on rank 0: a FastAPI app served by uvicorn (h11), in a thread beside the
engine loop. Requests meet in the engine's continuous batching; each one waits on its own asyncio
queue, which the engine loop fills from its thread.

    PUT  /api                  Megatron-LM's text generation server API (POST too)
    POST /v1/completions       OpenAI completions: logprobs (top 20), echo, n / best_of, streaming
    POST /v1/chat/completions  OpenAI chat completions, rendered by the tokenizer's chat template
    GET  /v1/models[/{id}]     the served model
    POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer endpoints (lm-eval's remote tokenizer)
    GET  /health               200 while serving; 503 while shutting down or when the engine loop stalls
    GET  /metrics              Prometheus text format
    GET  /openapi.json         the schema of all of it
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .loop import EngineLoop, Handle
from .metrics import Metrics
from .protocol import (ApiError, ChatBody, CompletionBody, CompletionRequest, DetokenizeBody, Job, MegatronBody,
                       ModelInfo, TokenizeBody, chat_jobs, completion_jobs, megatron_jobs)
from .text import Detokenizer, find_stop, offsets, stable_length, token_texts

log = logging.getLogger(__name__)

LOOPBACK = ("localhost", "127.0.0.1", "::1", "localhost.localdomain")
MIN_LOGPROB = -9999.0  # what an impossible token's log-prob reads as (JSON has no -Infinity)


@dataclass
class ServerConfig:
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    log_requests: bool = False
    allowed_hosts: tuple[str, ...] = LOOPBACK  # Host header names accepted ("*": any)
    stall_timeout: float = 30.0  # /health answers 503 when the engine loop's beat is older


@dataclass
class ServerContext:
    loop: EngineLoop | None
    info: ModelInfo
    metrics: Metrics
    config: ServerConfig = field(default_factory=ServerConfig)
    _active: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    created: int = field(default_factory=lambda: int(time.time()))

    def enter(self) -> None:
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    @property
    def active(self) -> int:
        return self._active


def _lp(x: float | None) -> float | None:
    return None if x is None else (x if math.isfinite(x) else MIN_LOGPROB)


# ---- one choice's result, built from engine events ---------------------------------------------------

class Choice:
    """Tokens of one choice as they arrive, their text, and when to stop: the engine's stop token
    (its text kept for Megatron, dropped for OpenAI; its log-prob always kept, so scored text never
    loses its last token), stop sequences, or end of line (Megatron)."""

    def __init__(self, job: Job, info: ModelInfo, *, keep_stop_token: bool, stops: list[str] = (),
                 stop_on_eol: bool = False, stop_on_double_eol: bool = False):
        self.job, self.info, self.keep_stop_token, self.stops = job, info, keep_stop_token, list(stops)
        self.stop_on_eol, self.stop_on_double_eol = stop_on_eol, stop_on_double_eol
        self.detok = Detokenizer(info.codec, job.prompt) if info.codec is not None else None
        self.ids: list[int] = []
        self.lps: list[float | None] = []
        self.tops: list[list[tuple[int, float]] | None] = []
        self.pieces: list[str] = []  # each kept token's share of `text`
        self.offsets: list[int] = []  # where each kept token's text starts in `text`
        self.prompt_out = None  # the TokenOutput that carried the prompt's log-probs
        self.text = ""
        self.generated = 0  # tokens the engine produced (usage), stop token included
        self.finish: str | None = None
        self.sent_chars = 0  # streamed so far
        self.sent_tokens = 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.stop_token_at: int | None = None  # index in ids of an OpenAI stop token (no text of its own)

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def cumulative_logprob(self) -> float:
        return sum(x for x in self.lps if x is not None)

    def on_event(self, kind: str, payload) -> bool:
        """Apply one event; True if this choice is now complete and generation should stop."""
        if self.done:
            return False
        if kind == "error":
            raise payload
        if kind == "prompt_logprobs":
            self.prompt_out = payload
            return False
        if kind == "done":
            self.finish = "length"
            return True
        o = payload
        self.generated += 1
        stop_token = o.finish_reason == "stop" and not self.keep_stop_token
        if self.detok is None:
            piece = ""
        elif stop_token:
            piece = self.detok.flush()  # the stop token's own text is not part of the answer
            self.stop_token_at = len(self.ids)
        else:
            piece = self.detok.push(o.token, final=o.finished)
        self.ids.append(o.token)
        self.lps.append(o.logprob)
        self.tops.append(o.top_logprobs)
        self.offsets.append(len(self.text))
        self.pieces.append(piece)
        before, self.text = self.text, self.text + piece
        if self.stops and not stop_token:
            cut = find_stop(self.text, self.stops, max(0, len(before) - self.hold))
            if cut >= 0:
                self._truncate(max(cut, self.sent_chars))
                self.finish = "stop"
                return True
        if (self.stop_on_eol and "\n" in piece) or (self.stop_on_double_eol and "\n\n" in self.text[
                max(0, len(before) - 1):]):
            self.finish = "stop"
            return True
        if o.finished:
            self.finish = o.finish_reason or "length"
            return True
        return False

    def _truncate(self, cut: int) -> None:
        self.text = self.text[:cut]
        keep = sum(1 for off in self.offsets if off < cut)  # tokens whose text starts before the cut
        for lst in (self.ids, self.lps, self.tops, self.pieces, self.offsets):
            del lst[keep:]
        if keep:
            self.pieces[-1] = self.pieces[-1][:cut - self.offsets[-1]]

    def stream_delta(self) -> tuple[str, int, int]:
        """(new text that is safe to send, first and end index of the tokens that came with it)."""
        n = stable_length(self.text, self.done, 0 if self.done else self.hold)
        delta = self.text[self.sent_chars:n] if n > self.sent_chars else ""
        self.sent_chars = max(self.sent_chars, n)
        first, end = self.sent_tokens, len(self.ids)
        self.sent_tokens = end
        return delta, first, end


# ---- submitting jobs and following their events ---------------------------------------------------

class ClientGone(Exception):
    pass


class AsyncSink:
    """Where the engine loop's thread puts a request's events: an asyncio queue on the server's loop."""

    def __init__(self):
        self.aloop = asyncio.get_running_loop()
        self.q: asyncio.Queue = asyncio.Queue()

    def put(self, item: tuple) -> None:
        try:
            self.aloop.call_soon_threadsafe(self.q.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is gone, and the request with it
            pass


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Batch:
    """The jobs of one HTTP request, submitted together; job i's forks are choices i*n .. i*n+n-1."""

    def __init__(self, ctx: ServerContext, jobs: list[Job]):
        self.ctx = ctx
        self.sink = AsyncSink()
        self.per_job = jobs[0].n if jobs else 1
        self.handles = [Handle(j, self.sink, i * j.n, batch=self) for i, j in enumerate(jobs)]
        self.start = time.monotonic()
        self.deadline = self.start + ctx.config.request_timeout

    def check(self) -> None:
        self.ctx.loop.check(self.handles)  # the engine's rules, before Choice decodes the prompts

    def submit(self) -> None:
        self.ctx.loop.submit(self.handles)
        self.ctx.metrics.count_prompt_tokens(sum(len(h.job.prompt) for h in self.handles))

    def cancel(self, index: int | None = None) -> None:
        if index is None:
            for h in self.handles:
                self.ctx.loop.cancel(h)
        else:
            self.ctx.loop.cancel(self.handles[index // self.per_job], index % self.per_job)

    async def run(self, choices: list[Choice], request: Request, on_update=None) -> None:
        """Feed events to choices until all are done; on_update(index) after each applied event.
        A client that disconnects cancels the request at once (its slots are freed)."""
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            while not all(c.done for c in choices):
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(f"the request did not finish within {self.ctx.config.request_timeout:g} s "
                                   "(--request-timeout)", 504)
                get = asyncio.ensure_future(self.sink.q.get())
                done, _ = await asyncio.wait({get, gone}, timeout=min(left, 1.0), return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if gone in done:
                        raise ClientGone()
                    if self.ctx.loop.stopped.is_set() and self.sink.q.empty():
                        raise ApiError(f"the inference engine stopped: {self.ctx.loop.failure or 'shutdown'}", 503)
                    continue
                index, kind, payload = get.result()
                # a request's error, and its prompt's log-probs, are every fork's
                targets = range(index, index + self.per_job) if kind in ("error", "prompt_logprobs") else (index,)
                for i in targets:
                    if choices[i].done:
                        continue  # stopped here (stop sequence) while the engine was still going
                    if choices[i].on_event(kind, payload):
                        self.cancel(i)  # no-op if the engine finished it
                    if on_update is not None:
                        await on_update(i)
        except BaseException:
            self.cancel()
            raise
        finally:
            gone.cancel()
            self.ctx.metrics.observe_request(time.monotonic() - self.start)


# ---- responses ---------------------------------------------------------------------------------------

def _label(info: ModelInfo, token: int) -> str:
    return info.codec.label(token) if info.codec is not None else str(token)


def _top_dict(info: ModelInfo, chosen: int, lp: float | None, top, k: int) -> dict[str, float]:
    """The k most likely tokens and the chosen one (vLLM's shape: lm-eval's is_greedy compares the
    chosen log-prob with the best of these)."""
    out: dict[str, float] = {}
    for t, v in (top or [])[:k]:
        out.setdefault(_label(info, t), _lp(v))
    if lp is not None:
        out.setdefault(_label(info, chosen), _lp(lp))
    return out


def _prompt_part(info: ModelInfo, c: Choice, k: int | None) -> tuple[list[str], list, list]:
    """Echoed prompt tokens: texts, log-probs (the first has none), top alternatives."""
    prompt = c.job.prompt
    pieces = token_texts(info.codec, prompt) if info.codec is not None else [""] * len(prompt)
    lps, tops = [None], [None]
    out = c.prompt_out
    plps = (out.prompt_logprobs if out is not None else None) or []
    ptops = (out.prompt_top_logprobs if out is not None else None) or [None] * len(plps)
    for t, lp, top in zip(prompt[1:], plps, ptops):
        lps.append(_lp(lp))
        tops.append(_top_dict(info, t, lp, top, k or 0))
    return pieces, lps, tops


def _logprobs_obj(info: ModelInfo, req: CompletionRequest, c: Choice, first: int, end: int, base: int,
                  with_prompt: bool) -> dict:
    toks, lps, tops, offs = [], [], [], []
    if with_prompt:
        toks, lps, tops = _prompt_part(info, c, req.logprobs)
        offs = offsets(toks)
    for i in range(first, end):
        toks.append(_label(info, c.ids[i]) if i == c.stop_token_at else c.pieces[i])
        lps.append(_lp(c.lps[i]))
        tops.append(_top_dict(info, c.ids[i], c.lps[i], c.tops[i], req.logprobs or 0))
        offs.append(base + c.offsets[i])
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def _pick(req: CompletionRequest, choices: list[Choice]) -> list[Choice]:
    """Per prompt, the n of its best_of forks with the highest log-probability (all when equal)."""
    if req.best_of == req.n:
        return choices
    out = []
    for i in range(0, len(choices), req.best_of):
        forks = choices[i:i + req.best_of]
        out += sorted(forks, key=lambda c: -c.cumulative_logprob)[:req.n]
    return out


def _prompt_text(info: ModelInfo, req: CompletionRequest, c: Choice, i: int) -> str:
    t = req.prompt_texts[i]
    if t is not None:
        return t
    return info.codec.decode(c.job.prompt) if info.codec is not None else ""


def _usage(jobs: list[Job], choices: list[Choice]) -> dict:
    p = sum(len(j.prompt) for j in jobs)
    g = sum(c.generated for c in choices)
    return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}


def completion_response(info: ModelInfo, req: CompletionRequest, choices: list[Choice], cid: str) -> dict:
    out = []
    for j, c in enumerate(_pick(req, choices)):
        prompt_index = j // req.n
        prefix = _prompt_text(info, req, c, prompt_index) if req.echo else ""
        choice = {"index": j, "text": prefix + c.text, "finish_reason": c.finish,
                  "logprobs": _logprobs_obj(info, req, c, 0, len(c.ids), len(prefix), req.echo)
                  if req.logprobs is not None else None}
        if info.codec is None:
            choice["token_ids"] = list(c.ids)
        out.append(choice)
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": req.model,
            "choices": out, "usage": _usage(req.jobs, choices)}


def _chat_logprobs(info: ModelInfo, req: CompletionRequest, c: Choice, first: int, end: int) -> dict:
    def entry(t: int, lp: float, text: str) -> dict:
        return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode())}

    content = []
    for i in range(first, end):
        text = c.pieces[i] or _label(info, c.ids[i])
        e = entry(c.ids[i], c.lps[i], text)
        e["top_logprobs"] = [entry(t, v, _label(info, t)) for t, v in (c.tops[i] or [])[:req.logprobs or 0]]
        content.append(e)
    return {"content": content}


def chat_response(info: ModelInfo, req: CompletionRequest, choices: list[Choice], cid: str) -> dict:
    out = []
    for j, c in enumerate(_pick(req, choices)):
        out.append({"index": j, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                    "logprobs": _chat_logprobs(info, req, c, 0, len(c.ids)) if req.logprobs is not None else None})
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": req.model,
            "choices": out, "usage": _usage(req.jobs, choices)}


def megatron_response(info: ModelInfo, req, choices: list[Choice]) -> dict:
    tokens = [c.job.prompt + c.ids for c in choices]
    return {"text": [p + c.text for p, c in zip(req.prompts, choices)],
            "segments": [token_texts(info.codec, t) for t in tokens],
            "logprobs": [[_lp(x) for x in (c.prompt_out.prompt_logprobs if c.prompt_out else [])] +
                         [_lp(x) for x in c.lps] for c in choices] if req.logprobs else None,
            "tokens": tokens}


# ---- the app -----------------------------------------------------------------------------------------

ROUTES = ("/api", "/v1/completions", "/completions", "/v1/chat/completions", "/health", "/metrics", "/v1/models",
          "/tokenize", "/detokenize", "/tokenizer_info", "/openapi.json")
BODY_METHODS = ("POST", "PUT", "PATCH")


def _json(status: int, obj, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(obj, status_code=status, headers=headers)


def _error(err: ApiError, headers: dict | None = None) -> JSONResponse:
    return _json(err.status, err.body(), headers)


class Guard:
    """ASGI middleware in front of the app: counts requests for /metrics; refuses a Host header
    that names another site (DNS rebinding), a body that is not JSON (a web page's form post), and
    one over the size limit (read here, so chunked bodies are bounded too)."""

    def __init__(self, app, ctx: ServerContext):
        self.app, self.ctx = app, ctx

    def _host_ok(self, host: str) -> bool:
        allowed = self.ctx.config.allowed_hosts
        if "*" in allowed:
            return True
        try:
            name = urlsplit("//" + host).hostname or ""
        except ValueError:
            return False
        return name.lower() in allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = {}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.ctx.enter()
        try:
            refusal, receive = await self._check(scope, receive)
            if refusal is not None:
                await refusal(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            self.ctx.leave()
            if "code" in status:
                self.ctx.metrics.count_request(endpoint, status["code"])

    async def _check(self, scope, receive):
        headers = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        if not self._host_ok(headers.get("host", "")):
            return _error(ApiError(f"Host {headers.get('host', '')!r} is not served here: start the server with "
                                   "--allowed-hosts NAME to accept it", 421, param="Host")), receive
        if scope["method"] not in BODY_METHODS:
            return None, receive
        length = headers.get("content-length")
        limit = self.ctx.config.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            if int(length) <= 16 * limit:  # read it away, so a client still sending gets the answer, not a reset
                while (m := await receive())["type"] == "http.request" and m.get("more_body"):
                    pass
            return _error(ApiError(f"request body of {length} bytes exceeds the limit of {limit} bytes "
                                   "(--max-request-bytes)", 413)), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return Response(status_code=400), receive  # the client went away mid-body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return _error(ApiError(f"request body exceeds the limit of {limit} bytes (--max-request-bytes)",
                                       413)), receive
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if body and not (media == "application/json" or media.endswith("+json")):
            return _error(ApiError(f"the request body must be JSON sent as Content-Type: application/json, got "
                                   f"{headers.get('content-type', 'no Content-Type')!r}", 415,
                                   param="Content-Type")), receive
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


def _validation_message(errors) -> tuple[str, str | None]:
    """A pydantic error list as one sentence naming the field. A value that fits none of a union's
    types fails once per type: say the most telling failure (a bad value over a wrong type)."""
    if not errors:
        return "invalid request", None
    for e in errors:
        if e.get("type") == "json_invalid":
            return f"malformed JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    by_field: dict[str, list] = {}
    for e in errors:
        # keep field names and list indices, drop pydantic's union-member tags ("function-after[...]")
        loc = [str(x) for x in e.get("loc", ()) if x != "body" and (isinstance(x, int) or str(x).isidentifier())]
        by_field.setdefault(".".join(loc), []).append(e)
    where, errs = next(iter(by_field.items()))
    best = next((e for e in errs if not str(e.get("type", "")).endswith("_type")), errs[0])
    msg = str(best.get("msg", "invalid")).removeprefix("Value error, ")
    if best.get("type") == "missing" and not where:
        return "a JSON object body is required", None
    if len(errs) > 1 and best is errs[0] and str(best.get("type", "")).endswith("_type"):
        msg = f"wrong type ({type(best.get('input')).__name__}): " + "; ".join(
            sorted({str(e.get('msg')) for e in errs}))
    more = f" (and {len(by_field) - 1} more fields)" if len(by_field) > 1 else ""
    return (f"{where}: {msg}" if where else msg) + more, where.split(".")[0] or None


def build_app(ctx: ServerContext) -> FastAPI:
    info = ctx.info
    app = FastAPI(title="megatron-ssm text generation server", version="0.1.0", docs_url=None, redoc_url=None,
                  description="Megatron-LM's PUT /api and OpenAI's completions API for tensor-parallel SSMs")
    app.add_middleware(Guard, ctx=ctx)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return _error(ApiError(message, 400, param=param))

    @app.exception_handler(HTTPException)
    async def _http(request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else None
        detail = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404:
            detail = (f"no endpoint {request.url.path}; try PUT /api, POST /v1/completions, "
                      "POST /v1/chat/completions, GET /health or GET /openapi.json")
        elif e.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; use {e.headers.get('Allow', '')}"
        elif e.status_code == 400 and "parsing the body" in detail:
            detail = "malformed JSON body (not parseable, or a number too large to read)"
        return _error(ApiError(detail, e.status_code, type=kind), headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):  # a bug: answer 500 and keep serving everyone else
        log.exception("error while answering %s %s", request.method, request.url.path)
        return _error(ApiError(f"internal error: {type(e).__name__}: {e}", 500))

    def check_model(name: str | None) -> None:
        if name is not None and name != info.name:
            raise ApiError(f"The model `{name}` does not exist; this server serves `{info.name}`", 404,
                           param="model", type="invalid_request_error")

    def model_card() -> dict:
        return {"id": info.name, "object": "model", "created": ctx.created, "owned_by": "megatron-ssm",
                "root": info.name, "max_model_len": info.max_sequence_length}

    # -- service

    @app.get("/health")
    async def health():
        loop = ctx.loop
        age = loop.heartbeat_age()
        body = {"model": info.name, "tensor_parallel": info.tp, "running": loop.running(),
                "waiting": loop.queue_depth(), "heartbeat_age": round(age, 3)}
        if not loop.accepting:
            return _json(503, {"status": "shutting down" if loop.failure is None else "failed", **body})
        if age > ctx.config.stall_timeout:
            return _json(503, {"status": "stalled", **body, "message": f"the engine loop has not advanced for "
                               f"{age:.1f} s (a rank may hang); limit {ctx.config.stall_timeout:g} s"})
        return {"status": "ok", **body}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    # -- tokenizer

    def need_codec():
        if info.codec is None:
            raise ApiError("this server has no tokenizer (start it with --tokenizer-model)", 400)
        return info.codec

    @app.post("/tokenize")
    def tokenize(body: TokenizeBody):
        check_model(body.model)
        codec = need_codec()
        ids = codec.encode(body.prompt)
        if body.add_special_tokens and info.bos_id is not None:
            ids = [info.bos_id] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": info.max_sequence_length}

    @app.post("/detokenize")
    def detokenize(body: DetokenizeBody):
        check_model(body.model)
        codec = need_codec()
        bad = [t for t in body.tokens if t >= info.vocab_size]
        if bad:
            raise ApiError(f"token ids outside [0, {info.vocab_size}): {bad[:5]}", param="tokens")
        return {"prompt": codec.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        need_codec()
        return {"tokenizer_class": info.codec.kind, "model_max_length": info.max_sequence_length,
                "vocab_size": info.vocab_size, "bos_token_id": info.bos_id, "eos_token_id": info.eos_id,
                "bos_token": info.special_tokens.get("bos_token"), "eos_token": info.special_tokens.get("eos_token"),
                "pad_token": info.special_tokens.get("pad_token"), "chat_template": info.chat_template}

    # -- generation

    async def start(jobs: list[Job]) -> Batch:
        batch = Batch(ctx, jobs)
        await run_in_threadpool(batch.check)
        batch.submit()
        return batch

    @app.api_route("/api", methods=["PUT", "POST"])
    async def megatron(body: MegatronBody, request: Request):
        req = await run_in_threadpool(megatron_jobs, body, info)
        if not req.no_log and ctx.config.log_requests:
            log.info("PUT /api: %d prompts, %d tokens each", len(req.prompts), req.jobs[0].max_new_tokens)
        batch = await start(req.jobs)
        choices = [Choice(j, info, keep_stop_token=True, stop_on_eol=req.stop_on_eol,
                          stop_on_double_eol=req.stop_on_double_eol) for j in req.jobs]
        try:
            await batch.run(choices, request)
        except ClientGone:
            return Response(status_code=499)
        return megatron_response(info, req, choices)

    async def serve(req: CompletionRequest, request: Request, chat: bool):
        batch = await start(req.jobs)
        choices = [Choice(j, info, keep_stop_token=False, stops=req.stop) for j in req.jobs for _ in range(j.n)]
        cid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if not req.stream:
            try:
                await batch.run(choices, request)
            except ClientGone:
                return Response(status_code=499)
            return (chat_response if chat else completion_response)(info, req, choices, cid)
        return StreamingResponse(_stream(info, req, batch, choices, cid, request, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        check_model(body.model)
        return await serve(await run_in_threadpool(completion_jobs, body, info), request, chat=False)

    app.post("/completions", include_in_schema=False)(completions)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        check_model(body.model)
        req = await run_in_threadpool(chat_jobs, body, info)
        return await serve(req.completion, request, chat=True)

    return app


def _sse(obj) -> bytes:
    return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode()) + b"\n\n"


async def _stream(info: ModelInfo, req: CompletionRequest, batch: Batch, choices: list[Choice], cid: str,
                  request: Request, chat: bool):
    """Server-sent events, one per choice update; the request is cancelled when the client goes."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"
    out: asyncio.Queue = asyncio.Queue()
    started = [False] * len(choices)

    def chunk(index: int, text: str, logprobs, finish) -> dict:
        if chat:
            delta = {"content": text} if started[index] else {"role": "assistant", "content": text}
            started[index] = True
            c = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            c = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": cid, "object": kind, "created": created, "model": req.model, "choices": [c]}

    echoed = [False] * len(choices)

    async def on_update(i: int) -> None:
        c = choices[i]
        prompt_index = i // req.n
        prefix = ""
        if req.echo and not echoed[i]:
            prefix, echoed[i] = _prompt_text(info, req, c, prompt_index), True
        delta, first, end = c.stream_delta()
        if not (prefix or delta or c.done or end > first):
            return
        lp = None
        if req.logprobs is not None:
            if chat:
                lp = _chat_logprobs(info, req, c, first, end)
            else:
                base = len(_prompt_text(info, req, c, prompt_index)) if req.echo else 0
                lp = _logprobs_obj(info, req, c, first, end, base, with_prompt=bool(prefix))
        await out.put(_sse(chunk(i, prefix + delta, lp, c.finish)))

    async def produce():
        try:
            await batch.run(choices, request, on_update)
            if req.include_usage:
                await out.put(_sse({"id": cid, "object": kind, "created": created, "model": req.model,
                                    "choices": [], "usage": _usage(req.jobs, choices)}))
        except ApiError as e:
            await out.put(_sse({"error": e.body()["error"]}))
        except ClientGone:
            pass
        finally:
            await out.put(None)

    task = asyncio.ensure_future(produce())
    try:
        while (item := await out.get()) is not None:
            yield item
        yield _sse(b"[DONE]")
    finally:
        if not task.done():
            task.cancel()
        batch.cancel()


# ---- uvicorn in a thread -----------------------------------------------------------------------------

def _header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, plus a deadline for a request's headers: uvicorn's keep-alive timer
    restarts on every byte, so a client dribbling headers would hold its connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm()

        def _arm(self):
            if getattr(self, "_header_deadline", None) is not None:
                self._header_deadline.cancel()
            self._header_deadline = self.loop.call_later(seconds, self._headers_late)

        def _headers_late(self):
            waiting = self.cycle is None or self.cycle.response_complete  # no request read since
            if waiting and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc):
            self._header_deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class HttpServer:
    """uvicorn serving the app on an already bound socket (so --port 0 and bind errors are known
    before the engine starts), in a daemon thread: the main thread runs the engine loop."""

    def __init__(self, app, host: str, port: int, *, header_timeout: float = 10.0, keep_alive: float = 5.0,
                 max_connections: int = 1024, max_header_bytes: int = 64 * 1024, log_requests: bool = False):
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
            self.sock.listen(1024)
        except OSError:
            self.sock.close()
            raise
        self.address = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, http=_header_timeout_protocol(header_timeout), lifespan="off",
                                log_level="info" if log_requests else "warning", access_log=log_requests,
                                timeout_keep_alive=keep_alive, limit_concurrency=max_connections,
                                h11_max_incomplete_event_size=max_header_bytes, timeout_graceful_shutdown=5,
                                server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="http",
                                       daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start")

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        self.sock.close()
