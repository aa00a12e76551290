"""Keeping a Ray indexing job from waiting forever.

`plan_resources` sizes the encode actors and the prepare/write tasks from the resources the cluster has, so
that at least one prepare or write task can always run beside the whole actor pool (an actor pool that holds
every CPU starves the tasks that feed it: no progress and no error), or refuses with the numbers and what to
pass.

`Heartbeats` is a small actor (no CPU) every stage tells when a batch starts and finishes; the driver's
`Watchdog` polls it and raises `IndexingStalled`, naming the stage, when no batch finished anywhere for
`stall_timeout_s`.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from ..errors import EngineError, InputError

STAGES = ("prepare", "encode", "write")
RESOLUTION = 1e-4  # Ray's granularity for fractional resources


class IndexingStalled(EngineError):
    """No batch finished in any stage for `seconds`; `stage` is the stage the job is stuck in."""

    def __init__(self, message: str, stage: str, seconds: float) -> None:
        super().__init__(message)
        self.stage = stage
        self.seconds = seconds


@dataclass(frozen=True)
class Sizing:
    """What each encode actor and each prepare/write task reserves on the cluster."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    cpus_per_task: float
    cluster_cpus: float
    cluster_gpus: float

    def describe(self) -> str:
        gpus = f", {self.gpus_per_worker:g} GPU" if self.gpus_per_worker else ""
        return (f"{self.workers} encode workers x {self.cpus_per_worker:g} CPU{gpus}, prepare/write tasks "
                f"{self.cpus_per_task:g} CPU each, on a cluster of {self.cluster_cpus:g} CPUs"
                + (f" and {self.cluster_gpus:g} GPUs" if self.cluster_gpus else ""))


def _floor(value: float) -> float:
    return math.floor(value / RESOLUTION + 1e-6) * RESOLUTION


