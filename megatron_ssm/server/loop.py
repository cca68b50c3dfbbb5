"""The engine loop: one per rank, all in step.

Rank 0's HTTP threads have the engine check parsed, tokenized requests (`EngineLoop.check`, i.e.
`Engine.check_request`), hand them to `EngineLoop.submit` and read their tokens from a queue.
Rank 0's loop thread, once per iteration, takes what arrived (new requests, cancellations, a
shutdown), broadcasts it to every rank in one small control message over a gloo group, and then
every rank applies the message to its own engine in the same order and runs the same
`engine.step()`. The engines, fed identical calls, stay identical: request ids are assigned
alike, and every rank joins the same collectives.

When idle, rank 0 waits for work but still broadcasts an empty message every `heartbeat` seconds,
so a rank whose rank 0 died learns it from the control group's timeout instead of waiting forever.
Each iteration stamps `beat`: a loop stuck in a step (a rank that hangs) shows as an old beat,
which `/health` reports.

Admission is fair between HTTP requests: rank 0 keeps each request's prompts apart and hands the
engine, round robin over requests, only about one step's worth of prompt tokens beyond what it
already waits on, so a request of many long prompts cannot queue ahead of everything after it.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import torch.distributed as dist

from ..inference.engine import Engine, Request
from .metrics import Metrics
from .protocol import ApiError, Job

log = logging.getLogger(__name__)


class Sink(Protocol):
    def put(self, item: tuple) -> None: ...


class Handle:
    """One prompt in flight, as one engine request of `job.n` forks (choice indices index ..
    index + n - 1). Events go to `sink` as (choice index, kind, payload): ("prompt_logprobs",
    TokenOutput), ("token", TokenOutput), ("done", None), ("error", ApiError)."""

    def __init__(self, job: Job, sink: Sink, index: int = 0, batch: object = None):
        self.job, self.sink, self.index, self.batch = job, sink, index, batch
        self.engine_id: int | None = None
        self.live = set(range(job.n))  # forks still generating
        self.cancelled = False  # every fork
        self.finished = False
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def score_only(self) -> bool:
        return self.job.max_new_tokens == 0

    def request(self) -> Request:
        """The engine's request. A score-only job (max_new_tokens 0) runs as a prompt_logprobs
        request with no new tokens, even when its log-probs are not wanted (OpenAI echo alone)."""
        j = self.job
        return Request(list(j.prompt), j.max_new_tokens, j.sampling, tuple(j.stop_ids), j.logprobs,
                       prompt_logprobs=j.prompt_logprobs or self.score_only, top_logprobs=j.top_logprobs, n=j.n)


@dataclass
class Message:
    """What rank 0 tells every rank before a step."""

    add: list[Request]
    abort: list[int]  # engine request ids
    shutdown: bool = False


class ControlChannel:
    """Broadcasts rank 0's messages over a gloo group (CPU objects only: no CUDA tensors, and gloo
    honours the group's timeout, so a dead peer surfaces as an error)."""

    def __init__(self, group: dist.ProcessGroup | None, world: int):
        self.group, self.world = group, world

    def exchange(self, msg: Message | None) -> Message:
        if self.world == 1:
            return msg
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


class StopTimeout(RuntimeError):
    pass


