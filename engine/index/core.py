"""The segmented index: immutable segments plus one small commit file (`index.json`) replaced atomically.

Every write (add, delete, compaction, publish) is validated completely, writes its new files (fsynced), then
replaces the commit; only after that succeeds does the in-memory snapshot change. A crash at any point leaves
the old or the new commit live. Files a commit retires are removed by the next commit, so a reader that opened
the previous commit keeps working (and segments are memory-mapped: an open map outlives the file's name).
Searches read `snapshot()`, an immutable view, so they run from many threads while one writer works.
"""
from __future__ import annotations

import fcntl
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import EngineError, IndexFormatError, InputError
from ..ids import Id, check_id, id_key
from ..laclip import ScoreConfig
from ..preprocess import TEXT_PIPELINE
from .ann import faiss_module
from .manifest import FORMAT_VERSION, IndexManifest
from .rows import ImageRows, TextRows, check_image_rows, check_text_rows
from .search import Found, ImageScorer, Placement, TextScorer, search
from .segment import KINDS, SEGMENT_SUFFIX, PartSource, Segment, SegmentRef, build_segment
from .snapshot import LiveSegment, Snapshot
from .storage import Rows, fsync_dir, write_array, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

COMMIT = "index.json"
SEGMENTS = "segments"
DELETES = "deletes"
LOCK = "LOCK"
FORMAT_NAME = "cnclip-index"
LEGACY_CURRENT = "CURRENT"
_STALE_SECONDS = 3600
_OPEN_RETRIES = 3


@dataclass(frozen=True)
class CompactionPolicy:
    """When writes compact automatically: more than `max_small` segments under `small_rows` rows are merged;
    a segment with more than `max_deleted_fraction` of its rows deleted is rewritten without them."""

    small_rows: int = 20_000
    max_small: int = 16
    max_deleted_fraction: float = 0.3


