"""Serving one index from many processes and machines on Ray Serve: S shards x R replicas behind this server.

This process stays the ingress and the one writer: it parses HTTP, encodes each query once through its
batchers, and commits adds and deletes. Searches scatter the query vectors to one replica of every shard (a
Ray Serve deployment per shard, engine.index.shards.ShardView inside), each scoring its own segments (ANN
candidates and exact LACLIP re-rank), and the exact top-k is merged here in the single index's order. A shard
that does not answer (a killed replica while Ray restarts it, a timeout) is asked again; after `retries` the
search is a 503, never a partial answer.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EngineError, InputError, ShardUnavailableError
from ..index.search import Found, Scorer
from ..index.shards import ShardAnswer, ShardQuery, ShardView, merge, plan
from ..index.snapshot import Snapshot

log = logging.getLogger("engine.serve.cluster")
LOCAL = "local"
SERVE_MISSING = 'Ray Serve is not installed: pip install --no-build-isolation -e ".[distributed]"'


@dataclass(frozen=True)
class ClusterOptions:
    """How to serve on Ray Serve. address: "local" starts a Ray on this machine, "auto" joins this machine's
    cluster, anything else is a cluster address. cpus_per_replica None: an equal share of the cluster's CPUs, at
    most 1. timeout_s: how long one shard answer may take; retries: further tries of a failed scatter."""

    address: str = LOCAL
    shards: int = 1
    replicas: int = 1
    cpus_per_replica: float | None = None
    device: str = "cpu"
    timeout_s: float = 10.0
    retries: int = 3
    app_prefix: str = "cnclip-shard"

    def __post_init__(self) -> None:
        for name in ("shards", "replicas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an int >= 1, got {value!r}")
        if self.cpus_per_replica is not None and not self.cpus_per_replica > 0:
            raise InputError(f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        if not self.timeout_s > 0 or self.retries < 0:
            raise InputError(f"timeout_s must be > 0 and retries >= 0, got {self.timeout_s} and {self.retries}")

    def cpus(self, cluster_cpus: float) -> float:
        """CPUs each replica reserves; refuses a plan whose replicas cannot all be placed (Ray would wait forever)."""
        count = self.shards * self.replicas
        each = self.cpus_per_replica if self.cpus_per_replica is not None else min(1.0, cluster_cpus / count)
        if each * count > cluster_cpus + 1e-9:
            raise EngineError(f"{self.shards} shards x {self.replicas} replicas x {each:g} CPUs = {each * count:g} "
                              f"CPUs, but the Ray cluster has {cluster_cpus:g}: pass a smaller --cpus-per-replica, "
                              "fewer shards or replicas, or add nodes")
        return each


class ShardReplica:
    """The body of one shard's Ray Serve deployment: a ShardView of the index directory."""

    def __init__(self, directory: str, shard: int, shards: int, device: str, threads: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.view = ShardView(directory, shard, shards, device)

    def search(self, query: ShardQuery) -> ShardAnswer:
        return self.view.answer(query)

    def rows(self) -> dict[str, int]:
        self.view.refresh()
        return self.view.rows()

    def check_health(self) -> None:
        """Ray Serve's liveness probe: the shard's newest commit is still readable."""
        self.view.generation  # noqa: B018  (raises if the view lost its state)


def require_serve() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise EngineError(f"{SERVE_MISSING} ({exc})") from None
    return ray, serve


class Cluster:
    """The shards of one index directory on Ray Serve, and the scatter/merge the ingress searches through."""

    def __init__(self, directory: str | Path, options: ClusterOptions) -> None:
        self.directory = str(Path(directory).resolve())
        self.options = options
        self._ray, self._serve = require_serve()
        self._started_ray = False
        self._handles: list[Any] = []

    @property
    def apps(self) -> list[str]:
        return [f"{self.options.app_prefix}-{i}" for i in range(self.options.shards)]

    def start(self) -> "Cluster":
        """Start or join Ray, then deploy every shard (returns once all replicas are up)."""
        ray, serve, options = self._ray, self._serve, self.options
        if not ray.is_initialized():
            if options.address == LOCAL:
                ray.init(include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=options.address, log_to_driver=False)
            self._started_ray = True
        cpus = options.cpus(float(ray.cluster_resources().get("CPU", 0.0)))
        serve.start(proxy_location="Disabled")
        deployment = serve.deployment(ShardReplica, num_replicas=options.replicas,
                                      ray_actor_options={"num_cpus": cpus}, health_check_period_s=2,
                                      health_check_timeout_s=10, max_ongoing_requests=16)
        for shard, app in enumerate(self.apps):
            bound = deployment.options(name=f"shard-{shard}").bind(self.directory, shard, options.shards,
                                                                   options.device, int(max(1.0, cpus)))
            self._handles.append(serve.run(bound, name=app, route_prefix=None))
        log.info("Ray Serve: %d shards x %d replicas of %s, %g CPUs each", options.shards, options.replicas,
                 self.directory, cpus)
        return self

    def close(self) -> None:
        """Delete the shard applications (and stop the Ray this process started)."""
        for app in self.apps:
            try:
                self._serve.delete(app)
            except Exception as exc:  # noqa: BLE001  (Ray may already be gone at shutdown; nothing to undo)
                log.warning("deleting %s: %s", app, exc)
        self._handles = []
        if self._started_ray:
            self._serve.shutdown()
            self._ray.shutdown()

    def shard_rows(self) -> list[dict[str, int]]:
        """Rows and segments per shard at its newest commit (one replica of each asked)."""
        return [h.rows.remote().result(timeout_s=self.options.timeout_s) for h in self._handles]

    def scan(self, snap: Snapshot, scorer: Scorer, k: int, exact: bool) -> list[Found]:
        """Index.scan over the shards: the same candidates, scores and order as one process searching `snap`."""
        exact = plan(snap, scorer.kind, exact)
        found = self._gather(ShardQuery(scorer, k, exact, snap.generation), len(scorer.candidates), k)
        short = np.array([i for i, f in enumerate(found) if len(f.rows) < k], dtype=np.int64)
        if not exact and len(short):  # as one index does: an ANN answer short of k is answered exactly
            again = self._gather(ShardQuery(scorer.select(short), k, True, snap.generation), len(short), k)
            for i, f in zip(short, again):
                found[int(i)] = f
        return found

    def _gather(self, query: ShardQuery, queries: int, k: int) -> list[Found]:
        problem = "no answer"
        for attempt in range(self.options.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.25 * 2 ** attempt))
            responses = [h.search.remote(query) for h in self._handles]
            answers: list[ShardAnswer] = []
            for shard, response in enumerate(responses):
                try:
                    answers.append(response.result(timeout_s=self.options.timeout_s))
                except Exception as exc:  # noqa: BLE001  (Ray's actor, timeout and Serve errors alike: try again)
                    problem = f"shard {shard}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if len(answers) == len(responses):
                behind = [a for a in answers if a.found is None]
                if not behind:
                    return merge(answers, queries, k)
                problem = (f"shard {behind[0].shard} holds commit {behind[0].latest}, not commit {query.generation} "
                           "of this search (the index changed meanwhile)")
            log.warning("scatter try %d of %d failed: %s", attempt + 1, self.options.retries + 1, problem)
        raise ShardUnavailableError(f"the search could not reach every shard ({problem}); retry shortly")
