"""The server's engine loop and HTTP layer in one process, on test_scheduling's stand-in model (whose
greedy tokens have a closed form): a stop drains in-flight requests; the drain timeout and a second
signal abort what is left with a 503; --request-timeout answers 504; an error mid-stream arrives as
an SSE error event followed by [DONE]. World of one, no sockets, no sleeps: milliseconds."""
from __future__ import annotations

import json
import threading

import pytest
from test_scheduling import CountingModel, _prompts, expected

pytest.importorskip("pydantic")  # the server's protocol; the GPU machine's `-m gpu` collection has none

from megatron_ssm.inference.engine import Engine, EngineConfig  # noqa: E402
from megatron_ssm.server.loop import ControlChannel, EngineLoop, Handle  # noqa: E402
from megatron_ssm.server.metrics import Metrics  # noqa: E402
from megatron_ssm.server.protocol import ApiError, Job, ModelInfo  # noqa: E402

V = 61


class ListSink:
    """Collects a handle's events; `on_token(sink)` runs at each token (to act mid-generation)."""

    def __init__(self, on_token=None):
        self.events: list[tuple] = []
        self.on_token = on_token

    def put(self, item: tuple) -> None:
        self.events.append(item)
        if item[1] == "token" and self.on_token is not None:
            self.on_token(self)

    def tokens(self) -> list[int]:
        return [o.token for _, kind, o in self.events if kind == "token"]

    def error(self) -> ApiError | None:
        errs = [p for _, kind, p in self.events if kind == "error"]
        assert len(errs) <= 1, self.events
        return errs[0] if errs else None


def _loop(drain_timeout: float = 60.0, **cfg) -> EngineLoop:
    engine = Engine(CountingModel(), EngineConfig(**{"max_batch": 4, **cfg}))
    return EngineLoop(engine, ControlChannel(None, 1), 0, drain_timeout=drain_timeout, heartbeat=0.01)


def _submit(loop: EngineLoop, prompt: list[int], n: int, sink: ListSink) -> Handle:
    h = Handle(Job(prompt, n), sink)
    loop.check([h])
    loop.submit([h])
    return h


def test_stop_drains_in_flight_requests_and_refuses_new_ones(seed):
    """A stop (SIGTERM) while requests run: each finishes with all its tokens, a request that comes
    after the stop gets 503, and the loop returns once nothing is left."""
    loop = _loop(max_batch=1)  # the second request waits for the first one's slot
    prompts = _prompts(seed, [5, 9])
    refused = []

    def stop_then_submit(sink):
        if len(sink.tokens()) == 1 and not refused:
            loop.request_stop()
            with pytest.raises(ApiError) as e:
                _submit(loop, [1, 2], 3, ListSink())
            refused.append(e.value)

    sinks = [ListSink(stop_then_submit), ListSink()]
    for p, s in zip(prompts, sinks):
        _submit(loop, p, 6, s)
    loop.run()
    assert [s.tokens() for s in sinks] == [expected(p, 6) for p in prompts], f"seed {seed}"
    assert all(s.error() is None for s in sinks)
    assert refused[0].status == 503 and "shutting down" in refused[0].message
    assert not loop.engine.has_work() and loop.stopped.is_set()


@pytest.mark.parametrize("how", ["drain-timeout", "second-signal"])
def test_stop_aborts_what_is_left_after_the_drain_timeout_or_a_second_signal(seed, how):
    """Past --drain-timeout (here: 0 s), or at a second SIGTERM, the running request, the one waiting
    for a slot and the one not yet handed to the engine all get 503 and the loop returns at once:
    the tokens each got are the first of its closed-form continuation, none after the stop."""
    loop = _loop(drain_timeout=0.0 if how == "drain-timeout" else 60.0, max_batch=1)
    prompts = _prompts(seed, [4, 6, 3])
    at_stop = {}

    def stop(sink):
        if len(sink.tokens()) == 3 and not at_stop:
            loop.request_stop()
            if how == "second-signal":
                loop.request_stop()
            at_stop["engine"] = (loop.engine.num_running, loop.engine.num_waiting)

    sinks = [ListSink(stop), ListSink(), ListSink()]
    _submit(loop, prompts[0], 1000, sinks[0])
    _submit(loop, prompts[1], 1000, sinks[1])
    loop.run()
    assert at_stop["engine"] == (1, 1)  # one running, one waiting for its slot
    assert sinks[0].tokens() == expected(prompts[0], 3), f"seed {seed}"
    assert sinks[1].tokens() == []
    for s in sinks[:2]:
        err = s.error()
        assert err is not None and err.status == 503 and "shut down before this request finished" in err.message
    assert not loop.engine.has_work() and loop.engine.num_waiting == 0