class Index:
    """Images and texts with ids, vectors, payloads and thumbnails; bound to a directory or in memory only."""

    def __init__(self, manifest: IndexManifest, *, directory: str | Path | None = None,
                 policy: CompactionPolicy = CompactionPolicy(), device: str = "cpu") -> None:
        """An empty in-memory index (use `create`/`open` for one on disk)."""
        self.policy = policy
        self.place = Placement(device)
        self._directory = Path(directory) if directory is not None else None
        self._lock = threading.RLock()
        self._snapshot = Snapshot(0, manifest, ())
        self._delete_files: dict[str, dict[str, str]] = {}
        self._retired: list[str] = []

    # ---- opening ------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | Path, manifest: IndexManifest, **options: Any) -> "Index":
        """A new empty index in `directory` (created; it must not already hold an index)."""
        root = Path(directory)
        _refuse_existing(root)
        for sub in (root, root / SEGMENTS, root / DELETES):
            sub.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent if root.parent != root else root)
        index = cls(manifest, directory=root, **options)
        index._commit(index._snapshot.segments, {})
        return index

    @classmethod
    def open(cls, directory: str | Path, **options: Any) -> "Index":
        """Open the index in `directory`, memory-mapping its segments (rows are not read)."""
        root = Path(directory)
        for attempt in range(_OPEN_RETRIES):
            data = read_commit(root)
            try:
                return cls._from_commit(root, data, **options)
            except FileNotFoundError as exc:  # a concurrent writer retired a file between our two reads
                if attempt == _OPEN_RETRIES - 1 or read_commit(root)["generation"] == data["generation"]:
                    raise IndexFormatError(f"index {root}: missing file {exc.filename}") from exc
        raise AssertionError("unreachable")

    load = open  # the name earlier releases used

    @classmethod
    def _from_commit(cls, root: Path, data: dict[str, Any], **options: Any) -> "Index":
        where = str(root / COMMIT)
        manifest = IndexManifest.from_json(data.get("manifest", {}), where)
        if manifest.format_version != FORMAT_VERSION:
            raise IndexFormatError(f"{where}: format {manifest.format_version}, expected {FORMAT_VERSION}")
        index = cls(manifest, directory=root, **options)
        segments = []
        try:
            for entry in data["segments"]:
                path = root / SEGMENTS / f"{entry['name']}{SEGMENT_SUFFIX}"
                if not path.exists():
                    raise FileNotFoundError(2, "missing", str(path))
                segment = Segment.open(path)
                _check_segment(segment, manifest, entry, str(path))
                deletes = {kind: _read_deletes(root / DELETES / name, segment.rows(kind))
                           for kind, name in entry.get("deletes", {}).items()}
                index._delete_files[segment.name] = dict(entry.get("deletes", {}))
                segments.append(LiveSegment.of(segment, deletes))
            generation, index._retired = int(data["generation"]), list(data.get("retired", []))
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{where}: damaged commit ({exc.__class__.__name__}: {exc})") from exc
        snapshot = Snapshot(generation, manifest, tuple(segments))
        if manifest.text_pipeline != TEXT_PIPELINE:
            if snapshot.live("texts") or snapshot.deleted("texts"):
                raise IndexFormatError(
                    f"index {root} holds texts encoded with text pipeline {manifest.text_pipeline!r}, but this "
                    f"engine encodes queries with {TEXT_PIPELINE!r}: re-encode its texts (delete and add them "
                    "again, or rebuild the index)")
            snapshot = replace(snapshot, manifest=replace(manifest, text_pipeline=TEXT_PIPELINE))
        index._snapshot = snapshot
        return index

    # ---- reading ------------------------------------------------------------------------------------------

    @property
    def directory(self) -> Path | None:
        """The directory every write goes through to, or None for an in-memory index."""
        return self._directory

    @property
    def manifest(self) -> IndexManifest:
        return self._snapshot.manifest

    @manifest.setter
    def manifest(self, manifest: IndexManifest) -> None:
        """Change the default scoring or ANN search settings (the identity must stay the same)."""
        if manifest.identity() != self.manifest.identity():
            raise IndexFormatError("a manifest with another identity cannot replace this index's")
        self._snapshot = replace(self._snapshot, manifest=manifest)

    def snapshot(self) -> Snapshot:
        """The current immutable view (searches and readers use it; writers publish a new one)."""
        return self._snapshot

    @property
    def has_crops(self) -> bool:
        return self.manifest.laclip is not None

    @property
    def image_ids(self) -> list[Id]:
        """Live image ids in index order (reads every id)."""
        return self._snapshot.ids("images")

    @property
    def text_ids(self) -> list[Id]:
        """Live text ids in index order (reads every id)."""
        return self._snapshot.ids("texts")

    def array(self, name: str) -> np.ndarray:
        """Live rows of image_global / image_crops / text_emb as float32 (materialised)."""
        return self._snapshot.array(name)

    def has_image(self, item: Id) -> bool:
        return self._snapshot.contains("images", id_key(check_id(item)))

    def has_text(self, item: Id) -> bool:
        return self._snapshot.contains("texts", id_key(check_id(item)))

    def payload(self, kind: str, item: Id) -> dict[str, Any] | None:
        snap, (position, row) = self._snapshot, self._locate(kind, item)
        return snap.part_at(kind, position).payload(row)

    def thumbnail(self, item: Id) -> bytes | None:
        snap, (position, row) = self._snapshot, self._locate("images", item)
        return snap.part_at("images", position).thumbnail(row)

    def vector(self, kind: str, item: Id) -> tuple[np.ndarray, np.ndarray | None]:
        """The stored (vector, crops) of one row, as float32."""
        snap, (position, row) = self._snapshot, self._locate(kind, item)
        part = snap.part_at(kind, position)
        crops = np.asarray(part.crops[row], np.float32) if part.crops is not None else None
        return np.asarray(part.vectors[row], np.float32), crops

    def _locate(self, kind: str, item: Id) -> tuple[int, int]:
        found = self._snapshot.locate(kind, id_key(check_id(item)))
        if found is None:
            raise InputError(f"unknown {kind[:-1]} id {item!r}")
        return found

    def stats(self) -> dict[str, Any]:
        """Counts, segments, deleted rows, bytes on disk, ANN state."""
        stats = self._snapshot.stats()
        stats["directory"] = str(self._directory) if self._directory else None
        stats["bytes_on_disk"] = _disk_bytes(self._directory) if self._directory else 0
        stats["device"] = str(self.place.device)
        return stats

    def verify(self) -> None:
        """Read every segment in full and check its checksums (opening checks only structure)."""
        for live in self._snapshot.segments:
            live.segment.verify()

    # ---- search -------------------------------------------------------------------------------------------

    def search_images(self, t: np.ndarray, k: int, *, score: ScoreConfig | None, exact: bool = False,
                      snapshot: Snapshot | None = None) -> list[Found]:
        """Top-k images per text query t [Q, D]; score None (or alpha = 1) is plain CLIP."""
        snap = snapshot or self._snapshot
        scorer = ImageScorer(np.ascontiguousarray(t, np.float32), self._effective(score))
        return search(snap, scorer, k, exact=exact, ann=snap.manifest.ann, place=self.place)

    def search_texts(self, g: np.ndarray, c: np.ndarray | None, k: int, *, score: ScoreConfig | None,
                     exact: bool = False, snapshot: Snapshot | None = None) -> list[Found]:
        """Top-k texts per query image (global g [Q, D], crops c [Q, K, D] or None)."""
        snap = snapshot or self._snapshot
        score = self._effective(score)
        if score is not None and (c is None or np.ndim(c) != 3 or len(c) != len(g) or np.shape(c)[2] != g.shape[1]):
            got = "none" if c is None else list(np.shape(c))
            raise InputError(f"LACLIP scoring of image queries needs crop embeddings [{len(g)}, K, {g.shape[1]}], "
                             f"got {got}")
        scorer = TextScorer(np.ascontiguousarray(g, np.float32),
                            np.ascontiguousarray(c, np.float32) if score is not None else None, score)
        return search(snap, scorer, k, exact=exact, ann=snap.manifest.ann, place=self.place)

    def _effective(self, score: ScoreConfig | None) -> ScoreConfig | None:
        if score is None or score.plain:
            return None
        if not self.has_crops:
            raise InputError("this index has no LACLIP crops: only plain CLIP scoring (alpha = 1) is possible")
        return score

    # ---- writing ------------------------------------------------------------------------------------------

    def add_images(self, ids: Sequence[Id], global_: np.ndarray, crops: np.ndarray | None = None,
                   payloads: Sequence[dict | None] | None = None,
                   thumbnails: Sequence[bytes | None] | None = None) -> list[Id]:
        """Add images (all or nothing; durable before returning when bound to a directory)."""
        return self.add(images=ImageRows(ids, global_, crops, payloads, thumbnails))

    def add_texts(self, ids: Sequence[Id], embeddings: np.ndarray,
                  payloads: Sequence[dict | None] | None = None) -> list[Id]:
        """Add texts (all or nothing; durable before returning when bound to a directory)."""
        return self.add(texts=TextRows(ids, embeddings, payloads))

    def add(self, *, images: ImageRows | None = None, texts: TextRows | None = None) -> list[Id]:
        """Add images and/or texts as one new segment; returns the new ids (images first)."""
        with self._lock:
            snap = self._snapshot
            sources = _sources(snap.manifest, images, texts, lambda kind, key: snap.contains(kind, key))
            if not any(len(s) for s in sources):
                return []
            segment = build_segment([s for s in sources if len(s)], snap.manifest,
                                    directory=self._segments_dir(), build_ann=None)
            with _discard_on_failure([segment.path]):
                self._commit(snap.segments + (LiveSegment.of(segment),), {})
            self._maybe_compact()
            return [i for s in sources for i in s.ids]

    def delete_images(self, ids: Sequence[Id]) -> int:
        return self.delete("images", ids)

    def delete_texts(self, ids: Sequence[Id]) -> int:
        return self.delete("texts", ids)

    def delete(self, kind: str, ids: Sequence[Id]) -> int:
        """Mark rows deleted (tombstones in the commit); an unknown or repeated id changes nothing."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__"):
            raise InputError(f"ids must be a list, got {type(ids).__name__}")
        with self._lock:
            snap = self._snapshot
            by_segment: dict[int, list[int]] = {}
            seen: set[str] = set()
            for position, item in enumerate(ids):
                key = id_key(check_id(item, position))
                found = snap.locate(kind, key)
                if key in seen:
                    raise InputError(f"id #{position}: {item!r} is given twice")
                if found is None:
                    raise InputError(f"id #{position}: unknown {kind[:-1]} id {item!r}; nothing was deleted")
                seen.add(key)
                by_segment.setdefault(found[0], []).append(found[1])
            if not by_segment:
                return 0
            segments = list(snap.segments)
            files: dict[str, dict[str, str]] = {}
            with _discard_on_failure(lambda: [self._directory / DELETES / by_kind[kind] for by_kind in files.values()]
                                     if self._directory is not None else []):
                for position, rows in by_segment.items():
                    live = segments[position]
                    merged = np.union1d(live.deleted.get(kind, np.zeros(0, np.int64)), rows).astype(np.int64)
                    name = self._write_deletes(live.segment.name, kind, merged)
                    if name is not None:
                        files[live.segment.name] = {kind: name}
                    segments[position] = LiveSegment.of(live.segment, {**live.deleted, kind: merged})
            written = [self._directory / DELETES / f for by_kind in files.values() for f in by_kind.values()
                       ] if self._directory is not None else []
            with _discard_on_failure(written):
                self._commit(tuple(segments), files)
            self._maybe_compact()
            return len(seen)

    def compact(self, *, full: bool = True) -> None:
        """Merge segments and drop deleted rows: all into one (`full`), or what the policy asks for."""
        with self._lock:
            snap = self._snapshot
            groups = self._full_group(snap) if full else self._policy_groups(snap)
            if groups:
                self._merge(snap, groups)
            if full:
                self._sweep()

    def publish(self, refs: Sequence[SegmentRef]) -> None:
        """Commit segments written by `write_segment` (all or none); ids must be new and unique across them."""
        if self._directory is None:
            raise InputError("publish needs an index bound to a directory")
        with self._lock:
            snap = self._snapshot
            identity = snap.manifest.identity()
            names = [ref.name for ref in refs]
            if len(set(names)) != len(names) or set(names) & {s.segment.name for s in snap.segments}:
                raise InputError("a segment is published twice")
            seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
            added = []
            for ref in refs:
                path = self._segments_dir() / f"{ref.name}{SEGMENT_SUFFIX}"
                if not path.is_file():
                    raise InputError(f"segment {ref.name} does not exist in {self._segments_dir()}")
                segment = Segment.open(path)
                if segment.identity != identity:
                    raise IndexFormatError(f"segment {path} was written for another index (identity "
                                           f"{segment.identity}, this index {identity})")
                for kind, part in segment.parts.items():
                    for row, item in enumerate(part.ids()):
                        key = id_key(item)
                        if key in seen[kind] or snap.contains(kind, key):
                            raise InputError(f"segment {ref.name}: {kind[:-1]} id {item!r} (row {row}) is "
                                             "already in the index or in another segment")
                        seen[kind].add(key)
                added.append(LiveSegment.of(segment))
            self._commit(snap.segments + tuple(added), {})
            self._maybe_compact()

    def save(self, directory: str | Path) -> Path:
        """Bind to `directory`: nothing to write when already bound there (every write went through), otherwise
        a full copy of the live rows is written there (which must not hold an index yet)."""
        target = Path(directory)
        with self._lock:
            if self._directory is not None and _same(self._directory, target):
                return target
            snap = self._snapshot
            copy = Index.create(target, snap.manifest, policy=self.policy)
            segments = tuple(LiveSegment.of(s) for s in
                             (copy._rewrite([live], snap.manifest) for live in snap.segments) if s is not None)
            copy._commit(segments, {})
            self._directory, self._snapshot = target, copy._snapshot
            self._delete_files, self._retired = {}, []
            return target

    # ---- internals ----------------------------------------------------------------------------------------

    def _segments_dir(self) -> Path | None:
        return self._directory / SEGMENTS if self._directory is not None else None

    def _write_deletes(self, segment: str, kind: str, rows: np.ndarray) -> str | None:
        if self._directory is None:
            return None
        name = f"{segment}.{kind}.{time.time_ns():x}.npy"
        with _discard_on_failure([self._directory / DELETES / name]):
            write_array(self._directory / DELETES / name, rows)
            fsync_dir(self._directory / DELETES)
        return name

    def _commit(self, segments: tuple[LiveSegment, ...], delete_files: dict[str, dict[str, str]],
                manifest: IndexManifest | None = None) -> None:
        """Make `segments` the live state: durably first (when bound), then in memory."""
        snap = self._snapshot
        manifest = manifest or snap.manifest
        files = {live.segment.name: {**self._delete_files.get(live.segment.name, {}),
                                     **delete_files.get(live.segment.name, {})} for live in segments}
        retired = self._retired_by(snap, segments, files)
        if self._directory is not None:
            data = {
                "format": FORMAT_NAME, "generation": snap.generation + 1, "manifest": manifest.to_json(),
                "segments": [{"name": live.segment.name, "images": live.segment.rows("images"),
                              "texts": live.segment.rows("texts"), "deletes": files[live.segment.name]}
                             for live in segments],
                "retired": retired,
            }
            path = self._directory / COMMIT
            with self._file_lock():
                previous = path.read_bytes() if snap.generation else None
                on_disk = read_commit(self._directory)["generation"] if snap.generation else 0
                if on_disk != snap.generation:
                    raise IndexFormatError(f"index {self._directory} was changed by another process (commit "
                                           f"{on_disk}, this process has {snap.generation}); reopen it")
                try:
                    write_json_atomic(path, data)
                except BaseException:
                    _restore(path, previous)
                    raise
            self._remove(self._retired)
        gone = [p for live in snap.segments for p in live.segment.parts.values()
                if live.segment.name not in {s.segment.name for s in segments}]
        self._snapshot = Snapshot(snap.generation + 1, manifest, segments)
        self._delete_files, self._retired = files, retired
        self.place.forget(gone)

    def _retired_by(self, snap: Snapshot, segments: tuple[LiveSegment, ...],
                    files: dict[str, dict[str, str]]) -> list[str]:
        """Files the old commit references and the new one does not (removed by the next commit)."""
        keep = {live.segment.name for live in segments}
        retired = [f"{SEGMENTS}/{live.segment.name}{SEGMENT_SUFFIX}" for live in snap.segments
                   if live.segment.name not in keep]
        for name, by_kind in self._delete_files.items():
            for kind, file in by_kind.items():
                if files.get(name, {}).get(kind) != file:
                    retired.append(f"{DELETES}/{file}")
        return retired

    def _remove(self, relative: list[str]) -> None:
        for rel in relative:
            try:
                (self._directory / rel).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("could not remove retired index file %s: %s", rel, exc)

    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        with open(self._directory / LOCK, "a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _maybe_compact(self) -> None:
        """Automatic compaction after a write; the write itself already succeeded, so a failure is only logged."""
        groups = self._policy_groups(self._snapshot)
        if not groups:
            return
        try:
            self._merge(self._snapshot, groups)
        except (OSError, EngineError) as exc:
            log.warning("automatic compaction failed (the write itself is committed): %s", exc)

    def _full_group(self, snap: Snapshot) -> list[list[int]]:
        """Everything, when there is anything to merge, drop or rebuild (an ANN structure missing or of another
        kind than the manifest asks for, e.g. a format-2 IVF segment)."""
        segs = snap.segments
        ann = snap.manifest.ann
        stale = ann.kind != "none" and faiss_module() is not None and any(
            part.rows >= ann.min_rows and (part.ann is None or part.ann.kind != ann.kind)
            for live in segs for part in live.segment.parts.values())
        if len(segs) > 1 or stale or any(live.deleted for live in segs):
            return [list(range(len(segs)))]
        return []

    def _policy_groups(self, snap: Snapshot) -> list[list[int]]:
        policy, groups = self.policy, []
        small = [i for i, live in enumerate(snap.segments)
                 if sum(live.segment.rows(kind) for kind in KINDS) < policy.small_rows]
        grouped = set(small) if len(small) > policy.max_small else set()
        if grouped:
            groups.append(small)
        for i, live in enumerate(snap.segments):
            rows = sum(live.segment.rows(kind) for kind in KINDS)
            dead = sum(len(live.deleted.get(kind, ())) for kind in KINDS)
            if i not in grouped and rows and dead / rows > policy.max_deleted_fraction:
                groups.append([i])
        return groups

    def _merge(self, snap: Snapshot, groups: list[list[int]]) -> None:
        """Replace each group of segments by one segment of their live rows (at the first one's position)."""
        replaced: dict[int, LiveSegment | None] = {}
        for group in groups:
            merged = self._rewrite([snap.segments[i] for i in group], snap.manifest)
            for i in group:
                replaced[i] = None
            replaced[group[0]] = LiveSegment.of(merged) if merged is not None else None
        segments = tuple(replaced.get(i, live) if i in replaced else live for i, live in enumerate(snap.segments))
        with _discard_on_failure([live.segment.path for live in replaced.values() if live is not None]):
            self._commit(tuple(s for s in segments if s is not None), {})

    def _rewrite(self, lives: list[LiveSegment], manifest: IndexManifest) -> Segment | None:
        """One new segment holding the live rows of `lives`, in order (None when none are live)."""
        sources = []
        for kind in KINDS:
            parts = [(live, live.segment.parts[kind]) for live in lives if kind in live.segment.parts]
            chosen = [(live.live_rows(kind), part) for live, part in parts]
            if not sum(len(rows) for rows, _ in chosen):
                continue
            ids = [part.id_at(int(r)) for rows, part in chosen for r in rows]
            payloads = [b for rows, part in chosen for b in _take(part.payload_bytes(), rows)]
            has_thumbs = any(part.thumbnail_bytes() is not None for _, part in chosen)
            thumbs = ([b for rows, part in chosen for b in _take(part.thumbnail_bytes() or [b""] * part.rows, rows)]
                      if has_thumbs else None)
            dtype = np.dtype(manifest.dtype)
            vectors = Rows([(part.vectors, rows) for rows, part in chosen], dtype)
            crops = (Rows([(part.crops, rows) for rows, part in chosen], dtype)
                     if kind == "images" and manifest.num_crops else None)
            sources.append(PartSource(kind, ids, vectors, crops, payloads, thumbs))
        if not sources:
            return None
        return build_segment(sources, manifest, directory=self._segments_dir())

    def _sweep(self) -> None:
        """Remove what crashed writes left behind: unreferenced delete files, stale temporaries and segments
        never published (older than an hour, so a parallel writer's unpublished segments are kept)."""
        if self._directory is None:
            return
        referenced = {f"{live.segment.name}{SEGMENT_SUFFIX}" for live in self._snapshot.segments}
        pending = set(self._retired)
        now = time.time()
        for path in (self._directory / SEGMENTS).iterdir():
            stale = now - path.stat().st_mtime > _STALE_SECONDS
            if path.name not in referenced and f"{SEGMENTS}/{path.name}" not in pending and stale:
                path.unlink(missing_ok=True)
        used = {f for by_kind in self._delete_files.values() for f in by_kind.values()}
        for path in (self._directory / DELETES).iterdir():
            if path.name not in used and f"{DELETES}/{path.name}" not in pending:
                path.unlink(missing_ok=True)


def write_segment(directory: str | Path, *, images: ImageRows | None = None,
                  texts: TextRows | None = None) -> SegmentRef:
    """Write one segment into the index at `directory` (fsynced), invisible until `Index.publish` commits it.
    Rows are validated against the index's manifest; ids are checked for uniqueness within the segment only."""
    root = Path(directory)
    manifest = IndexManifest.from_json(read_commit(root).get("manifest", {}), str(root / COMMIT))
    sources = [s for s in _sources(manifest, images, texts, lambda kind, key: False) if len(s)]
    if not sources:
        raise InputError("write_segment needs at least one image or text row")
    return build_segment(sources, manifest, directory=root / SEGMENTS).ref()


def read_commit(root: Path) -> dict[str, Any]:
    """The commit file's content; IndexFormatError for a missing, damaged or previous-format index."""
    path = root / COMMIT
    if not path.is_file():
        if (root / LEGACY_CURRENT).is_file():
            raise IndexFormatError(
                f"index {root} is in the previous format (CURRENT + snapshot folder); convert it with "
                f"`python -m engine upgrade {root}` (engine.index.upgrade)")
        raise IndexFormatError(f"{root} is not an index (no {COMMIT} file)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT_NAME or not isinstance(data.get("segments"), list):
            raise ValueError("not a cnclip index commit")
        int(data["generation"])
        return data
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path}: damaged commit file ({exc.__class__.__name__}: {exc})") from exc


def _sources(manifest: IndexManifest, images: ImageRows | None, texts: TextRows | None,
             present: Any) -> list[PartSource]:
    sources = []
    if images is not None:
        checked = check_image_rows(images, manifest, lambda key: present("images", key))
        sources.append(PartSource.of(checked, manifest.dtype))
    if texts is not None:
        checked = check_text_rows(texts, manifest, lambda key: present("texts", key))
        sources.append(PartSource.of(checked, manifest.dtype))
    return sources


def _check_segment(segment: Segment, manifest: IndexManifest, entry: dict[str, Any], where: str) -> None:
    if segment.identity != manifest.identity():
        raise IndexFormatError(f"{where}: segment written for another index identity")
    for kind in KINDS:
        if segment.rows(kind) != int(entry.get(kind, 0)):
            raise IndexFormatError(f"{where}: holds {segment.rows(kind)} {kind}, the commit says {entry.get(kind)}")
    part = segment.part("images")
    if part is not None and (part.vectors.shape[1] != manifest.embed_dim or
                             (manifest.num_crops and part.crops.shape[1:] != (manifest.num_crops, manifest.embed_dim))):
        raise IndexFormatError(f"{where}: image vectors have the wrong shape for this index")


def _read_deletes(path: Path, rows: int) -> np.ndarray:
    try:
        deleted = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: damaged deletes file ({exc})") from exc
    if deleted.ndim != 1 or deleted.dtype.kind != "i" or (len(deleted) and (deleted.min() < 0 or deleted.max() >= rows)):
        raise IndexFormatError(f"{path}: damaged deletes file (rows outside 0..{rows - 1})")
    return np.unique(deleted)


@contextmanager
def _discard_on_failure(paths: Any) -> Iterator[None]:
    """Remove files written for a write that then failed (`paths`: a list, or a callable giving one)."""
    try:
        yield
    except BaseException:
        for path in (paths() if callable(paths) else paths):
            if path is not None:
                Path(path).unlink(missing_ok=True)
        raise


def _restore(path: Path, previous: bytes | None) -> None:
    """After a failed commit, make sure the previous commit is the one on disk (the rename may have happened
    before the failure); if even that fails, the on-disk state is uncertain and the index must be reopened."""
    try:
        if previous is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != previous:
            write_bytes_atomic(path, previous)
    except BaseException as exc:
        raise IndexFormatError(f"{path}: a commit failed and the previous one could not be restored ({exc}); "
                               "reopen the index to see which state is on disk") from exc


def _take(items: list[bytes], rows: np.ndarray) -> list[bytes]:
    return [items[int(r)] for r in rows]


def _refuse_existing(root: Path) -> None:
    if (root / COMMIT).exists() or (root / LEGACY_CURRENT).exists():
        raise IndexFormatError(f"{root} already holds an index; open it instead (Index.open / Retriever.load)")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
