"""Segments: immutable batches of rows (images and/or texts), one container file each, memory-mapped on open.

A segment part (its images, or its texts) holds vectors [n, D] in the index's storage dtype, crops [n, K, D]
for LACLIP images, ids (canonical keys as blobs, plus a sorted 64-bit hash column for lookups without loading
ids), JSON payloads, JPEG thumbnails (images), and its ANN structure when it has one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IndexFormatError
from ..ids import Id, id_key
from ..laclip import ScoreConfig
from .ann import Candidates, build_hnsw, build_ivf
from .manifest import AnnConfig, IndexManifest
from .rows import CheckedRows, decode_payload
from .storage import RowStream, fsync_dir, read_container, temp_tag, verify_container, write_container

log = logging.getLogger(__name__)
SEGMENT_SUFFIX = ".seg"
KINDS = ("images", "texts")
_POOLED_CACHE_ENTRIES = 2
_SMALL_COLUMNS = frozenset({"id_order", "id_hash", "id_data", "id_offsets", "id_int", "payload_data",
                            "payload_offsets"})
ANN_COLUMNS = {"ivf": "ivf_fastscan", "hnsw": "hnsw"}  # the column holding each kind's serialised FAISS index


@dataclass(frozen=True)
class SegmentRef:
    """A written segment, not visible until `Index.publish` commits it."""

    name: str
    identity: str
    images: int
    texts: int


@dataclass(frozen=True)
class PartSource:
    """Rows of one kind about to be written: ids, vectors and crops (streamed), encoded payloads, thumbnails, and
    image geometry [n, 3] (width, height, crop seed) when known."""

    kind: str
    ids: list[Id]
    vectors: RowStream
    crops: RowStream | None
    payloads: list[bytes]
    thumbnails: list[bytes] | None
    geometry: np.ndarray | None = None

    @classmethod
    def of(cls, rows: CheckedRows, dtype: str) -> "PartSource":
        crops = RowStream.of(rows.crops, dtype) if rows.crops is not None else None
        return cls(rows.kind, rows.ids, RowStream.of(rows.vectors, dtype), crops, rows.payloads, rows.thumbnails,
                   rows.geometry)

    def __len__(self) -> int:
        return len(self.ids)


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


class Blobs:
    """Variable-length byte strings as one uint8 array plus [n + 1] offsets (both may be memory-mapped)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    @staticmethod
    def columns(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
        data = np.frombuffer(b"".join(items), dtype=np.uint8) if items else np.zeros(0, np.uint8)
        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in items], out=offsets[1:])
        return data, offsets

    def __getitem__(self, row: int) -> bytes:
        return self.data[int(self.offsets[row]):int(self.offsets[row + 1])].tobytes()

    def all(self) -> list[bytes]:
        return [self[i] for i in range(len(self.offsets) - 1)]


