"""Where the stages run: in this process, or on Ray Data (CPU tasks prepare, an actor pool encodes, tasks
write). Both yield the same `StageResult`s to the driver, which alone publishes segments."""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import EngineError
from ..install_hints import install_command
from ..records import Problem
from ..sources import ImageRef
from .stages import Batch, EncodeStage, EncoderSpec, PrepareStage, WriteStage, ref_columns, ref_rows
from .watchdog import Heartbeats, Sizing, Watchdog, plan_resources

RAY_MISSING = (f"Ray is not installed: install the distributed extra, {install_command('distributed')} "
               '(or pip install "ray[data]>=2.9")')
LOCAL = "local"


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. address: "local" starts a Ray on this machine for the job; "auto" joins the cluster
    this machine belongs to (`ray start`); anything else is a cluster address (`ray://head:10001`, `head:6379`).
    gpus_per_worker None = one GPU per encode worker when the cluster has GPUs, else CPU workers.
    cpus_per_worker / cpus_per_task: logical CPUs Ray reserves for each encode actor / prepare or write task;
    None sizes them from the cluster so one task always fits beside all the workers (a task 1 CPU, a worker
    1 CPU or an equal share of the rest; engine.distributed.watchdog.plan_resources); values that cannot fit
    are refused at start.
    threads_per_worker: torch threads of a CPU encode actor (None: Ray's default, its CPU count).
    init: extra `ray.init` arguments for a local Ray (e.g. num_cpus, object_store_memory).
    stall_timeout_s: stop with IndexingStalled, naming the stage, when no batch finishes for this long
    (None or 0: never)."""

    address: str = LOCAL
    workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float | None = None
    cpus_per_task: float | None = None
    threads_per_worker: int | None = None
    init: Mapping[str, Any] = field(default_factory=dict)
    stall_timeout_s: float | None = 600.0

    def sizing(self, cluster: Mapping[str, float]) -> Sizing:
        """The reservations this job makes on a cluster with `cluster` resources (`ray.cluster_resources()`)."""
        return plan_resources(self.workers, cluster, cpus_per_worker=self.cpus_per_worker,
                              gpus_per_worker=self.gpus_per_worker, cpus_per_task=self.cpus_per_task)


@dataclass(frozen=True)
class StageResult:
    """What the driver hears: images finished (written or bad), their problems, and a segment to publish."""

    images: int
    problems: list[Problem]
    segment: Any = None
    rows: int = 0


def run_local(spec: EncoderSpec, refs: list[ImageRef], out: str, *, device: str, segment_rows: int
              ) -> Iterator[StageResult]:
    """All stages in this process: one encode batch at a time, a segment every `segment_rows` rows."""
    prepare, encode, write = PrepareStage(spec), EncodeStage(spec, device), WriteStage(out)
    pending: list[Batch] = []
    rows = 0
    for start in range(0, len(refs), spec.batch_size):
        batch = encode(prepare(ref_columns(refs[start:start + spec.batch_size])))
        yield StageResult(len(batch["id"]), _problems(batch["problem"]))
        pending.append(batch)
        rows += len(batch["id"])
        if rows >= segment_rows or start + spec.batch_size >= len(refs):
            written = write({key: np.concatenate([b[key] for b in pending]) for key in pending[0]})
            yield StageResult(0, [], written["segment"][0], int(written["count"][0]))
            pending, rows = [], 0


def run_ray(spec: EncoderSpec, refs: list[ImageRef], out: str, *, options: RayOptions, segment_rows: int,
            stages: tuple[type, type, type] = (PrepareStage, EncodeStage, WriteStage)) -> Iterator[StageResult]:
    """The stages on Ray Data: prepare in CPU tasks, encode in `options.workers` actors (one model each),
    write in tasks, sized by `options.sizing` so the pipeline always progresses; a watchdog stops the job with
    IndexingStalled when no batch finishes for `options.stall_timeout_s`. A killed actor is restarted and its
    batch retried by Ray; its unfinished segment is never reported, so never published. `stages`: the
    (prepare, encode, write) classes (tests pass slow ones)."""
    ray = require_ray()
    check_local_fit(ray, options)
    started = connect(ray, options)
    data = beats = None
    executors: list = []
    try:
        sizing = options.sizing(ray.cluster_resources())
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows the one bar
        context.print_on_execution_start = False
        # Per-operator reservations held decoding to one task at a time beside a one-CPU encode actor on two cores
        # (3000 tiny images: 40.9 s with them, 35.3 s without; one process 36 s): a linear pipeline with a
        # bounded object store needs none.
        context.op_resource_reservation_enabled = False
        watched = bool(options.stall_timeout_s)
        beats = ray.remote(num_cpus=0)(Heartbeats).remote() if watched else None
        if beats is not None:  # up before the clock starts: the stages report to it from their first batch
            wait = max(60.0, float(options.stall_timeout_s))
            try:
                ray.get(beats.state.remote(), timeout=wait)
            except ray.exceptions.GetTimeoutError:
                raise EngineError(f"Ray did not start the job's heartbeat actor (no CPU needed) within {wait:g} s: "
                                  "is the cluster healthy?") from None
        prepare, encode, write = stages
        blocks = max(1, min(len(refs) // spec.batch_size, 10_000))
        data = ray.data.from_items(ref_rows(refs), override_num_blocks=blocks)
        data = data.map_batches(prepare(spec, beats), batch_size=spec.batch_size, batch_format="numpy",
                                num_cpus=sizing.cpus_per_task)
        # CPU actors share cores with decoding tasks: OpenMP threads that sleep instead of spinning while they
        # wait (encode time of those 3000 images: 24 s spinning, 9 s passive). The actor's own environment also
        # keeps Ray Data from fusing the decoding tasks into the actors.
        encoder = {"spec": spec, "threads": options.threads_per_worker, "beats": beats}
        data = data.map_batches(encode, fn_constructor_kwargs=encoder,
                                batch_size=spec.batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=sizing.workers),
                                num_gpus=sizing.gpus_per_worker, num_cpus=sizing.cpus_per_worker,
                                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        data = data.map_batches(write(out, beats), batch_size=segment_rows, batch_format="numpy",
                                num_cpus=sizing.cpus_per_task)
        executors = _capture_executors(data)
        watchdog = (Watchdog(ray, beats, float(options.stall_timeout_s), total=len(refs), segment_rows=segment_rows)
                    if watched else None)
        for row in _rows(data, watchdog):
            problems = [Problem.from_dict(p) for p in json.loads(row["problems"])]
            yield StageResult(int(row["count"]) + len(problems), problems, row["segment"], int(row["count"]))
    finally:
        _stop(ray, data, beats, executors)
        if started:
            ray.shutdown()


_END = object()


def _rows(data: Any, watchdog: Watchdog | None) -> Iterator[Mapping[str, Any]]:
    """The dataset's rows; with a watchdog, pulled by a helper thread so the driver can check for a stall while
    Ray Data blocks."""
    if watchdog is None:
        yield from data.iter_rows()
        return
    rows: queue.Queue = queue.Queue()
    stop = threading.Event()

    def pump() -> None:
        try:
            for row in data.iter_rows():
                rows.put(row)
                if stop.is_set():
                    return
            rows.put(_END)
        except BaseException as exc:  # noqa: BLE001  (handed to the driver, which raises it)
            rows.put(exc)

    thread = threading.Thread(target=pump, name="engine-index-rows", daemon=True)
    thread.start()
    try:
        while True:
            try:
                row = rows.get(timeout=watchdog.poll_s)
            except queue.Empty:
                watchdog.check()
                continue
            if row is _END:
                return
            if isinstance(row, BaseException):
                raise row
            watchdog.progressed()
            yield row
    finally:
        stop.set()


def _capture_executors(data: Any) -> list:
    """The executors Ray Data creates for `data`, as they are created: a stalled job has no output yet, so Ray
    Data has not recorded its executor anywhere else. Best effort (Ray Data's executor is not public API)."""
    executors: list = []
    create = getattr(data, "_create_executor", None)
    if callable(create):
        def capturing(*args: Any, **kwargs: Any) -> Any:
            executor = create(*args, **kwargs)
            executors.append(executor)
            return executor
        data._create_executor = capturing
    return executors


def _stop(ray: Any, data: Any, beats: Any, executors: list) -> None:
    """Stop what the job left running on Ray (after a stall or an error; a no-op after a finished run): the
    dataset's executors (their tasks and actors) and the heartbeat actor."""
    current = getattr(data, "_current_executor", None) if data is not None else None
    for executor in [*executors, *([current] if current is not None else [])]:
        try:
            executor.shutdown(force=True)
        except Exception:  # noqa: BLE001  (best effort, as above)
            pass
    if beats is not None and ray.is_initialized():
        try:
            ray.kill(beats)
        except Exception:  # noqa: BLE001
            pass


def check_local_fit(ray: Any, options: RayOptions) -> None:
    """For a local Ray not started yet: refuse CPU reservations that cannot fit before Ray starts (seconds) and
    before anything is written. The full check (GPUs too) runs on the started cluster."""
    if options.address == LOCAL and not ray.is_initialized():
        local = {"CPU": float(options.init.get("num_cpus") or _local_cpus(ray))}
        plan_resources(options.workers, local, cpus_per_worker=options.cpus_per_worker, gpus_per_worker=0.0,
                       cpus_per_task=options.cpus_per_task)


def _local_cpus(ray: Any) -> float:
    """The CPUs a local Ray will have (its own count where available: it honours cgroup limits)."""
    try:
        return float(ray._private.utils.get_num_cpus())
    except Exception:  # noqa: BLE001  (a private helper; the plain count otherwise)
        return float(os.cpu_count() or 1)


def require_ray() -> Any:
    """The `ray` module with Ray Data, or an EngineError saying which extra to install."""
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra lacks it)
    except ImportError as exc:
        raise EngineError(f"{RAY_MISSING} ({exc})") from None
    return ray


def connect(ray: Any, options: RayOptions) -> bool:
    """Start or join Ray; True when this call started it (so the job shuts it down again)."""
    if ray.is_initialized():
        return False
    if options.address == LOCAL:
        settings = {"include_dashboard": False, "log_to_driver": False, **options.init}
        ray.init(**settings)
    else:
        ray.init(address=options.address, log_to_driver=False)
    return True


def _problems(column: np.ndarray) -> list[Problem]:
    return [Problem.from_dict(json.loads(p)) for p in column if p]