def test_a_stop_fails_requests_still_queued_for_the_engine(seed):
    """Requests submitted but not yet taken by the loop when the drain timeout has passed."""
    loop = _loop(drain_timeout=0.0)
    sinks = [ListSink() for _ in range(3)]
    for p, s in zip(_prompts(seed, [3, 4, 5]), sinks):
        _submit(loop, p, 4, s)
    loop.request_stop()
    loop.run()
    for s in sinks:
        assert s.tokens() == [] and s.error() is not None and s.error().status == 503


# ---- HTTP: 504 and an error in a stream ------------------------------------------------------------

class FailingModel(CountingModel):
    """The stand-in model, raising at its `fail_at`-th forward (a CUDA error, an OOM)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at = fail_at

    def forward(self, *a, **k):
        if len(self.calls) + 1 == self.fail_at:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().forward(*a, **k)


@pytest.fixture
def app_with():
    """app_with(model, timeout) -> a TestClient of the server's app on an engine loop over model,
    the loop running in a thread (or, with run=False, never running: nothing is ever generated)."""
    from fastapi.testclient import TestClient

    from megatron_ssm.server.app import ServerConfig, ServerContext, build_app

    started = []

    def make(model, request_timeout: float = 600.0, run: bool = True):
        loop = EngineLoop(Engine(model, EngineConfig(max_batch=2)), ControlChannel(None, 1), 0, heartbeat=0.01)
        info = ModelInfo(name="stand-in", vocab_size=V, max_sequence_length=None, eos_id=None, bos_id=None, codec=None)
        ctx = ServerContext(loop, info, Metrics(), ServerConfig(request_timeout=request_timeout))
        if run:
            t = threading.Thread(target=lambda: _run_quietly(loop), daemon=True)
            t.start()
            started.append((loop, t))
        return TestClient(build_app(ctx), base_url="http://127.0.0.1")

    yield make
    for loop, t in started:
        loop.request_stop()
        loop.request_stop()
        t.join(timeout=30)
        assert not t.is_alive()


def _run_quietly(loop: EngineLoop) -> None:
    try:
        loop.run()
    except RuntimeError:
        pass  # the failing model's error: the test reads it from the responses


def _sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_request_timeout_answers_504(app_with, stream):
    """An engine that never produces (a hung step): after --request-timeout the client gets 504 (in a
    stream: an error event with code 504, then [DONE]), not a connection held forever."""
    client = app_with(CountingModel(), request_timeout=0.2, run=False)
    r = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "stream": stream})
    if not stream:
        assert r.status_code == 504, r.text
        assert "--request-timeout" in r.json()["error"]["message"]
        return
    assert r.status_code == 200
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 504, events
    assert "--request-timeout" in events[-2]["error"]["message"]


def test_an_engine_error_mid_stream_ends_the_stream_with_an_error_event(app_with, seed):
    """The engine fails after some tokens were streamed: the client gets those tokens' chunks, then
    an SSE error event naming the failure (503), then [DONE]; the loop has stopped, so a new request
    is refused with 503 rather than queued forever."""
    prompt = _prompts(seed, [5])[0]
    client = app_with(FailingModel(fail_at=4))  # prefill, then 2 decode steps, then the failure
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 50, "stream": True,
                                             "temperature": 0, "logprobs": 0})
    assert r.status_code == 200
    events = _sse_events(r.text)
    assert events[-1] == "[DONE]", events
    err = events[-2]["error"]
    assert err["code"] == 503 and "illegal memory access" in err["message"], events
    tokens = [t for e in events[:-2] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert len(tokens) == 3, f"seed {seed}: {events}"  # one token per forward before the failure
    after = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert after.status_code == 503 and "illegal memory access" in after.json()["error"]["message"]
