"""``GET /metrics``: Prometheus metrics of the server, in the text exposition format.

Every app has its own :class:`~prometheus_client.CollectorRegistry` (tests and
embedders may create many apps in one process; the global registry would mix
them). Three sources feed it:

* :class:`MetricsMiddleware` counts HTTP requests by route and status;
* :meth:`ServerMetrics.observe`, an observer of the
  :class:`~chatforge.generation.service.EngineService`, sees every engine request
  whichever route submitted it: tokens, time to first token, inter-token
  latency, request duration, prefix-cache hits;
* gauges read at scrape time: waiting and running sequences, the cache hit ratio,
  and ``chatforge_model_info`` (1 per loaded model, labelled with the device it runs
  on, its dtype, quantisation and engine).

:func:`register_metrics` wires all three into an app (``create_app`` calls it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import exposition as _exposition
from prometheus_client.core import GaugeMetricFamily

from chatforge.generation.types import StreamEvent

PREFIX = "chatforge_"

CONTENT_TYPE = getattr(_exposition, "CONTENT_TYPE_PLAIN_0_0_4", CONTENT_TYPE_LATEST)
"""``text/plain; version=0.0.4``, the text format every Prometheus scraper reads.
prometheus_client >= 0.22 made its ``CONTENT_TYPE_LATEST`` ``version=1.0.0``; for
names like ours (ASCII, no escaping) ``generate_latest``'s output is the same."""

# Buckets in seconds: a CPU server's first tokens take from tens of ms to minutes
# (long prompts, a queue); token gaps from a few ms to a second.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass
class _Live:
    """What the observer remembers of one request in flight."""

    added: float  # when the engine took it (perf_counter)
    last_token: float | None = None  # when its previous token came


class ServerMetrics:
    """The metrics of one app, in their own registry.

    ``occupancy`` returns ``(running, waiting)`` sequence counts (read at scrape time).
    """

    def __init__(self, occupancy: Callable[[], tuple[int, int]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP requests answered, by route (path template; 'other' if unknown) and status.",
            ["route", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of finished engine requests.", registry=r
        )
        self.cached_tokens = Counter(
            PREFIX + "prompt_cached_tokens",
            "Prompt tokens of finished engine requests whose KV came from the prefix cache.",
            registry=r,
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated (all requests).", registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from the engine taking a request to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Seconds between successive generated tokens of a request (one per token).",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Seconds from the engine taking a request to its completion.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        Gauge(
            PREFIX + "queue_length", "Requests waiting for a place in the batch.", registry=r
        ).set_function(lambda: occupancy()[1])
        Gauge(
            PREFIX + "running_sequences", "Sequences in the running batch.", registry=r
        ).set_function(lambda: occupancy()[0])
        Gauge(
            PREFIX + "prefix_cache_hit_ratio",
            "Prompt tokens served from the prefix cache / prompt tokens, since start.",
            registry=r,
        ).set_function(self._hit_ratio)
        self._live: dict[int, _Live] = {}  # by service key; only the service thread touches it
        self._prompt_total = 0  # the two prompt counters' values, for the ratio
        self._cached_total = 0

    def _hit_ratio(self) -> float:
        total = self._prompt_total
        return self._cached_total / total if total else 0.0

    def observe(self, kind: str, key: int, event: StreamEvent | None, now: float) -> None:
        """An :data:`~chatforge.generation.service.Observer` (called on the service thread)."""
        if kind == "add":
            self._live[key] = _Live(added=now)
            return
        live = self._live.get(key)
        if kind == "end" or live is None:
            self._live.pop(key, None)
            return
        assert event is not None
        n = len(event.tokens)  # tokens generated since the previous event (usually 1)
        if n:
            self.generation_tokens.inc(n)
            if live.last_token is None:
                self.ttft.observe(now - live.added)
                n -= 1  # the first token has no gap before it
            else:  # tokens that came together share the gap
                gap = (now - live.last_token) / n
                for _ in range(n):
                    self.itl.observe(gap)
                n = 0
            for _ in range(n):  # the rest of a first event's tokens came at once
                self.itl.observe(0.0)
            live.last_token = now
        c = event.completion
        if c is not None:
            self._live.pop(key, None)
            self.prompt_tokens.inc(c.prompt_tokens)
            self.cached_tokens.inc(c.cached_tokens)
            self._prompt_total += c.prompt_tokens
            self._cached_total += c.cached_tokens
            self.duration.observe(now - live.added)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting HTTP responses by route and status.

    Plain ASGI rather than ``@app.middleware("http")``, whose request wrapping hides
    client disconnects from the routes. The route label is the matched route's path
    template (``/v1/models/{name:path}``), or ``other`` for paths no route knows,
    so a scan of random URLs cannot grow the label set without bound.
    """

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # what the client sees if the app raises before answering

        async def capture(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            # The router records the route it matched in the (shared) scope.
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(route=path, status=str(status)).inc()


class _ModelInfo:
    """``chatforge_model_info``: one sample (value 1) per loaded model, read at scrape
    time, labelled with where and how it runs (``device``: ``cpu``, ``cuda:0``...)."""

    LABELS = ["model", "device", "dtype", "quantize", "engine"]

    def __init__(self, state: Any) -> None:
        self.state = state

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            PREFIX + "model_info",
            "Loaded models (1 each): the device each runs on, its dtype, quantisation and engine.",
            labels=self.LABELS,
        )

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> list[GaugeMetricFamily]:
        family = self._family()
        for base in list(self.state.pool.bases.values()):
            info = getattr(base.loaded, "info", None)
            if info is not None:
                labels = [info.name, info.device, info.dtype, info.quantize, info.engine]
                family.add_metric([str(v) for v in labels], 1)
        return [family]


def register_metrics(app: FastAPI, state: Any) -> ServerMetrics:
    """Add ``GET /metrics`` and the request-counting middleware to ``app``; returns the
    metrics, whose :meth:`~ServerMetrics.observe` the app's EngineService must be given.

    ``state`` is the app's :class:`~chatforge.server.state.ServerState` (its models'
    services, once loaded, give the queue gauges). Call it after the app's other middleware is
    added: the last added is the outermost, so what they refuse (401, 403) is counted.
    """

    def occupancy() -> tuple[int, int]:  # (running, waiting) over every loaded model
        counts = [b.service.occupancy for b in state.pool.bases.values() if b.service is not None]
        return sum(x[0] for x in counts), sum(x[1] for x in counts)

    metrics = ServerMetrics(occupancy)
    metrics.registry.register(_ModelInfo(state))

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route() -> Response:
        return Response(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics
