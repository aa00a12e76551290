"""Compaction: which segments to merge (`CompactionPolicy`, the strategy an Index is given) and how a group of
segments becomes one (`merged_segment`: their live rows, streamed, in order, after every checksum of every
column it reads was verified, so a damaged row is refused rather than rewritten with a fresh checksum)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ann import faiss_module
from .manifest import IndexManifest
from .segment import KINDS, PartSource, Segment, build_segment
from .snapshot import LiveSegment, Snapshot
from .storage import RowStream


@dataclass(frozen=True)
class CompactionPolicy:
    """When writes compact automatically: more than `max_small` segments under `small_rows` rows are merged;
    a segment with more than `max_deleted_fraction` of its rows deleted is rewritten without them."""

    small_rows: int = 20_000
    max_small: int = 16
    max_deleted_fraction: float = 0.3

    def groups(self, snap: Snapshot) -> list[list[int]]:
        """The groups of segment positions to merge after a write (none: nothing to do)."""
        groups = []
        small = [i for i, live in enumerate(snap.segments)
                 if sum(live.segment.rows(kind) for kind in KINDS) < self.small_rows]
        grouped = set(small) if len(small) > self.max_small else set()
        if grouped:
            groups.append(small)
        for i, live in enumerate(snap.segments):
            rows = sum(live.segment.rows(kind) for kind in KINDS)
            dead = sum(len(live.deleted.get(kind, ())) for kind in KINDS)
            if i not in grouped and rows and dead / rows > self.max_deleted_fraction:
                groups.append([i])
        return groups


def full_groups(snap: Snapshot) -> list[list[int]]:
    """Everything, when there is anything to merge, drop or rebuild (an ANN structure missing or of another kind
    than the manifest asks for, e.g. a format-2 IVF segment)."""
    segs = snap.segments
    ann = snap.manifest.ann
    stale = ann.kind != "none" and faiss_module() is not None and any(
        part.rows >= ann.min_rows and (part.ann is None or part.ann.kind != ann.kind)
        for live in segs for part in live.segment.parts.values())
    if len(segs) > 1 or stale or any(live.deleted for live in segs):
        return [list(range(len(segs)))]
    return []


def merged_segment(lives: list[LiveSegment], manifest: IndexManifest, directory: Path | None) -> Segment | None:
    """One new segment holding the live rows of `lives`, in order (None when none are live). An IndexFormatError
    naming the file and column, before anything is written, when a source segment fails its checksums."""
    for live in lives:
        live.segment.verify()
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
        vectors = RowStream([(part.vectors, rows) for rows, part in chosen], dtype)
        crops = (RowStream([(part.crops, rows) for rows, part in chosen], dtype)
                 if kind == "images" and manifest.num_crops else None)
        geometry = (np.concatenate([part.geometry_rows(rows) for rows, part in chosen])
                    if any(part.geometry is not None for _, part in chosen) else None)  # unknown rows: zeros
        sources.append(PartSource(kind, ids, vectors, crops, payloads, thumbs, geometry))
    if not sources:
        return None
    return build_segment(sources, manifest, directory=directory)


def _take(items: list[bytes], rows: np.ndarray) -> list[bytes]:
    return [items[int(r)] for r in rows]