class EngineLoop:
    def __init__(self, engine: Engine, channel: ControlChannel, rank: int, metrics: Metrics | None = None, *,
                 heartbeat: float = 0.5, drain_timeout: float = 20.0, worker_grace: float = 15.0,
                 max_queue: int = 4096):
        self.engine, self.channel, self.rank = engine, channel, rank
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.heartbeat, self.drain_timeout, self.worker_grace = heartbeat, drain_timeout, worker_grace
        self._cv = threading.Condition()
        self._pending: deque[deque[Handle]] = deque()  # per HTTP request, in arrival order
        self._cancels: list[tuple[Handle, int | None]] = []  # (handle, fork or None: all)
        self._active: dict[int, tuple[Handle, int]] = {}  # engine id -> (handle, fork) (rank 0)
        self.beat = time.monotonic()  # when the loop last began an iteration
        self._stop_at: float | None = None  # when a stop was requested (signal handler)
        self._force = False
        self.failure: str | None = None
        self.stopped = threading.Event()

    # ---- rank 0: called from HTTP threads --------------------------------------------------------

    @property
    def accepting(self) -> bool:
        return self._stop_at is None and self.failure is None

    def check(self, handles: list[Handle]) -> None:
        """ApiError (400) naming the first handle the engine would refuse (Engine.check_request).
        Call before anything else uses the prompts (decoding them assumes valid token ids)."""
        for h in handles:
            try:
                self.engine.check_request(h.request())
            except ValueError as e:
                raise ApiError(f"prompt {h.index}: {e}" if len(handles) > 1 else str(e), param="prompt") from None

    def submit(self, handles: list[Handle]) -> None:
        """Queue handles (already passed `check`) for the next broadcast."""
        with self._cv:
            if not self.accepting:
                raise ApiError("the server is shutting down" if self.failure is None else
                               f"the inference engine stopped: {self.failure}", 503)
            if self.queue_depth() + len(handles) > self.max_queue:
                raise ApiError(f"the server is overloaded: {self.queue_depth()} requests are waiting "
                               f"(--max-queued-requests {self.max_queue}); retry later", 503)
            if handles:
                self._pending.append(deque(handles))
            self._cv.notify()

    def cancel(self, handle: Handle, fork: int | None = None) -> None:
        """Stop generating for handle, or only for one of its forks (client gone, stop sequence
        seen); later tokens are dropped."""
        with self._cv:
            if handle.finished or handle.cancelled or (fork is not None and fork not in handle.live):
                return
            if fork is None or handle.live == {fork}:
                handle.cancelled, fork = True, None
            else:
                handle.live.discard(fork)
            self._cancels.append((handle, fork))
            self._cv.notify()

    def queue_depth(self) -> int:
        return sum(len(q) for q in self._pending) + self.engine.num_waiting

    def heartbeat_age(self) -> float:
        """Seconds since the loop last began an iteration (0 once it has stopped)."""
        return 0.0 if self.stopped.is_set() else time.monotonic() - self.beat

    def running(self) -> int:
        return self.engine.num_running

    # ---- signals (main thread; only flags, no locks) ---------------------------------------------

    def request_stop(self) -> None:
        """First call: finish in-flight requests (up to drain_timeout), refuse new ones, then stop
        every rank. A second call on rank 0 aborts what is still running at once."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        elif self.rank == 0:
            self._force = True

    # ---- the loop --------------------------------------------------------------------------------

    def run(self) -> None:
        """Run until shutdown; raises if a collective fails (a rank died) or the engine fails."""
        try:
            if self.rank == 0:
                self._run_first()
            else:
                self._run_other()
        except BaseException as e:
            self.failure = f"{type(e).__name__}: {e}"
            raise
        finally:
            if self.rank == 0:
                self._fail_everything()
            self.stopped.set()

    def _run_first(self) -> None:
        while True:
            self.beat = time.monotonic()
            handles, aborts, shutdown = self._collect()
            msg = Message([h.request() for h in handles], aborts, shutdown)
            self.channel.exchange(msg)
            self._apply(msg, handles)
            if shutdown:
                return
            if self.engine.has_work():
                outputs = self.engine.step()
                self.metrics.observe_step()
                self._dispatch(outputs)

    def _run_other(self) -> None:
        while True:
            self.beat = time.monotonic()
            msg = self.channel.exchange(None)
            self._apply(msg, None)
            if msg.shutdown:
                return
            if self.engine.has_work():
                self.engine.step()
            if self._stop_at is not None and time.monotonic() > self._stop_at + self.drain_timeout + self.worker_grace:
                raise StopTimeout(f"a stop was requested {time.monotonic() - self._stop_at:.0f} s ago and rank 0 "
                                  "has not shut the server down")

    def _collect(self) -> tuple[list[Handle], list[int], bool]:
        with self._cv:
            if not (self._pending or self._cancels or self.engine.has_work() or self._stop_at is not None):
                self._cv.wait(self.heartbeat)
            adds = self._take_fairly()
            aborts = []
            for h, fork in self._cancels:
                # a handle without an engine id is either still pending (dropped in _take_fairly)
                # or being applied right now (_apply sees `cancelled` and queues it here again)
                if h.engine_id is None:
                    continue
                for f in range(h.job.n) if fork is None else (fork,):
                    owner = self._active.get(h.engine_id + f)
                    if owner is not None and owner[0] is h:
                        del self._active[h.engine_id + f]
                        aborts.append(h.engine_id + f)
                if fork is None:
                    h.finished = True
            self._cancels.clear()
        if self._stop_at is None:
            return adds, aborts, False
        if not adds and not self._active and not self.engine.has_work():
            return [], aborts, True
        if self._force or time.monotonic() > self._stop_at + self.drain_timeout:
            gone = ApiError("the server shut down before this request finished", 503)
            for eid, (h, _) in self._active.items():
                aborts.append(eid)
                self._fail(h, gone)
            self._active.clear()
            with self._cv:
                adds += [h for q in self._pending for h in q]
                self._pending.clear()
            for h in adds:
                self._fail(h, gone)
            return [], aborts, True
        return adds, aborts, False

    def _take_fairly(self) -> list[Handle]:
        """Pending handles for the engine (call with the lock held): round robin over HTTP
        requests, while what the engine waits on stays within about one step's prompt tokens."""
        budget = self.engine.config.max_prefill_tokens - sum(len(s.req.prompt) for s in self.engine.waiting)
        adds: list[Handle] = []
        while self._pending and (budget > 0 or not (adds or self.engine.num_waiting)):
            q = self._pending.popleft()
            h = q.popleft()
            if h.cancelled:
                h.finished = True
            else:
                adds.append(h)
                budget -= len(h.job.prompt)
            if q:
                self._pending.append(q)  # its next prompt waits for the other requests' turns
        return adds

    def _apply(self, msg: Message, handles: list[Handle] | None) -> None:
        for eid in msg.abort:
            self.engine.abort(eid)
        for i, req in enumerate(msg.add):
            h = handles[i] if handles is not None else None
            try:
                eid = self.engine.add_request(req)
            except ValueError as e:  # submit checked it; should it still fail, every rank refuses it alike
                if h is not None:
                    self._fail(h, ApiError(str(e)))
                continue
            if h is not None:
                h.engine_id = eid
                for f in range(h.job.n):
                    self._active[eid + f] = (h, f)
                with self._cv:
                    if h.cancelled:  # cancelled while being applied: abort it next iteration
                        self._cancels.append((h, None))
                    else:
                        self._cancels += [(h, f) for f in range(h.job.n) if f not in h.live]

    def _dispatch(self, outputs) -> None:
        now = time.monotonic()
        for o in outputs:
            owner = self._active.get(o.request_id)
            if owner is None:
                continue
            h, fork = owner
            if o.prompt_logprobs is not None and h.job.prompt_logprobs:
                h.sink.put((h.index + fork, "prompt_logprobs", o))
            if h.score_only:  # its one output carries no token
                del self._active[o.request_id]
                h.finished = True
                h.sink.put((h.index, "done", None))
                continue
            ttft = itl = None
            if h.first_token_at is None:
                h.first_token_at = now
                ttft = now - h.submitted
            else:
                itl = now - h.last_token_at
            h.last_token_at = now
            self.metrics.observe_token(ttft, itl)
            if o.finished:
                del self._active[o.request_id]
                h.live.discard(fork)
                h.finished = not h.live
            h.sink.put((h.index + fork, "token", o))

    def _fail(self, h: Handle, err: ApiError) -> None:
        if h.finished:
            return
        h.finished = True
        h.sink.put((h.index, "error", err))

    def _fail_everything(self) -> None:
        with self._cv:
            if self._stop_at is None:
                self._stop_at = time.monotonic()
            err = ApiError("the server shut down before this request finished" if self.failure is None else
                           f"the inference engine stopped: {self.failure}", 503)
            for h in [h for q in self._pending for h in q] + [h for h, _ in self._active.values()]:
                self._fail(h, err)
            self._pending.clear()
            self._active.clear()
