"""Where the stages run: in this process, or on Ray Data (CPU tasks prepare, an actor pool encodes, tasks
write). Both yield the same `StageResult`s to the driver, which alone publishes segments."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from ..errors import EngineError
from ..records import Problem
from ..sources import ImageRef
from .stages import Batch, EncodeStage, EncoderSpec, PrepareStage, WriteStage, ref_columns, ref_rows

RAY_MISSING = ('Ray is not installed: install the distributed extra, pip install -e ".[distributed]" '
               '(or pip install "ray[data]>=2.9")')
LOCAL = "local"


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray. address: "local" starts a Ray on this machine for the job; "auto" joins the cluster
    this machine belongs to (`ray start`); anything else is a cluster address (`ray://head:10001`, `head:6379`).
    gpus_per_worker None = one GPU per encode worker when the cluster has GPUs, else CPU workers.
    cpus_per_worker / cpus_per_task: logical CPUs Ray reserves for each encode actor / prepare or write task.
    threads_per_worker: torch threads of a CPU encode actor (None: Ray's default, its CPU count).
    init: extra `ray.init` arguments for a local Ray (e.g. num_cpus, object_store_memory)."""

    address: str = LOCAL
    workers: int = 1
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1.0
    cpus_per_task: float = 1.0
    threads_per_worker: int | None = None
    init: Mapping[str, Any] = field(default_factory=dict)


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


def run_ray(spec: EncoderSpec, refs: list[ImageRef], out: str, *, options: RayOptions, segment_rows: int
            ) -> Iterator[StageResult]:
    """The stages on Ray Data: prepare in CPU tasks, encode in `options.workers` actors (one model each),
    write in tasks. A killed actor is restarted and its batch retried by Ray; its unfinished segment is never
    reported, so never published."""
    ray = require_ray()
    started = connect(ray, options)
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows the one bar
        context.print_on_execution_start = False
        # Per-operator reservations held decoding to one task at a time beside a one-CPU encode actor on two cores
        # (3000 tiny images: 40.9 s with them, 35.3 s without; one process 36 s): a linear pipeline with a
        # bounded object store needs none.
        context.op_resource_reservation_enabled = False
        gpus = options.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        blocks = max(1, min(len(refs) // spec.batch_size, 10_000))
        data = ray.data.from_items(ref_rows(refs), override_num_blocks=blocks)
        data = data.map_batches(PrepareStage(spec), batch_size=spec.batch_size, batch_format="numpy",
                                num_cpus=options.cpus_per_task)
        # CPU actors share cores with decoding tasks: OpenMP threads that sleep instead of spinning while they
        # wait (encode time of those 3000 images: 24 s spinning, 9 s passive). The actor's own environment also
        # keeps Ray Data from fusing the decoding tasks into the actors.
        encoder = {"spec": spec, "threads": options.threads_per_worker}
        data = data.map_batches(EncodeStage, fn_constructor_kwargs=encoder,
                                batch_size=spec.batch_size, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=options.workers), num_gpus=gpus,
                                num_cpus=options.cpus_per_worker,
                                runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        data = data.map_batches(WriteStage(out), batch_size=segment_rows, batch_format="numpy",
                                num_cpus=options.cpus_per_task)
        for row in data.iter_rows():
            problems = [Problem.from_dict(p) for p in json.loads(row["problems"])]
            yield StageResult(int(row["count"]) + len(problems), problems, row["segment"], int(row["count"]))
    finally:
        if started:
            ray.shutdown()


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
