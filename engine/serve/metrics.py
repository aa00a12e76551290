"""Prometheus metrics of the server, in a private registry: requests, latency, queue depth, batch sizes.

Every label comes from a fixed set, never from the client: methods outside METHODS count as "other", paths
that match no route as "<other>", and a matched path is counted by its route template (`/v1/images/{id}/...`),
so no request can grow the scrape.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..batcher import Batcher

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "other"
OTHER_ROUTE = "<other>"


class ServerMetrics:
    """Counters and histograms the app and the batchers report to; `render()` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("cnclip_requests_total", "HTTP requests by route and status code",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("cnclip_request_latency_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_progress = Gauge("cnclip_requests_in_progress", "HTTP requests being served, by route",
                                 ["route", "method"], registry=self.registry)
        self.queue_depth = Gauge("cnclip_queue_depth", "items waiting in each tower's batcher",
                                 ["tower"], registry=self.registry)
        self.batch_size = Histogram("cnclip_batch_size", "items per tower call", ["tower"],
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_latency = Histogram("cnclip_batch_latency_seconds", "seconds per tower call", ["tower"],
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.ready = Gauge("cnclip_ready", "1 once the model is loaded and warmed up", registry=self.registry)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def observe_batch(self, tower: str, size: int, seconds: float) -> None:
        self.batch_size.labels(tower).observe(size)
        self.batch_latency.labels(tower).observe(seconds)

    def render(self, batchers: Mapping[str, Batcher], ready: bool) -> bytes:
        """The Prometheus text format, with queue depths and readiness read now."""
        for tower, batcher in batchers.items():
            self.queue_depth.labels(tower).set(batcher.queue_depth)
        self.ready.set(1 if ready else 0)
        return generate_latest(self.registry)


def method_label(method: str) -> str:
    return method if method in METHODS else OTHER_METHOD


class RouteTable:
    """Route templates to label requests by: exact paths, templated paths (`/v1/images/{id}/thumbnail`) and
    mounted folders (`/static/{path}`); anything else is OTHER_ROUTE."""

    def __init__(self, templates: Iterable[str], mounts: Iterable[str] = ()) -> None:
        templates = list(templates)
        self._exact = {t for t in templates if "{" not in t}
        self._patterns = [(compile_path(t)[0], t) for t in templates if "{" in t]
        self._mounts = list(mounts)

    def label(self, path: str) -> str:
        if path in self._exact:
            return path
        for regex, template in self._patterns:
            if regex.match(path):
                return template
        for mount in self._mounts:
            if path.startswith(mount + "/"):
                return mount + "/{path}"
        return OTHER_ROUTE


class MetricsMiddleware:
    """Counts every request by route template, method and status (all from fixed sets), and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Callable[[], RouteTable]) -> None:
        self.app = app
        self.metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        route, method = self._routes().label(scope["path"]), method_label(scope["method"])
        in_progress = self.metrics.in_progress.labels(route, method)
        in_progress.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            in_progress.dec()
            self.metrics.observe_request(route, method, status, time.perf_counter() - started)
