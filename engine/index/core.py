"""The segmented index: immutable segments plus one small commit file (`index.json`) replaced atomically.

`Index` is the writer over its read side (engine.index.reads). Every write (add, delete, compaction, publish) is
validated completely, writes its new files (fsynced), then commits (engine.index.commit); only after that
succeeds does the in-memory snapshot change. A crash at any point leaves the old or the new commit live. Files a
commit retires are removed by the next commit (engine.index.gc), so a reader that opened the previous commit
keeps working (and segments are memory-mapped: an open map outlives the file's name). Where the files go is the
index's directory (engine.index.directory: a folder, or memory); when to merge is its CompactionPolicy
(engine.index.compaction); opening and validating a commit is engine.index.opening.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import EngineError, IdConflictError, IndexFormatError, InputError, ReadOnlyIndexError
from ..ids import Id, check_id, id_key
from .commit import COMMIT, DELETES, FORMAT_NAME, SEGMENTS, discard_on_failure, read_commit
from .compaction import CompactionPolicy, full_groups, merged_segment
from .directory import DiskDirectory, directory_at
from .gc import sweep_temporaries
from .manifest import IndexManifest
from .opening import manifest_of, open_state
from .reads import IndexReads
from .rows import ImageRows, TextRows, check_image_rows, check_text_rows
from .search import Placement
from .segment import KINDS, SEGMENT_SUFFIX, PartSource, Segment, SegmentRef, build_segment
from .snapshot import LiveSegment, Snapshot

log = logging.getLogger(__name__)


class Index(IndexReads):
    """Images and texts with ids, vectors, payloads and thumbnails; bound to a directory or in memory only."""

    def __init__(self, manifest: IndexManifest, *, directory: str | Path | None = None,
                 policy: CompactionPolicy = CompactionPolicy(), device: str = "cpu",
                 refresh_interval_s: float | None = 1.0, lock_timeout_s: float | None = 30.0,
                 read_only: bool = False) -> None:
        """An empty in-memory index (use `create`/`open` for one on disk). `refresh_interval_s`: how often reads
        look for another process's newer commit (None: only `refresh()`); `lock_timeout_s`: how long a write
        waits for another writer before IndexBusyError (None: forever); `read_only`: a replica that follows
        commits and never takes the writer lock (every write raises ReadOnlyIndexError)."""
        self.policy = policy
        self.read_only = read_only
        self.refresh_interval_s = refresh_interval_s
        self.lock_timeout_s = lock_timeout_s
        self._manifest_override: IndexManifest | None = None
        self._writing = False
        self.place = Placement(device)
        self._dir = directory_at(directory)
        self._lock = threading.RLock()
        self._snapshot = Snapshot(0, manifest, ())
        self._delete_files: dict[str, dict[str, str]] = {}
        self._retired: list[str] = []

    # ---- opening ------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str | Path, manifest: IndexManifest, **options: Any) -> "Index":
        """A new empty index in `directory` (created; it must not already hold an index)."""
        root = DiskDirectory.create(directory).path
        index = cls(manifest, directory=root, **options)
        with index._lock, index._dir.writer_lock(index.lock_timeout_s):
            index._commit(index._current.segments, {})
        return index

    @classmethod
    def open(cls, directory: str | Path, **options: Any) -> "Index":
        """Open the index in `directory`, memory-mapping its segments (rows are not read)."""
        root = Path(directory)
        state = open_state(root)
        sweep_temporaries(root)  # a killed writer's temporaries (live writers' are left alone)
        index = cls(state.snapshot.manifest, directory=root, **options)
        index._snapshot, index._delete_files, index._retired = state.snapshot, state.delete_files, state.retired
        return index

    load = open  # the name earlier releases used

    # ---- following other processes' commits ---------------------------------------------------------------

    def refresh(self) -> bool:
        """Swap in the newest commit when another process made one (True then); searches in flight finish on the
        snapshot they started with, and segments both commits hold are kept as they are (mapped, resident)."""
        generation = self._dir.generation()
        if generation is None:
            return False
        with self._lock:
            old = self._current
            if generation == old.generation:
                return False
            state = open_state(self._dir.path, reuse={live.segment.name: live.segment for live in old.segments})
            snapshot = state.snapshot
            if self._manifest_override is not None:  # settings changed in memory (scoring, ANN) stay
                snapshot = replace(snapshot, manifest=self._manifest_override)
            names = {live.segment.name for live in snapshot.segments}
            gone = [p for live in old.segments if live.segment.name not in names for p in live.segment.parts.values()]
            self._current, self._delete_files, self._retired = snapshot, state.delete_files, state.retired
            self.place.forget(gone)
            log.info("index %s: followed another process's commit %d -> %d", self._dir.path.name, old.generation,
                     snapshot.generation)
            return True

    def _check_writable(self) -> None:
        if self.read_only:
            name = self._dir.path.name if self._dir.path is not None else "(in memory)"
            raise ReadOnlyIndexError(f"index {name} is open read-only: send adds and deletes to its writer")

    @contextmanager
    def _writer(self) -> Iterator[Snapshot]:
        """One writer at a time: this process's lock, then the index's writer lock across processes (waiting at
        most lock_timeout_s), then a rebase onto the newest commit, which it yields."""
        self._check_writable()
        with self._lock:
            if self._writing:  # already held by this thread (a write's automatic compaction)
                yield self._current
                return
            with self._dir.writer_lock(self.lock_timeout_s):
                self._writing = True
                try:
                    self.refresh()
                    yield self._current
                finally:
                    self._writing = False

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
        self._check_writable()  # before any file is written
        with self._lock:
            snap = self._snapshot
            sources = _sources(snap.manifest, images, texts, lambda kind, key: snap.contains(kind, key))
            if not any(len(s) for s in sources):
                return []
            segment = build_segment([s for s in sources if len(s)], snap.manifest, directory=self._dir.segments,
                                    build_ann=None)
            with discard_on_failure([segment.path]), self._writer() as latest:
                for source in sources:  # another process's commit may have added an id since `snap`
                    for item in source.ids:
                        if latest.contains(source.kind, id_key(item)):
                            raise IdConflictError(f"{source.kind[:-1]} id {item!r} was added by another process "
                                                  "while this write waited; nothing was added")
                self._commit(latest.segments + (LiveSegment.of(segment),), {})
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
            seen_before = self._snapshot
            with self._writer() as snap:
                return self._delete(kind, ids, seen_before, snap)

    def _delete(self, kind: str, ids: Sequence[Id], seen_before: Snapshot, snap: Snapshot) -> int:
        """The delete itself, under the writer lock, against the newest commit `snap`; an id that `seen_before`
        (what the caller could see) held but `snap` no longer does was deleted by another process (409)."""
        by_segment: dict[int, list[int]] = {}
        seen: set[str] = set()
        for position, item in enumerate(ids):
            key = id_key(check_id(item, position))
            found = snap.locate(kind, key)
            if key in seen:
                raise InputError(f"id #{position}: {item!r} is given twice")
            if found is None and seen_before.locate(kind, key) is not None:
                raise IdConflictError(f"id #{position}: {kind[:-1]} {item!r} was deleted by another process "
                                      "while this delete waited; nothing was deleted")
            if found is None:
                raise InputError(f"id #{position}: unknown {kind[:-1]} id {item!r}; nothing was deleted")
            seen.add(key)
            by_segment.setdefault(found[0], []).append(found[1])
        if not by_segment:
            return 0
        segments = list(snap.segments)
        files: dict[str, dict[str, str]] = {}
        with discard_on_failure(lambda: self._dir.delete_paths([f for by in files.values() for f in by.values()])):
            for position, rows in by_segment.items():
                live = segments[position]
                merged = np.union1d(live.deleted.get(kind, np.zeros(0, np.int64)), rows).astype(np.int64)
                name = self._dir.write_deletes(live.segment.name, kind, merged)
                if name is not None:
                    files[live.segment.name] = {kind: name}
                segments[position] = LiveSegment.of(live.segment, {**live.deleted, kind: merged})
            self._commit(tuple(segments), files)
        self._maybe_compact()
        return len(seen)

    def compact(self, *, full: bool = True) -> None:
        """Merge segments and drop deleted rows: all into one (`full`), or what the policy asks for."""
        with self._writer() as snap:
            groups = full_groups(snap) if full else self.policy.groups(snap)
            if groups:
                self._merge(snap, groups)
            if full:
                self._sweep()

    def publish(self, refs: Sequence[SegmentRef]) -> None:
        """Commit segments written by `write_segment` (all or none); ids must be new and unique across them."""
        if self._dir.segments is None:
            raise InputError("publish needs an index bound to a directory")
        with self._writer() as snap:
            identity = snap.manifest.identity()
            names = [ref.name for ref in refs]
            if len(set(names)) != len(names) or set(names) & {s.segment.name for s in snap.segments}:
                raise InputError("a segment is published twice")
            seen: dict[str, set[str]] = {kind: set() for kind in KINDS}
            added = []
            for ref in refs:
                path = self._dir.segments / f"{ref.name}{SEGMENT_SUFFIX}"
                if not path.is_file():
                    raise InputError(f"segment {ref.name} does not exist in {self._dir.segments}")
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
            if self._dir.holds(target):
                return target
            snap = self._snapshot
            copy = Index.create(target, snap.manifest, policy=self.policy)
            rewritten = (merged_segment([live], snap.manifest, copy._dir.segments) for live in snap.segments)
            with copy._writer():
                copy._commit(tuple(LiveSegment.of(s) for s in rewritten if s is not None), {})
            self._dir, self._snapshot = copy._dir, copy._snapshot
            self._delete_files, self._retired = {}, []
            return target

    # ---- committing and compacting ------------------------------------------------------------------------

    def _commit(self, segments: tuple[LiveSegment, ...], delete_files: dict[str, dict[str, str]],
                manifest: IndexManifest | None = None) -> None:
        """Make `segments` the live state: durably first (in the directory), then in memory. The caller holds
        the writer lock (`_writer`) and built `segments` from the snapshot it yielded."""
        snap = self._current
        manifest = manifest or snap.manifest
        files = {live.segment.name: {**self._delete_files.get(live.segment.name, {}),
                                     **delete_files.get(live.segment.name, {})} for live in segments}
        retired = self._retired_by(snap, segments, files)
        data = {
            "format": FORMAT_NAME, "generation": snap.generation + 1, "manifest": manifest.to_json(),
            "segments": [{"name": live.segment.name, "images": live.segment.rows("images"),
                          "texts": live.segment.rows("texts"), "deletes": files[live.segment.name]}
                         for live in segments],
            "retired": retired,
        }
        self._dir.commit(data, snap.generation, self._retired)
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

    def _maybe_compact(self) -> None:
        """Automatic compaction after a write; the write itself already succeeded, so a failure is only logged."""
        try:
            with self._writer() as snap:
                groups = self.policy.groups(snap)
                if groups:
                    self._merge(snap, groups)
        except (OSError, EngineError) as exc:
            log.warning("automatic compaction failed (the write itself is committed): %s", exc)

    def _merge(self, snap: Snapshot, groups: list[list[int]]) -> None:
        """Replace each group of segments by one segment of their live rows (at the first one's position); under
        the writer lock, `snap` the newest commit. Any failure (a source failing its checksums included) removes
        what this merge wrote and leaves the index as it was."""
        replaced: dict[int, LiveSegment | None] = {}

        def written() -> list[Path | None]:
            return [live.segment.path for live in replaced.values() if live is not None]

        with discard_on_failure(written):
            for group in groups:
                merged = merged_segment([snap.segments[i] for i in group], snap.manifest, self._dir.segments)
                for i in group:
                    replaced[i] = None
                replaced[group[0]] = LiveSegment.of(merged) if merged is not None else None
            segments = tuple(replaced.get(i, live) for i, live in enumerate(snap.segments))
            self._commit(tuple(s for s in segments if s is not None), {})

    def _sweep(self) -> None:
        """Remove what crashed writes left behind (engine.index.gc.sweep)."""
        self._dir.sweep({live.segment.name for live in self._current.segments},
                        {f for by_kind in self._delete_files.values() for f in by_kind.values()}, set(self._retired))


def write_segment(directory: str | Path, *, images: ImageRows | None = None,
                  texts: TextRows | None = None) -> SegmentRef:
    """Write one segment into the index at `directory` (fsynced), invisible until `Index.publish` commits it.
    Rows are validated against the index's manifest; ids are checked for uniqueness within the segment only."""
    root = Path(directory)
    manifest = manifest_of(root, read_commit(root))
    sources = [s for s in _sources(manifest, images, texts, lambda kind, key: False) if len(s)]
    if not sources:
        raise InputError("write_segment needs at least one image or text row")
    return build_segment(sources, manifest, directory=root / SEGMENTS).ref()


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


__all__ = ["COMMIT", "CompactionPolicy", "Index", "read_commit", "write_segment"]
