"""Prometheus text-format metrics, kept without dependencies (a few counters, gauges and histograms)."""
from __future__ import annotations

import threading
from typing import Callable

PREFIX = "megatron_ssm"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        i = 0
        while i < len(self.buckets) and v > self.buckets[i]:
            i += 1
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def render(self, name: str, help: str) -> list[str]:
        lines = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        cum = 0
        for b, c in zip(self.buckets, self.counts):
            cum += c
            lines.append(f'{name}_bucket{{le="{b}"}} {cum}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """Thread-safe: HTTP threads count requests, the engine loop observes tokens and latencies."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.engine_steps = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)
        self.e2e = Histogram(REQUEST_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = (help, fn)

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_prompt_tokens(self, n: int) -> None:
        with self._lock:
            self.prompt_tokens += n

    def observe_token(self, ttft: float | None, itl: float | None) -> None:
        with self._lock:
            self.generated_tokens += 1
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def observe_step(self) -> None:
        self.engine_steps += 1  # only the engine thread writes it

    def observe_request(self, seconds: float) -> None:
        with self._lock:
            self.e2e.observe(seconds)

    def render(self) -> str:
        p = PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total HTTP requests answered, by endpoint and status code",
                     f"# TYPE {p}_requests_total counter"]
            for (endpoint, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{endpoint="{endpoint}",code="{status}"}} {n}')
            lines += [f"# HELP {p}_prompt_tokens_total Prompt tokens of accepted requests",
                      f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
                      f"# HELP {p}_generation_tokens_total Tokens generated",
                      f"# TYPE {p}_generation_tokens_total counter",
                      f"{p}_generation_tokens_total {self.generated_tokens}",
                      f"# HELP {p}_engine_steps_total Engine steps run (on every rank alike)",
                      f"# TYPE {p}_engine_steps_total counter", f"{p}_engine_steps_total {self.engine_steps}"]
            lines += self.ttft.render(f"{p}_time_to_first_token_seconds",
                                      "Time from a request's arrival to its first generated token")
            lines += self.itl.render(f"{p}_inter_token_latency_seconds",
                                     "Time between consecutive generated tokens of a sequence")
            lines += self.e2e.render(f"{p}_request_duration_seconds", "Time to answer a generation request")
        for name, (help, fn) in self.gauges.items():
            try:
                value = fn()
            except Exception:  # a gauge read racing the engine thread: report nothing rather than fail
                continue
            lines += [f"# HELP {p}_{name} {help}", f"# TYPE {p}_{name} gauge", f"{p}_{name} {value}"]
        return "\n".join(lines) + "\n"