def part_columns(source: PartSource, ann: AnnConfig, build_ann: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(columns, part meta) for one part, with its serialised ANN structure when one is built."""
    meta: dict[str, Any] = {"rows": len(source), "ann": None}
    columns: dict[str, Any] = {}
    if build_ann and ann.kind != "none":
        structure = (build_ivf if ann.kind == "ivf" else build_hnsw)(source.vectors, ann)
        if structure is not None:
            columns[ANN_COLUMNS[ann.kind]] = structure
            meta["ann"] = ann.kind
    columns["vectors"] = source.vectors
    if source.crops is not None:
        columns["crops"] = source.crops
    keys = [id_key(i) for i in source.ids]
    hashes = np.array([key_hash(k) for k in keys], dtype=np.uint64)
    columns["id_order"] = np.argsort(hashes, kind="stable").astype(np.int64)
    columns["id_hash"] = hashes[columns["id_order"]]
    columns["id_data"], columns["id_offsets"] = Blobs.columns([k.encode("utf-8") for k in keys])
    columns["id_int"] = np.array([isinstance(i, int) for i in source.ids], dtype=bool)
    columns["payload_data"], columns["payload_offsets"] = Blobs.columns(source.payloads)
    if source.thumbnails is not None and any(source.thumbnails):
        columns["thumb_data"], columns["thumb_offsets"] = Blobs.columns(source.thumbnails)
    if source.geometry is not None:
        columns["geometry"] = np.ascontiguousarray(source.geometry, np.int64)
    return columns, meta


def _candidates(kind: str, columns: dict[str, np.ndarray], meta: dict[str, Any], where: str) -> Candidates | None:
    """The part's ANN structure, or None: none was built, or it is the format-2 IVF layout (centroids and
    list offsets, no codes), which is scanned exactly until compaction rebuilds it (logged)."""
    ann = meta.get("ann")
    if ann is None:
        return None
    if ann == "ivf" and ANN_COLUMNS["ivf"] not in columns:
        log.warning("%s: %s were written with the format-2 IVF layout; they are searched exactly until "
                    "Index.compact() rebuilds them with fast-scan candidates", where, kind)
        return None
    if ann not in ANN_COLUMNS or ANN_COLUMNS[ann] not in columns:
        raise IndexFormatError(f"{where}: {kind} claim an {ann!r} ANN structure the file does not hold")
    return Candidates(ann, columns[ANN_COLUMNS[ann]])


class Part:
    """One kind of rows of a segment, read-only. Row numbers are positions within this part."""

    def __init__(self, kind: str, columns: dict[str, np.ndarray], meta: dict[str, Any], where: str) -> None:
        self.kind, self.where = kind, where
        self.rows = int(meta["rows"])
        self.vectors = columns["vectors"]
        self.crops = columns.get("crops")
        self._ids = Blobs(columns["id_data"], columns["id_offsets"])
        self._id_int, self._id_hash, self._id_order = columns["id_int"], columns["id_hash"], columns["id_order"]
        self._payloads = Blobs(columns["payload_data"], columns["payload_offsets"])
        self._thumbs = Blobs(columns["thumb_data"], columns["thumb_offsets"]) if "thumb_data" in columns else None
        self.geometry = columns.get("geometry")  # [n, 3] width, height, crop seed; absent in older segments
        self.ann = _candidates(kind, columns, meta, where)
        self._pooled: dict[tuple[float, float], np.ndarray] = {}
        self._max_int: int | None = None
        self._lock = threading.Lock()
        lengths = {"vectors": len(self.vectors), "id_int": len(self._id_int), "id_hash": len(self._id_hash),
                   "id_offsets": len(self._ids.offsets) - 1, "payload_offsets": len(self._payloads.offsets) - 1}
        if self.crops is not None:
            lengths["crops"] = len(self.crops)
        if self.geometry is not None:
            lengths["geometry"] = len(self.geometry)
        for name, length in lengths.items():
            if length != self.rows:
                raise IndexFormatError(f"{where}: {kind}.{name} has {length} rows, expected {self.rows}")

    def id_at(self, row: int) -> Id:
        try:
            key = self._ids[row].decode("utf-8")
            return int(key) if self._id_int[row] else key
        except (UnicodeDecodeError, ValueError) as exc:
            raise IndexFormatError(f"{self.where}: the id of {self.kind} row {row} is damaged ({exc})") from exc

    def ids(self) -> list[Id]:
        return [self.id_at(i) for i in range(self.rows)]

    def max_int_id(self) -> int:
        """The largest int id in this part (-1 if none), computed once."""
        if self._max_int is None:
            self._max_int = max((int(self._ids[int(r)]) for r in np.flatnonzero(self._id_int)), default=-1)
        return self._max_int

    def find(self, key: str) -> int:
        """The row holding id `key`, or -1."""
        h = np.uint64(key_hash(key))
        lo, hi = np.searchsorted(self._id_hash, h, "left"), np.searchsorted(self._id_hash, h, "right")
        for row in self._id_order[lo:hi]:
            if self._ids[int(row)].decode("utf-8") == key:
                return int(row)
        return -1

    def payload(self, row: int) -> dict[str, Any] | None:
        try:
            return decode_payload(self._payloads[row])
        except ValueError as exc:  # JSON and UTF-8 errors both are ValueErrors
            raise IndexFormatError(f"{self.where}: the payload of {self.kind} row {row} is damaged ({exc})") from exc

    def payload_bytes(self) -> list[bytes]:
        return self._payloads.all()

    def thumbnail(self, row: int) -> bytes | None:
        return (self._thumbs[row] or None) if self._thumbs is not None else None

    def thumbnail_bytes(self) -> list[bytes] | None:
        return self._thumbs.all() if self._thumbs is not None else None

    def geometry_rows(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 3] geometry of `rows`; zeros (unknown) where this part recorded none."""
        if self.geometry is None:
            return np.zeros((len(rows), 3), np.int64)
        return np.asarray(self.geometry[rows], np.int64)

    def pooled(self, score: ScoreConfig, pool: Any) -> np.ndarray:
        """Pooled vectors of every row for (tau, alpha) in the storage dtype, computed on first use and cached
        (the last few settings per part)."""
        key = (float(score.tau), float(score.alpha))
        with self._lock:
            cached = self._pooled.get(key)
        if cached is not None:
            return cached
        step = 65536
        out = np.empty((self.rows, self.vectors.shape[1]), dtype=self.vectors.dtype)
        for start in range(0, self.rows, step):
            stop = start + step
            out[start:stop] = pool(np.asarray(self.vectors[start:stop], np.float32),
                                   np.asarray(self.crops[start:stop], np.float32), score)
        with self._lock:
            while len(self._pooled) >= _POOLED_CACHE_ENTRIES:
                self._pooled.pop(next(iter(self._pooled)))
            self._pooled[key] = out
        return out

    def nbytes(self) -> int:
        return int(self.vectors.nbytes + (self.crops.nbytes if self.crops is not None else 0))