def plan_resources(workers: int, cluster: Mapping[str, float], *, cpus_per_worker: float | None = None,
                   gpus_per_worker: float | None = None, cpus_per_task: float | None = None) -> Sizing:
    """Reservations that always leave room for one prepare or write task beside all `workers` encode actors.

    None means automatic: a task takes 1 CPU (half the cluster's CPUs when it has fewer than 2); an encode
    worker takes 1 CPU, or an equal share of what the task leaves when `workers` CPUs do not fit; a worker takes
    1 GPU when the cluster has GPUs. Values given that cannot fit are an InputError naming the numbers and what
    to pass instead."""
    cpus, gpus_total = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if cpus <= 0:
        raise InputError("the Ray cluster has no CPUs: the prepare and write tasks cannot run anywhere")
    gpus = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus_total >= 1 else 0.0)
    if gpus < 0:
        raise InputError(f"--gpus-per-worker must be >= 0, got {gpus:g}")
    if gpus > 0 and workers * gpus > gpus_total + 1e-9:
        fit = int(gpus_total // gpus + 1e-9)
        instead = (f"--workers {fit}" if fit >= 1 else "--gpus-per-worker 0 (CPU workers)")
        raise InputError(f"{workers} encode workers x {gpus:g} GPU need {workers * gpus:g} GPUs but the Ray cluster "
                         f"has {gpus_total:g}, so the encode stage would never start all its workers: pass {instead}"
                         + (f", or --gpus-per-worker {_floor(gpus_total / workers):g}" if gpus_total > 0 else ""))
    task = cpus_per_task if cpus_per_task is not None else min(1.0, _floor(cpus / 2))
    if task < 0 or task > cpus:
        raise InputError(f"--cpus-per-task {task:g} does not fit the Ray cluster's {cpus:g} CPUs: pass a value "
                         f"from 0 to {cpus:g} (or leave it out)")
    room = cpus - task  # what the actor pool may hold while one prepare or write task runs
    if cpus_per_worker is None:
        per = min(1.0, _floor(room / workers))
        if per < RESOLUTION:
            raise InputError(f"{workers} encode workers do not fit the Ray cluster's {cpus:g} CPUs beside the "
                             f"prepare/write tasks' {task:g} CPU: pass a smaller --cpus-per-task, or fewer --workers")
    else:
        per = cpus_per_worker
        if per < 0:
            raise InputError(f"--cpus-per-worker must be >= 0, got {per:g}")
        if workers * per > room + 1e-9:
            fit = int((room + 1e-9) // per) if per > 0 else workers
            share = min(1.0, _floor(room / workers))
            advice = [f"--cpus-per-worker {share:g}" if share >= RESOLUTION else None,
                      f"--workers {fit}" if fit >= 1 else None, "a smaller --cpus-per-task"]
            raise InputError(
                f"{workers} encode workers x {per:g} CPU = {workers * per:g} CPUs, plus {task:g} CPU for a "
                f"prepare/write task, is more than the Ray cluster's {cpus:g} CPUs: the workers would hold the CPUs "
                f"the prepare tasks need and the job would never progress. Leave --cpus-per-worker out (sized to "
                f"fit), or pass " + ", or ".join(a for a in advice if a))
    return Sizing(workers, per, gpus, task, cpus, gpus_total)


class Heartbeats:
    """The actor the stages report to: batches finished and rows per stage, and the batches now running
    (keyed by the batch's first id, so a batch retried after a killed worker replaces its own entry)."""

    def __init__(self) -> None:
        self.batches = dict.fromkeys(STAGES, 0)
        self.rows = dict.fromkeys(STAGES, 0)
        self.running: dict[tuple[str, str], float] = {}

    def start(self, stage: str, key: str) -> None:
        self.running[(stage, key)] = time.monotonic()

    def finish(self, stage: str, key: str, rows: int) -> None:
        self.running.pop((stage, key), None)
        self.batches[stage] += 1
        self.rows[stage] += rows

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        running: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for (stage, _), since in self.running.items():
            running[stage].append(now - since)
        return {"batches": dict(self.batches), "rows": dict(self.rows), "running": running}


@contextmanager
def beating(beats: Any, stage: str, batch: Mapping[str, Any]) -> Iterator[None]:
    """Tell `beats` (a Heartbeats actor handle, or None) that `stage` works on `batch` until the block ends."""
    if beats is None:
        yield
        return
    ids = batch.get("id")
    key = str(ids[0]) if ids is not None and len(ids) else ""
    beats.start.remote(stage, key)
    yield
    beats.finish.remote(stage, key, 0 if ids is None else len(ids))


class Watchdog:
    """Raises IndexingStalled from `check()` when neither the heartbeats nor the driver saw a batch finish for
    `timeout_s`. `total`: images in the job; `segment_rows`: rows the write stage waits for."""

    def __init__(self, ray: Any, beats: Any, timeout_s: float, *, total: int, segment_rows: int,
                 clock=time.monotonic) -> None:
        self.ray, self.beats, self.timeout_s = ray, beats, timeout_s
        self.total, self.segment_rows, self.clock = total, segment_rows, clock
        self.last_progress = clock()
        self.seen: dict[str, int] | None = None
        self.state: dict[str, Any] | None = None
        self.pending: Any = None  # the state() call not answered yet

    @property
    def poll_s(self) -> float:
        return max(0.05, min(2.0, self.timeout_s / 8))

    def progressed(self) -> None:
        self.last_progress = self.clock()

    def check(self) -> None:
        """Take the heartbeats' latest answer (never waiting for it), then raise when stalled."""
        if self.pending is None:
            self.pending = self.beats.state.remote()
        ready, _ = self.ray.wait([self.pending], timeout=0)
        if ready:
            try:
                state = self.ray.get(self.pending)
            except Exception:  # noqa: BLE001  (an unanswered poll is no news; the clock still runs)
                state = None
            self.pending = None
            if state is not None:
                self.state = state
                if state["batches"] != self.seen:
                    self.seen = state["batches"]
                    self.progressed()
        stalled = self.clock() - self.last_progress
        if stalled >= self.timeout_s:
            stage, why = blame(self.state, self.total, self.segment_rows)
            raise IndexingStalled(stall_message(stage, why, self.state, self.total, stalled, self.timeout_s),
                                  stage, stalled)


def blame(state: Mapping[str, Any] | None, total: int, segment_rows: int) -> tuple[str, str]:
    """(stage, why) of a stall: the stage whose batch has run longest; with none running, the last stage whose
    input is waiting (so its tasks or workers were never scheduled)."""
    if state is None:
        return "unknown", "the stages' heartbeats could not be read"
    running = [(max(ages), stage, len(ages)) for stage, ages in state["running"].items() if ages]
    if running:
        age, stage, count = max(running)
        return stage, f"{count} {stage} batch{'es' if count > 1 else ''} running for {age:.0f} s without finishing"
    rows = state["rows"]
    encoded, written = rows["encode"], rows["write"]
    if encoded - written >= segment_rows or (encoded >= total and written < total):
        return "write", "encoded rows wait and no write batch has started (no task scheduled, or its worker starting)"
    if rows["prepare"] > encoded:
        return "encode", ("prepared batches wait and no encode batch has started (no encode worker running, or the "
                          "workers still starting or loading the model)")
    return "prepare", ("images wait and no prepare batch has started (no task scheduled: are the CPUs all reserved? "
                       "or its worker still starting)")


def stall_message(stage: str, why: str, state: Mapping[str, Any] | None, total: int, stalled: float,
                  timeout_s: float) -> str:
    done = ("; done so far: " + ", ".join(f"{s} {state['rows'][s]}/{total}" for s in STAGES) + " images"
            if state is not None else "")
    return (f"indexing stalled in the {stage} stage: no batch finished for {stalled:.0f} s "
            f"(--stall-timeout-s {timeout_s:g}); {why}{done}. The job stopped; what it published stays and a rerun "
            f"resumes. If the cluster is only slow, pass a larger --stall-timeout-s (0: never stop)")
