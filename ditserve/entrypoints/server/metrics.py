"""Prometheus metrics of one server: HTTP requests, queue depth, batches, latencies, cache work.

Each app owns its own registry (several apps can share one process, as tests do), fed by an ASGI middleware
(requests by route and status) and by an engine observer (batches, step latency, cache statistics).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ditserve.engine.engine import StepReport

#: HTTP methods counted by name; any other (the client chooses it freely) is counted as ``OTHER``
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: the label of every method, and every path, that is not one of ours: labels must stay a bounded set
OTHER = "other"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class ServerMetrics:
    def __init__(self, queue_depth: Any) -> None:
        #: the app's route templates (set once its routes exist); anything else is labelled ``OTHER``
        self.known_routes: frozenset[str] = frozenset()
        self.registry = CollectorRegistry()
        self.requests = Counter("ditserve_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.request_latency = Histogram("ditserve_http_request_latency_seconds", "HTTP request latency",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        queue = Gauge("ditserve_queue_depth", "requests waiting for the engine", registry=self.registry)
        queue.set_function(queue_depth)
        self.batch_size = Histogram("ditserve_batch_size", "requests per denoising step", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.step_latency = Histogram("ditserve_step_latency_seconds",
                                      "wall time of one denoising step of the running batch (decodes included)",
                                      buckets=LATENCY_BUCKETS, registry=self.registry)
        self.failed_requests = Counter("ditserve_failed_requests", "requests that failed in the engine "
                                       "(aborts included)", ["error"], registry=self.registry)
        self.cache_steps = Counter("ditserve_cache_steps", "denoising steps by cache decision",
                                   ["decision"], registry=self.registry)
        self.prompt_cache = Counter("ditserve_prompt_embed_cache", "prompt-embedding cache outcomes per request",
                                    ["outcome"], registry=self.registry)

    def observe_step(self, report: StepReport) -> None:
        """Engine observer: runs on the engine thread after every denoising step (or whole run)."""
        if report.batch_size:
            self.batch_size.observe(report.batch_size)
            self.step_latency.observe(report.seconds)
        for _, error in report.failed:
            self.failed_requests.labels(type(error).__name__).inc()
        for _, output in report.finished:
            self._count_cache_steps(output.cache_stats)

    def _count_cache_steps(self, stats: dict[str, Any] | None) -> None:
        """``computed_steps`` / ``skipped_steps`` of the cache backend, and the prompt-embedding outcome."""
        if not stats:
            return
        for decision in ("computed", "skipped"):
            value = stats.get(f"{decision}_steps")
            if isinstance(value, int) and not isinstance(value, bool):
                self.cache_steps.labels(decision).inc(value)
        prompt_embed = stats.get("prompt_embed")
        if isinstance(prompt_embed, dict) and isinstance(prompt_embed.get("outcome"), str):
            self.prompt_cache.labels(prompt_embed["outcome"]).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP answer (401 and 413 from the outer layers included) by route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            # the route template, never the raw path (ids in paths would make one series per job), and only
            # labels from a fixed set: unauthenticated clients choose paths and methods freely
            template = getattr(scope.get("route"), "path", None)
            route = template if template in self.metrics.known_routes else OTHER
            method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.request_latency.labels(route).observe(time.perf_counter() - start)