class Segment:
    """An immutable segment: a name, the identity it was written for, and its image and text parts."""

    def __init__(self, name: str, meta: dict[str, Any], columns: dict[str, np.ndarray], where: str,
                 path: Path | None = None) -> None:
        self.name, self.path = name, path
        try:
            self.identity = str(meta["identity"])
            parts_meta = meta["parts"]
            self.parts: dict[str, Part] = {}
            for kind, part_meta in parts_meta.items():
                prefix = f"{kind}."
                own = {k[len(prefix):]: v for k, v in columns.items() if k.startswith(prefix)}
                self.parts[kind] = Part(kind, own, part_meta, where)
        except (KeyError, TypeError, ValueError) as exc:
            raise IndexFormatError(f"{where}: damaged segment ({exc.__class__.__name__}: {exc})") from exc

    def part(self, kind: str) -> Part | None:
        return self.parts.get(kind)

    def rows(self, kind: str) -> int:
        part = self.parts.get(kind)
        return part.rows if part is not None else 0

    @classmethod
    def open(cls, path: Path) -> "Segment":
        """Map a segment file; its id and payload columns (small) are checked against their checksums at once."""
        meta, columns = read_container(path, verify=_checked_at_open)
        return cls(path.name[:-len(SEGMENT_SUFFIX)], meta, columns, str(path), path)

    def verify(self) -> None:
        if self.path is not None:
            verify_container(self.path)

    def ref(self) -> SegmentRef:
        return SegmentRef(self.name, self.identity, self.rows("images"), self.rows("texts"))


def _checked_at_open(column: str) -> bool:
    """Columns whose damage would rename, drop or garble rows silently: ids, id lookups and payloads."""
    return column.split(".", 1)[-1] in _SMALL_COLUMNS


def new_segment_name() -> str:
    return uuid.uuid4().hex


def build_segment(sources: list[PartSource], manifest: IndexManifest, *, directory: Path | None,
                  build_ann: bool | None = None) -> Segment:
    """Write the parts as one segment file under `directory` (fsynced, renamed into place), or keep it in memory
    when `directory` is None. ANN structures are built for parts of at least `manifest.ann.min_rows` rows, in
    memory as on disk."""
    columns: dict[str, Any] = {}
    meta: dict[str, Any] = {"format_version": manifest.format_version, "identity": manifest.identity(), "parts": {}}
    for source in sources:
        wants_ann = build_ann if build_ann is not None else len(source) >= manifest.ann.min_rows
        part_cols, part_meta = part_columns(source, manifest.ann, wants_ann)
        columns.update({f"{source.kind}.{name}": value for name, value in part_cols.items()})
        meta["parts"][source.kind] = part_meta
    name = new_segment_name()
    if directory is None:
        materialised = {k: v if isinstance(v, np.ndarray) else _materialise(v) for k, v in columns.items()}
        return Segment(name, meta, materialised, f"<memory segment {name}>")
    tmp = directory / f".{temp_tag()}{name}{SEGMENT_SUFFIX}"
    final = directory / f"{name}{SEGMENT_SUFFIX}"
    try:
        write_container(tmp, columns, meta)
        os.replace(tmp, final)
        fsync_dir(directory)
    except BaseException:
        tmp.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise
    return Segment.open(final)


def _materialise(rows: RowStream) -> np.ndarray:
    chunks = list(rows.chunks())
    return np.concatenate(chunks) if chunks else np.zeros(rows.shape, rows.dtype)
