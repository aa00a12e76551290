"""Prometheus metrics of the server, in a private registry: requests, latency, queue depth, batch sizes."""
from __future__ import annotations

from typing import Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..batcher import Batcher

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


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
