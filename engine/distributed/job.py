"""`index_collection`: encode an image collection (and a texts jsonl) into an index directory, in this
process or on Ray. The driver lists the sources, skips images the index already holds (so a rerun resumes),
runs the stages, and alone publishes the written segments: every `publish_every` images or `commit_seconds`,
whichever comes first, and at the end, so a killed run keeps every published batch and its rerun skips them."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import IndexFormatError, InputError
from ..features_io import FeatureFile, import_features, read_features
from ..gallery import TextRecords, read_texts_jsonl
from ..index import Index
from ..laclip import LaclipConfig
from ..preprocess import DEFAULT_MAX_PIXELS
from ..records import DatasetError, Problem
from ..retriever import Retriever
from ..sources import Collection, SourceKind, list_collection
from .progress import Progress
from .runners import RayOptions, StageResult, check_local_fit, require_ray, run_local, run_ray
from .stages import EncoderSpec


@dataclass(frozen=True)
class IndexJob:
    """One indexing job. `images`: sources (folders, list files, `.tsv`, `.tar` shards); `out`: the index
    directory (created when absent, resumed when it exists); `ray`: None runs in this process."""

    images: Sequence[str]
    out: str
    model: str = "ViT-B-16"
    checkpoint: str | None = None
    random_weights: bool = False
    laclip: LaclipConfig | None = None
    texts: str | None = None
    features: Sequence[FeatureFile] = ()
    source_kind: SourceKind = "auto"
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 32
    segment_rows: int = 1024
    skip_bad: bool = False
    publish_every: int = 1000
    commit_seconds: float = 60.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    ray: RayOptions | None = None
    progress: bool = True
    progress_every: int = 1000

    def __post_init__(self) -> None:
        for name in ("batch_size", "segment_rows", "publish_every", "progress_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.commit_seconds > 0:
            raise InputError(f"commit_seconds must be > 0, got {self.commit_seconds}")
        if self.ray is not None and self.ray.workers < 1:
            raise InputError(f"workers must be >= 1, got {self.ray.workers}")
        if self.ray is not None and self.ray.stall_timeout_s is not None and self.ray.stall_timeout_s < 0:
            raise InputError(f"stall_timeout_s must be >= 0 (0: never), got {self.ray.stall_timeout_s}")
        if isinstance(self.images, (str, Path)):
            object.__setattr__(self, "images", [str(self.images)])

    @property
    def rows_per_segment(self) -> int:
        """Rows per written segment: never more than one publish's worth, so a publish is never held back."""
        return min(self.segment_rows, self.publish_every)

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec(self.model, self.checkpoint, self.random_weights, self.laclip, self.precision,
                           self.batch_size, self.max_pixels)


@dataclass
class IndexReport:
    """What a job did. `problems`: every bad record (listing and decoding), skipped with `skip_bad`."""

    images_added: int = 0
    images_already_indexed: int = 0
    texts_added: int = 0
    texts_already_indexed: int = 0
    embeddings_imported: int = 0
    embeddings_already_indexed: int = 0
    segments: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images_added / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (f"added {self.images_added} images ({self.images_already_indexed} already indexed, "
                f"{len(self.problems)} bad skipped) and {self.texts_added} texts "
                f"({self.texts_already_indexed} already indexed)"
                + (f" in {self.segments} image segments" if self.segments else "")
                + (f"; imported {self.embeddings_imported} embeddings ({self.embeddings_already_indexed} "
                   "already indexed)" if self.embeddings_imported or self.embeddings_already_indexed else ""))


def index_collection(job: IndexJob, *, on_progress: Callable[[int], None] | None = None) -> IndexReport:
    """Run `job`: images first, then texts, then imported embeddings. A bad record (listing or decoding) is a
    DatasetError listing every one found unless `skip_bad`; the failing run publishes nothing more.
    `on_progress(images_done)` is called as images finish."""
    if job.ray is not None:
        check_local_fit(require_ray(), job.ray)
    collection = list_collection(job.images, job.source_kind) if job.images else Collection([], [])
    report = IndexReport(problems=list(collection.problems))
    if report.problems and not job.skip_bad:
        raise DatasetError(report.problems)
    texts = read_texts_jsonl(job.texts) if job.texts is not None else TextRecords([], [], [])  # read before any add
    imported = [features for spec in job.features for features in read_features(spec)]
    retriever = open_index(job)
    if collection.images:
        _index_images(job, retriever.index, collection, report, on_progress)
    report.texts_added, report.texts_already_indexed = _add_texts(retriever, texts)
    for features in imported:
        added, present = import_features(retriever, features)
        report.embeddings_imported += added
        report.embeddings_already_indexed += present
    return report


