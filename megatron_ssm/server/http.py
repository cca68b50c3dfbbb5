"""The HTTP front end on rank 0: the standard library's ThreadingHTTPServer, one thread per
connection, no lock around generation (requests meet in the engine's continuous batching).

    PUT  /api              Megatron-LM's text generation server API
    POST /v1/completions   OpenAI's completions API, `stream: true` as server-sent events
    POST /completions      the same (Megatron's path for it)
    GET  /v1/models        the served model, OpenAI style
    GET  /health           200 while serving, 503 while shutting down
    GET  /metrics          Prometheus text format
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .loop import EngineLoop, Handle
from .metrics import Metrics
from .protocol import ApiError, Job, ModelInfo, parse_megatron, parse_openai
from .text import Continuation, find_stop, stable_length

log = logging.getLogger(__name__)

ROUTES = {"/api": ("PUT", "POST"), "/v1/completions": ("POST",), "/completions": ("POST",),
          "/health": ("GET",), "/metrics": ("GET",), "/v1/models": ("GET",)}


@dataclass
class ServerConfig:
    max_body_bytes: int = 1 << 20
    request_timeout: float = 600.0
    log_requests: bool = False


@dataclass
class ServerContext:
    loop: EngineLoop
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


# ---- one prompt's result, built from engine events ----------------------------------------------

class Choice:
    """Tokens of one prompt as they arrive, their text, and when to stop: the engine's stop token
    (kept in `ids` for Megatron, dropped for OpenAI), stop sequences, or end of line (Megatron)."""

    def __init__(self, job: Job, ctx: ServerContext, *, keep_stop_token: bool, stops: list[str] = (),
                 stop_on_eol: bool = False, stop_on_double_eol: bool = False):
        self.job, self.keep_stop_token, self.stops = job, keep_stop_token, list(stops)
        self.stop_on_eol, self.stop_on_double_eol = stop_on_eol, stop_on_double_eol
        codec = ctx.info.codec
        self.cont = Continuation(codec, job.prompt) if codec is not None else None
        self.ids: list[int] = []
        self.lps: list[float | None] = []
        self.pieces: list[str] = []  # each kept token's text
        self.offsets: list[int] = []  # where each kept token's text starts in `text`
        self.prompt_lps: list[float] | None = None
        self.text = ""
        self.generated = 0  # tokens the engine produced (usage), stop token included
        self.finish: str | None = None
        self.sent_chars = 0  # streamed so far
        self.sent_tokens = 0
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def done(self) -> bool:
        return self.finish is not None

    def on_event(self, kind: str, payload) -> bool:
        """Apply one event; True if this choice is now complete and generation should stop."""
        if self.done:
            return False
        if kind == "error":
            raise payload
        if kind == "prompt_logprobs":
            self.prompt_lps = payload
            return False
        if kind == "done":
            self.finish = "length"
            return True
        o = payload
        self.generated += 1
        if not (o.finish_reason == "stop" and not self.keep_stop_token):
            self.ids.append(o.token)
            self.lps.append(o.logprob)
            new_text = self.cont.text(self.ids) if self.cont is not None else ""
            piece = new_text[len(self.text):]
            self.offsets.append(len(self.text))
            self.pieces.append(piece)
            before, self.text = self.text, new_text
            if self.stops:
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
        del self.ids[keep:], self.lps[keep:], self.pieces[keep:], self.offsets[keep:]
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


class Batch:
    """The prompts of one HTTP request, submitted together; their events arrive on one queue."""

    def __init__(self, ctx: ServerContext, jobs: list[Job]):
        self.ctx = ctx
        self.q: queue.Queue = queue.Queue()
        self.handles = [Handle(j, self.q, i) for i, j in enumerate(jobs)]
        ctx.loop.check(self.handles)  # the engine's rules, before Choice decodes the prompts
        self.deadline = time.monotonic() + ctx.config.request_timeout
        self.start = time.monotonic()

    def submit(self) -> None:
        self.ctx.loop.submit(self.handles)
        self.ctx.metrics.count_prompt_tokens(sum(len(h.job.prompt) for h in self.handles))

    def run(self, choices: list[Choice], on_update=None) -> None:
        """Feed events to choices until all are done; on_update(index) after each applied event."""
        try:
            while not all(c.done for c in choices):
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(f"the request did not finish within {self.ctx.config.request_timeout:g} s "
                                   "(--request-timeout)", 504)
                try:
                    index, kind, payload = self.q.get(timeout=min(left, 1.0))
                except queue.Empty:
                    if self.ctx.loop.stopped.is_set() and self.q.empty():
                        raise ApiError(f"the inference engine stopped: {self.ctx.loop.failure or 'shutdown'}", 503)
                    continue
                if choices[index].done:
                    continue  # stopped here (stop sequence) while the engine was still going
                if choices[index].on_event(kind, payload):
                    self.ctx.loop.cancel(self.handles[index])  # no-op if the engine finished it
                if on_update is not None:
                    on_update(index)
        except BaseException:
            self.cancel()
            raise
        finally:
            self.ctx.metrics.observe_request(time.monotonic() - self.start)

    def cancel(self) -> None:
        for h in self.handles:
            self.ctx.loop.cancel(h)


# ---- responses -----------------------------------------------------------------------------------

def megatron_response(ctx: ServerContext, req, choices: list[Choice]) -> dict:
    codec = ctx.info.codec
    tokens = [c.job.prompt + c.ids for c in choices]
    out = {"text": [p + c.text for p, c in zip(req.prompts, choices)],
           "segments": [[codec.piece(t) for t in toks] for toks in tokens],
           "logprobs": [list(c.prompt_lps or []) + [float(x) for x in c.lps] for c in choices] if req.logprobs else None,
           "tokens": tokens}
    return out


def _prompt_text(ctx: ServerContext, req, i: int) -> str:
    t = req.prompt_texts[i]
    if t is not None:
        return t
    return ctx.info.codec.decode(req.jobs[i].prompt) if ctx.info.codec is not None else ""


def _logprobs_obj(ctx: ServerContext, req, c: Choice, i: int, first: int, end: int, base: int,
                  with_prompt: bool) -> dict:
    toks, lps, offs = [], [], []
    if with_prompt:
        codec = ctx.info.codec
        prompt = c.job.prompt
        pieces = [codec.piece(t).replace("\u2581", " ") for t in prompt] if codec is not None else [""] * len(prompt)
        pos = 0
        for t, p in enumerate(pieces):
            toks.append(p)
            offs.append(pos)
            pos += len(p)
        lps += [None] + list(c.prompt_lps or [])[: len(prompt) - 1]
    toks += c.pieces[first:end]
    lps += [float(x) if x is not None else None for x in c.lps[first:end]]
    offs += [base + o for o in c.offsets[first:end]]
    top = None
    if req.logprobs:
        top = [{t: lp} if lp is not None else None for t, lp in zip(toks, lps)]
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": top, "text_offset": offs}


def completion_response(ctx: ServerContext, req, choices: list[Choice], cid: str) -> dict:
    out = []
    for i, c in enumerate(choices):
        prefix = _prompt_text(ctx, req, i) if req.echo else ""
        choice = {"index": i, "text": prefix + c.text, "finish_reason": c.finish,
                  "logprobs": _logprobs_obj(ctx, req, c, i, 0, len(c.ids), len(prefix), req.echo)
                  if req.logprobs is not None else None}
        if ctx.info.codec is None:
            choice["token_ids"] = list(c.ids)
        out.append(choice)
    prompt_tokens = sum(len(j.prompt) for j in req.jobs)
    completion_tokens = sum(c.generated for c in choices)
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": req.model,
            "choices": out, "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}}


# ---- the handler ---------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "megatron-ssm"
    sys_version = ""
    timeout = 120  # seconds a connection may sit idle or dribble its body
    ctx: ServerContext  # set on the subclass made by make_server

    # -- plumbing

    def log_message(self, fmt, *args):
        if self.ctx.config.log_requests:
            log.info("%s %s", self.address_string(), fmt % args)

    def _endpoint(self) -> str:
        path = self.path.split("?", 1)[0]
        return path if path in ROUTES else "other"

    def _send_json(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.ctx.metrics.count_request(self._endpoint(), status)

    def _send_error(self, err: ApiError, headers: dict | None = None) -> None:
        self._send_json(err.status, err.body(), headers)

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError("chunked request bodies are not supported: send Content-Length", 411)
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise ApiError("a JSON request body with a Content-Length header is required", 411)
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self.close_connection = True
            raise ApiError(f"bad Content-Length {length!r}") from None
        limit = self.ctx.config.max_body_bytes
        if n > limit:
            self.close_connection = True
            if n <= 16 * limit:  # read it away, so a client still sending gets the answer, not a reset
                left = n
                while left > 0:
                    got = self.rfile.read(min(left, 1 << 16))
                    if not got:
                        break
                    left -= len(got)
                self._body_read = True
            raise ApiError(f"request body of {n} bytes exceeds the limit of {limit} bytes (--max-request-bytes)", 413)
        data = self.rfile.read(n)
        self._body_read = True
        if len(data) < n:
            self.close_connection = True
            raise ApiError(f"request body ended after {len(data)} of {n} bytes")
        try:
            body = json.loads(data)
        except UnicodeDecodeError as e:
            raise ApiError(f"malformed JSON: the body is not UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ApiError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        except RecursionError:
            raise ApiError("malformed JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
        return body

    def _close_if_body_unread(self) -> None:
        if not self._body_read and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            self.close_connection = True  # the unread body would be taken for the next request

    def _dispatch(self, method: str) -> None:
        self.ctx.enter()
        self._body_read = False
        try:
            path = self.path.split("?", 1)[0]
            methods = ROUTES.get(path)
            if methods is None:
                raise ApiError(f"no endpoint {path}; try PUT /api, POST /v1/completions, GET /health or GET /metrics",
                               404, type="not_found_error")
            if method not in methods:
                err = ApiError(f"{method} is not allowed on {path}; use {' or '.join(methods)}", 405)
                self._close_if_body_unread()
                return self._send_error(err, {"Allow": ", ".join(methods)})
            getattr(self, "_" + {"/api": "megatron", "/v1/completions": "completions", "/completions": "completions",
                                 "/health": "health", "/metrics": "metrics", "/v1/models": "models"}[path])()
        except ApiError as e:
            self._close_if_body_unread()
            self._send_error(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as e:  # a bug: answer 500 and keep serving everyone else
            log.exception("error while answering %s %s", method, self.path)
            self.close_connection = True
            try:
                self._send_error(ApiError(f"internal error: {type(e).__name__}: {e}", 500))
            except OSError:
                pass
        finally:
            self.ctx.leave()

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PATCH(self):
        self._dispatch("PATCH")

    # -- endpoints

    def _health(self) -> None:
        loop = self.ctx.loop
        status = 200 if loop.accepting else 503
        self._send_json(status, {"status": "ok" if status == 200 else "shutting down", "model": self.ctx.info.name,
                                 "tensor_parallel": self.ctx.info.tp, "running": loop.running(),
                                 "waiting": loop.queue_depth()})

    def _metrics(self) -> None:
        data = self.ctx.metrics.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.ctx.metrics.count_request("/metrics", 200)

    def _models(self) -> None:
        self._send_json(200, {"object": "list", "data": [
            {"id": self.ctx.info.name, "object": "model", "created": self.ctx.created, "owned_by": "megatron-ssm",
             "max_model_len": self.ctx.info.max_sequence_length}]})

    def _megatron(self) -> None:
        req = parse_megatron(self._read_json(), self.ctx.info)
        if not req.no_log and self.ctx.config.log_requests:
            log.info("PUT /api from %s: %d prompts, %d tokens each", self.address_string(), len(req.prompts),
                     req.jobs[0].max_new_tokens)
        batch = Batch(self.ctx, req.jobs)
        choices = [Choice(j, self.ctx, keep_stop_token=True, stop_on_eol=req.stop_on_eol,
                          stop_on_double_eol=req.stop_on_double_eol) for j in req.jobs]
        batch.submit()
        batch.run(choices)
        self._send_json(200, megatron_response(self.ctx, req, choices))

    def _completions(self) -> None:
        req = parse_openai(self._read_json(), self.ctx.info)
        batch = Batch(self.ctx, req.jobs)
        choices = [Choice(j, self.ctx, keep_stop_token=False, stops=req.stop) for j in req.jobs]
        cid = "cmpl-" + uuid.uuid4().hex
        batch.submit()
        if not req.stream:
            batch.run(choices)
            return self._send_json(200, completion_response(self.ctx, req, choices, cid))
        self._stream(req, batch, choices, cid)

    # -- server-sent events over chunked transfer encoding

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _sse(self, obj) -> None:
        self._write_chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _stream(self, req, batch: Batch, choices: list[Choice], cid: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        created = int(time.time())

        def chunk(index: int, text: str, logprobs, finish) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}

        echoed = [False] * len(choices)

        def on_update(i: int) -> None:
            c = choices[i]
            prefix = ""
            if req.echo and not echoed[i]:
                prefix, echoed[i] = _prompt_text(self.ctx, req, i), True
            delta, first, end = c.stream_delta()
            if not (prefix or delta or c.done or end > first):
                return
            lp = None
            if req.logprobs is not None:
                base = len(_prompt_text(self.ctx, req, i)) if req.echo else 0
                lp = _logprobs_obj(self.ctx, req, c, i, first, end, base, with_prompt=bool(prefix))
            self._sse(chunk(i, prefix + delta, lp, c.finish))

        try:
            try:
                batch.run(choices, on_update)
            except ApiError as e:
                self._sse({"error": e.body()["error"]})
                self.ctx.metrics.count_request(self._endpoint(), e.status)
            else:
                if req.include_usage:
                    p = sum(len(j.prompt) for j in req.jobs)
                    g = sum(c.generated for c in choices)
                    self._sse({"id": cid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [], "usage": {"prompt_tokens": p, "completion_tokens": g,
                                                        "total_tokens": p + g}})
                self.ctx.metrics.count_request(self._endpoint(), 200)
            self._sse(b"[DONE]")
            self._write_chunk(b"")
        except OSError:  # the client went away: stop generating for it
            batch.cancel()
            self.close_connection = True


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


def make_server(host: str, port: int, ctx: ServerContext) -> Server:
    handler = type("BoundHandler", (Handler,), {"ctx": ctx})
    return Server((host, port), handler)
