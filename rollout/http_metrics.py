"""``GET /metrics`` of the HTTP front end: Prometheus' text exposition format (version 0.0.4), written by hand
(a few counters, one histogram and the backend's gauges do not earn a dependency).

``MetricsMiddleware`` (pure ASGI, so a streamed response is timed to its last byte) counts every request by
endpoint and status and observes its latency; the front end adds token counts; ``render`` adds the gauges read
at scrape time (in-flight requests, the backend's KV cache and sessions). Endpoints outside the app's routes are
counted as ``other``, so random paths cannot grow the label set.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from typing import Any

# Request latency buckets, seconds (generation: from milliseconds to minutes).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)   # per bucket (not cumulative; summed when rendered)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                break


class HttpMetrics:
    """The front end's counters (asyncio thread only)."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()   # (endpoint, status) -> requests answered
        self.latency: dict[str, _Histogram] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] += 1
        self.latency.setdefault(endpoint, _Histogram()).observe(seconds)

    def add_tokens(self, prompt_tokens: int, generation_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += generation_tokens

    def render(self, in_flight: int, max_in_flight: int, backend_stats: dict[str, Any] | None) -> str:
        """The exposition text. ``backend_stats``: the backend's ``stats()["total"]`` (None: unavailable)."""
        out: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

        family("rollout_http_requests_total", "counter", "HTTP requests answered, by endpoint and status.",
               [(_labels(endpoint=e, status=str(s)), n) for (e, s), n in sorted(self.requests.items())])
        out.append("# HELP rollout_http_request_duration_seconds Request latency to the response's last byte.")
        out.append("# TYPE rollout_http_request_duration_seconds histogram")
        for endpoint, h in sorted(self.latency.items()):
            cumulative = 0
            for bound, n in zip(BUCKETS, h.counts):
                cumulative += n
                out.append(f"rollout_http_request_duration_seconds_bucket{_labels(endpoint=endpoint, le=str(bound))} "
                           f"{cumulative}")
            out.append(f"rollout_http_request_duration_seconds_bucket{_labels(endpoint=endpoint, le='+Inf')} "
                       f"{h.count}")
            out.append(f"rollout_http_request_duration_seconds_sum{_labels(endpoint=endpoint)} {_number(h.sum)}")
            out.append(f"rollout_http_request_duration_seconds_count{_labels(endpoint=endpoint)} {h.count}")
        family("rollout_http_prompt_tokens_total", "counter", "Prompt tokens of answered completions.",
               [("", self.prompt_tokens)])
        family("rollout_http_generation_tokens_total", "counter", "Tokens generated for answered completions.",
               [("", self.generation_tokens)])
        family("rollout_http_requests_in_flight", "gauge", "Completions being generated (streams included).",
               [("", in_flight)])
        family("rollout_http_max_in_flight", "gauge", "In-flight limit; past it requests get 429.",
               [("", max_in_flight)])
        if backend_stats is not None:
            total = backend_stats.get("num_total_blocks") or 0
            held = backend_stats.get("num_held_blocks") or 0
            family("rollout_kv_cache_usage_ratio", "gauge", "Device KV blocks held by sequences or idle sessions.",
                   [("", held / total if total else 0.0)])
            family("rollout_kv_cache_blocks", "gauge", "Device KV blocks by state.",
                   [(_labels(state="held"), held), (_labels(state="total"), total)])
            family("rollout_open_sessions", "gauge", "Open multi-turn sessions.",
                   [("", backend_stats.get("open_sessions") or 0)])
            family("rollout_running_sequences", "gauge", "Sequences the engine is generating.",
                   [("", backend_stats.get("num_running") or 0)])
            family("rollout_waiting_sequences", "gauge", "Sequences queued for admission.",
                   [("", backend_stats.get("num_waiting") or 0)])
        return "\n".join(out) + "\n"


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
    return repr(value) if isinstance(value, float) else str(int(value))


class MetricsMiddleware:
    """Counts and times every HTTP request; ``endpoints``: the paths counted by name (others: ``other``)."""

    def __init__(self, app: Any, metrics: HttpMetrics, endpoints: frozenset[str]) -> None:
        self.app, self.metrics, self.endpoints = app, metrics, endpoints

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope.get("path", "") if scope.get("path", "") in self.endpoints else "other"
        status = 500       # an exception past every handler: what the server answers
        start = time.monotonic()

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.observe_request(endpoint, status, time.monotonic() - start)