def _index_images(job: IndexJob, index: Index, collection: Collection, report: IndexReport,
                  on_progress: Callable[[int], None] | None) -> None:
    """Encode the images `index` does not hold yet; publish their segments through `index` (the one object
    that commits to this directory during the job)."""
    todo = [ref for ref in collection.images if not index.has_image(ref.id)]
    report.images_already_indexed = len(collection.images) - len(todo)
    progress = Progress(len(todo), enabled=job.progress, every=job.progress_every)
    results = (run_local(job.spec, todo, job.out, device=job.device, segment_rows=job.rows_per_segment)
               if job.ray is None else
               run_ray(job.spec, todo, job.out, options=job.ray, segment_rows=job.rows_per_segment))
    pending: list = []
    last_commit = time.monotonic()
    outcome = "stopped after publishing"
    try:
        for result in results:
            progress.update(result.images)
            if on_progress is not None:
                on_progress(progress.done)
            _take(result, report, pending, job.skip_bad)
            if _due(pending, job, time.monotonic() - last_commit):
                _publish(index, pending, report)
                last_commit = time.monotonic()
        _publish(index, pending, report)
        outcome = "indexed"
    finally:
        report.seconds = time.perf_counter() - progress.started
        progress.close(f"{outcome} {report.images_added} images")


def open_index(job: IndexJob) -> Retriever:
    """A Retriever bound to `job.out`: a new index, or the existing one when it was made the same way."""
    spec = job.spec
    out = Path(job.out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        retriever = spec.retriever(job.device)
        retriever.save(out)
        return retriever
    retriever = Retriever.load(out, checkpoint=job.checkpoint, device=job.device,
                               random_weights=job.random_weights, precision=job.precision,
                               batch_size=job.batch_size, max_pixels=job.max_pixels)
    stored = retriever.laclip.crop_settings() if retriever.laclip is not None else None
    wanted = job.laclip.crop_settings() if job.laclip is not None else None
    if retriever.identity.model != job.model or stored != wanted:
        raise IndexFormatError(f"index {out} holds model {retriever.identity.model!r} with crops {stored}; this job "
                               f"asks for {job.model!r} with crops {wanted} (use another --out, or the same settings)")
    return retriever


def _add_texts(retriever: Retriever, records: TextRecords) -> tuple[int, int]:
    """Encode the texts the index does not hold yet (with their lines' other keys as payloads); (added, already
    indexed)."""
    new = records.where(lambda text_id: not retriever.index.has_text(text_id))
    if new.ids:
        retriever.add_texts(new.texts, new.ids, new.payloads)
    return len(new.ids), len(records.ids) - len(new.ids)


def _take(result: StageResult, report: IndexReport, pending: list, skip_bad: bool) -> None:
    report.problems.extend(result.problems)
    if result.problems and not skip_bad:
        raise DatasetError(report.problems)
    if result.segment is not None:
        pending.append((result.segment, result.rows))


def _due(pending: list, job: IndexJob, seconds_since_publish: float) -> bool:
    """Publish when `publish_every` images wait, or anything has waited `commit_seconds`."""
    return bool(pending) and (sum(rows for _, rows in pending) >= job.publish_every
                              or seconds_since_publish >= job.commit_seconds)


def _publish(index: Index, pending: list, report: IndexReport) -> None:
    """Commit the written segments at once (all or nothing); `pending` holds (segment, rows) pairs."""
    if not pending:
        return
    index.publish([segment for segment, _ in pending])
    report.segments += len(pending)
    report.images_added += sum(rows for _, rows in pending)
    pending.clear()

