"""Opening an index: read its commit, open (memory-map) every segment it names and validate all of it against
the manifest (identity, row counts, shapes, delete files, text pipeline) before anything is searched."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import IndexFormatError
from ..preprocess import TEXT_PIPELINE
from .commit import COMMIT, DELETES, SEGMENTS, read_commit
from .manifest import FORMAT_VERSION, IndexManifest
from .segment import KINDS, SEGMENT_SUFFIX, Segment
from .snapshot import LiveSegment, Snapshot
from .storage import deletes_file_intact

_OPEN_RETRIES = 3


@dataclass(frozen=True)
class OpenedState:
    """What an index holds at one commit: its snapshot, each segment's delete files, the files it retired, and
    each segment's position in the commit (they differ from the snapshot's only when `keep` left some out)."""

    snapshot: Snapshot
    delete_files: dict[str, dict[str, str]]
    retired: list[str]
    positions: tuple[int, ...] = ()


def open_state(root: Path, reuse: dict[str, Segment] | None = None,
               keep: Callable[[str], bool] | None = None) -> OpenedState:
    """The validated state of the index at `root`, retrying when a concurrent writer retires a file between
    reading the commit and opening what it names. Segments in `reuse` (by name: segments are immutable) are
    taken as they are instead of being mapped again, so a refresh keeps their device-resident copies. `keep`
    (a segment name -> bool): open only those segments (a shard's part of the index)."""
    for attempt in range(_OPEN_RETRIES):
        data = read_commit(root)
        try:
            return _state(root, data, reuse or {}, keep)
        except FileNotFoundError as exc:
            if attempt == _OPEN_RETRIES - 1 or read_commit(root)["generation"] == data["generation"]:
                raise IndexFormatError(f"index {root}: missing file {exc.filename}") from exc
    raise AssertionError("unreachable")


def manifest_of(root: Path, data: dict[str, Any]) -> IndexManifest:
    return IndexManifest.from_json(data.get("manifest", {}), str(root / COMMIT))


def _state(root: Path, data: dict[str, Any], reuse: dict[str, Segment],
           keep: Callable[[str], bool] | None) -> OpenedState:
    where = str(root / COMMIT)
    manifest = manifest_of(root, data)
    if manifest.format_version != FORMAT_VERSION:
        raise IndexFormatError(f"{where}: format {manifest.format_version}, expected {FORMAT_VERSION}")
    segments = []
    delete_files: dict[str, dict[str, str]] = {}
    positions: list[int] = []
    try:
        for position, entry in enumerate(data["segments"]):
            if keep is not None and not keep(entry["name"]):
                continue
            positions.append(position)
            path = root / SEGMENTS / f"{entry['name']}{SEGMENT_SUFFIX}"
            segment = reuse.get(entry["name"])
            if segment is None:
                if not path.exists():
                    raise FileNotFoundError(2, "missing", str(path))
                segment = Segment.open(path)
            check_segment(segment, manifest, entry, str(path))
            deletes = {kind: read_deletes(root / DELETES / name, segment.rows(kind))
                       for kind, name in entry.get("deletes", {}).items()}
            delete_files[segment.name] = dict(entry.get("deletes", {}))
            segments.append(LiveSegment.of(segment, deletes))
        generation, retired = int(data["generation"]), list(data.get("retired", []))
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
    return OpenedState(snapshot, delete_files, retired, tuple(positions))


def check_segment(segment: Segment, manifest: IndexManifest, entry: dict[str, Any], where: str) -> None:
    """A segment named by a commit: written for this identity, with the rows and shapes the commit says."""
    if segment.identity != manifest.identity():
        raise IndexFormatError(f"{where}: segment written for another index identity")
    for kind in KINDS:
        if segment.rows(kind) != int(entry.get(kind, 0)):
            raise IndexFormatError(f"{where}: holds {segment.rows(kind)} {kind}, the commit says {entry.get(kind)}")
    part = segment.part("images")
    if part is not None and (part.vectors.shape[1] != manifest.embed_dim or
                             (manifest.num_crops and part.crops.shape[1:] != (manifest.num_crops, manifest.embed_dim))):
        raise IndexFormatError(f"{where}: image vectors have the wrong shape for this index")


def read_deletes(path: Path, rows: int) -> np.ndarray:
    """A delete file's row numbers, checked: a 1-d int array of rows in 0..rows-1 matching its named checksum."""
    try:
        deleted = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path}: damaged deletes file ({exc})") from exc
    if deleted.ndim != 1 or deleted.dtype.kind != "i" or (len(deleted) and (deleted.min() < 0 or deleted.max() >= rows)):
        raise IndexFormatError(f"{path}: damaged deletes file (rows outside 0..{rows - 1})")
    if not deletes_file_intact(path.name, deleted):
        raise IndexFormatError(f"{path}: damaged deletes file (its rows fail the checksum in its name)")
    return np.unique(deleted)
