"""What an Index answers without writing: lookups by id, stored rows, stats, checksums, and top-k searches, all
over the current immutable Snapshot (so they run from many threads while one writer works)."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import IndexFormatError, InputError
from ..ids import Id, check_id, id_key
from ..laclip import ScoreConfig
from .directory import Directory
from .manifest import IndexManifest
from .filters import parse_where
from .search import CropScorer, Found, ImageScorer, Placement, Scorer, TextScorer, search
from .snapshot import Snapshot
from .verification import verify_index


class IndexReads:
    """The read side of `Index` (engine.index.core): it holds `_current`, `_dir` and `place`. Every read goes
    through `_snapshot`, which first follows another process's newer commit (`refresh`), checked at most every
    `refresh_interval_s` (None: only when `refresh()` is called)."""

    _current: Snapshot
    _dir: Directory
    place: Placement
    refresh_interval_s: float | None = 1.0
    _checked_at: float = float("-inf")
    _manifest_override: IndexManifest | None = None
    scatter: Callable[[Snapshot, Scorer, int, bool], list[Found]] | None = None  # engine.serve.cluster's shards

    @property
    def _snapshot(self) -> Snapshot:
        if self.refresh_interval_s is not None and self._dir.path is not None:
            now = time.monotonic()
            if now - self._checked_at >= self.refresh_interval_s:
                self._checked_at = now
                self.refresh()
        return self._current

    @_snapshot.setter
    def _snapshot(self, snapshot: Snapshot) -> None:
        self._current = snapshot

    def refresh(self) -> bool:
        """Swap in the newest commit when another process made one (engine.index.core implements it)."""
        raise NotImplementedError

    @property
    def directory(self) -> Path | None:
        """The directory every write goes through to, or None for an in-memory index."""
        return self._dir.path

    @property
    def manifest(self) -> IndexManifest:
        return self._snapshot.manifest

    @manifest.setter
    def manifest(self, manifest: IndexManifest) -> None:
        """Change the default scoring or ANN search settings (the identity must stay the same)."""
        if manifest.identity() != self.manifest.identity():
            raise IndexFormatError("a manifest with another identity cannot replace this index's")
        self._manifest_override = manifest  # kept when another process's commit is followed
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
        stats["directory"] = str(self._dir.path) if self._dir.path else None
        stats["bytes_on_disk"] = self._dir.bytes_on_disk()
        stats["device"] = str(self.place.device)
        return stats

    def verify(self) -> None:
        """Read every file in full against its checksums (opening checks only structure): on disk, everything the
        newest commit names (verify_index: segments, delete files); in memory, the snapshot's segments. Raises
        IndexFormatError naming each damaged file."""
        if self._dir.path is None:
            for live in self._snapshot.segments:
                live.segment.verify()
            return
        report = verify_index(self._dir.path)
        if not report.ok:
            raise IndexFormatError(f"{self._dir.path}: {report.summary()}")

    # ---- search -------------------------------------------------------------------------------------------

    def search_images(self, t: np.ndarray, k: int, *, score: ScoreConfig | None, exact: bool = False,
                      snapshot: Snapshot | None = None, where: Any = None, negative: np.ndarray | None = None,
                      negative_weight: float = 0.5) -> list[Found]:
        """Top-k images per text query t [Q, D]; score None (or alpha = 1) is plain CLIP. `where`: a payload
        filter (engine.index.filters); `negative` [N, D]: text vectors whose best score, times `negative_weight`,
        is subtracted from every image's score."""
        snap = snapshot or self._snapshot
        scorer = ImageScorer(np.ascontiguousarray(t, np.float32), self._effective(score), where=parse_where(where),
                             negative_weight=check_negative_weight(negative_weight))
        if negative is not None:
            scorer = replace(scorer, negative=check_negative(negative, t.shape[1]))
        return self.scan(snap, scorer, k, exact)

    def search_texts(self, g: np.ndarray, c: np.ndarray | None, k: int, *, score: ScoreConfig | None,
                     exact: bool = False, snapshot: Snapshot | None = None, where: Any = None) -> list[Found]:
        """Top-k texts per query image (global g [Q, D], crops c [Q, K, D] or None)."""
        snap = snapshot or self._snapshot
        score = self._effective(score)
        if score is not None and (c is None or np.ndim(c) != 3 or len(c) != len(g) or np.shape(c)[2] != g.shape[1]):
            got = "none" if c is None else list(np.shape(c))
            raise InputError(f"LACLIP scoring of image queries needs crop embeddings [{len(g)}, K, {g.shape[1]}], "
                             f"got {got}")
        scorer = TextScorer(np.ascontiguousarray(g, np.float32),
                            np.ascontiguousarray(c, np.float32) if score is not None else None, score,
                            where=parse_where(where))
        return self.scan(snap, scorer, k, exact)

    def search_crops(self, q: np.ndarray, k: int, *, snapshot: Snapshot | None = None,
                     where: Any = None) -> list[Found]:
        """Top-k images per query image vector q [Q, D] by their best-matching crop (max_j c_j . q), exactly."""
        if not self.has_crops:
            raise InputError("against='crops' needs an index with LACLIP crops; this one stores global vectors only")
        snap = snapshot or self._snapshot
        return self.scan(snap, CropScorer(np.ascontiguousarray(q, np.float32), where=parse_where(where)), k, True)

    def scan(self, snap: Snapshot, scorer: Scorer, k: int, exact: bool) -> list[Found]:
        """Where the scoring runs: here over the mapped segments, or scattered to shards when `scatter` is set."""
        if self.scatter is not None:
            return self.scatter(snap, scorer, k, exact)
        return search(snap, scorer, k, exact=exact, ann=snap.manifest.ann, place=self.place)

    def _effective(self, score: ScoreConfig | None) -> ScoreConfig | None:
        if score is None or score.plain:
            return None
        if not self.has_crops:
            raise InputError("this index has no LACLIP crops: only plain CLIP scoring (alpha = 1) is possible")
        return score


MAX_NEGATIVE_WEIGHT = 10.0


def check_negative(negative: Any, dim: int) -> np.ndarray:
    """Negative query vectors as float32 [N >= 1, dim], finite; InputError naming what is wrong."""
    try:
        array = np.atleast_2d(np.asarray(negative, dtype=np.float32))
    except (TypeError, ValueError) as exc:
        raise InputError(f"negative: not a numeric array ({exc})") from None
    if array.ndim != 2 or array.shape[1] != dim or not len(array):
        raise InputError(f"negative: expected vectors of shape [N >= 1, {dim}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InputError("negative: NaN or infinite values")
    return np.ascontiguousarray(array)


def check_negative_weight(weight: Any) -> float:
    """negative_weight: a number in 0..MAX_NEGATIVE_WEIGHT."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= MAX_NEGATIVE_WEIGHT:
        raise InputError(f"negative_weight must be a number in 0..{MAX_NEGATIVE_WEIGHT:g}, got {weight!r}")
    return float(weight)
