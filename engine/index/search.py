"""Search over a snapshot: exact scans in bounded blocks, or ANN candidates re-scored exactly; deleted rows skipped.

One scoring path for both: a Scorer turns query vectors and a run of stored rows into exact scores (plain CLIP,
pooled image-weight LACLIP, or query-aware LACLIP through the fused kernel). The exact scan feeds it every row
in bounded blocks; the ANN stage feeds it each query's k x refine FAISS candidates (IVF fast-scan or HNSW over
the primary vectors, deleted rows filtered inside FAISS), gathered from the memory map. Per-segment top-k lists
are merged with ties going to the earlier segment, then the lower row.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from .. import scoring
from ..laclip import ScoreConfig
from .manifest import AnnConfig
from .segment import Part
from .snapshot import LiveSegment, Snapshot
from .topk import topk_rows

log = logging.getLogger(__name__)
_BLOCK_BYTES = 64 << 20
Rows = Union[slice, np.ndarray]


class Placement:
    """Where scoring runs. On CUDA, whole columns are copied to the GPU on first use while free memory allows
    (keeping `reserve` of it free); the rest is streamed block by block from the memory-mapped host copy."""

    def __init__(self, device: str = "cpu", reserve: float = 0.2) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            log.warning("device %s requested for scoring, but torch sees no CUDA GPU: scoring on the host", device)
            self.device = torch.device("cpu")
        self.reserve = reserve
        self._resident: dict[tuple[int, str], torch.Tensor | None] = {}
        self._lock = threading.Lock()

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def rows(self, part: Part, column: str, rows: Rows, source: np.ndarray | None = None) -> torch.Tensor:
        """`part.<column>[rows]` (or `source[rows]`, a derived column such as pooled vectors) as a tensor on the
        device: a view of the resident copy when there is one."""
        source = getattr(part, column) if source is None else source
        if self.device.type == "cuda":
            resident = self._resident_column(part, column, source)
            if resident is not None:
                index = rows if isinstance(rows, slice) else torch.from_numpy(rows).to(self.device)
                return resident[index]
        return self.tensor(source[rows])

    def _resident_column(self, part: Part, column: str, source: np.ndarray) -> torch.Tensor | None:
        key = (id(part), column)
        with self._lock:
            if key not in self._resident:
                free, total = torch.cuda.mem_get_info(self.device)
                fits = source.nbytes < free - self.reserve * total
                self._resident[key] = self.tensor(source) if fits else None
            return self._resident[key]

    def forget(self, parts: list[Part]) -> None:
        """Drop resident copies of parts no longer in any live snapshot."""
        with self._lock:
            for part in parts:
                for key in [key for key in self._resident if key[0] == id(part)]:
                    del self._resident[key]


def pooled_rows(part: Part, rows: Rows, place: Placement, score: ScoreConfig) -> torch.Tensor:
    """Pooled vectors of `rows` for (tau, alpha) in the storage dtype: a scan reads the segment's pooled column
    (made once, then cached); ANN candidates are pooled as gathered, so no query pays for the whole column."""
    if isinstance(rows, slice):
        key = f"pooled:{score.tau}:{score.alpha}"
        return place.rows(part, key, rows, part.pooled(score, scoring.pool))
    return place.tensor(scoring.pool(part.vectors[rows], part.crops[rows], score).astype(part.vectors.dtype))


@dataclass(frozen=True)
class ImageScorer:
    """Text queries t [Q, D] against stored images; score None = plain CLIP (global term only)."""

    t: np.ndarray
    score: ScoreConfig | None
    kind = "images"

    @property
    def candidates(self) -> np.ndarray:
        return self.t

    def select(self, queries: np.ndarray) -> "ImageScorer":
        return ImageScorer(self.t[queries], self.score)

    def scores(self, part: Part, rows: Rows, place: Placement) -> torch.Tensor:
        t = place.tensor(self.t)
        if self.score is None:
            return t @ place.rows(part, "vectors", rows).float().T
        if self.score.weights == "image":
            return t @ pooled_rows(part, rows, place, self.score).float().T
        return scoring.query_aware_tensor(t, place.rows(part, "vectors", rows), place.rows(part, "crops", rows),
                                          self.score)


@dataclass(frozen=True)
class TextScorer:
    """Query images (global g [Q, D], crops c [Q, K, D] or None) against stored texts."""

    g: np.ndarray
    c: np.ndarray | None
    score: ScoreConfig | None

    kind = "texts"

    @property
    def candidates(self) -> np.ndarray:
        if self.score is not None and self.score.weights == "image":
            return scoring.pool(self.g, self.c, self.score)
        return self.g

    def select(self, queries: np.ndarray) -> "TextScorer":
        return TextScorer(self.g[queries], self.c[queries] if self.c is not None else None, self.score)

    def scores(self, part: Part, rows: Rows, place: Placement) -> torch.Tensor:
        texts = place.rows(part, "vectors", rows)
        if self.score is None or self.score.weights == "image":
            return place.tensor(self.candidates) @ texts.float().T
        g, c = place.tensor(self.g), place.tensor(self.c)
        columns = [scoring.query_aware_tensor(texts, g[i:i + 1], c[i:i + 1], self.score)[:, 0]
                   for i in range(len(g))]
        return torch.stack(columns)


Scorer = Union[ImageScorer, TextScorer]


@dataclass(frozen=True)
class Found:
    """Top-k of one query: scores, segment positions and rows, best first."""

    scores: np.ndarray
    positions: np.ndarray
    rows: np.ndarray


def search(snapshot: Snapshot, scorer: Scorer, k: int, *, exact: bool, ann: AnnConfig,
           place: Placement) -> list[Found]:
    """Top-k live rows per query. ANN is used for segments that have a structure, unless `exact` or the index
    holds fewer than `ann.exact_below` live rows; a query whose ANN candidates hold fewer than k live rows is
    answered exactly."""
    queries = len(scorer.candidates)
    use_ann = not exact and ann.kind != "none" and snapshot.live(scorer.kind) >= ann.exact_below
    pieces: list[list[tuple[np.ndarray, int, np.ndarray]]] = [[] for _ in range(queries)]
    for position, live, part in snapshot.parts(scorer.kind):
        if use_ann and part.ann is not None:
            _ann_segment(scorer, part, live, position, k, ann, place, pieces)
        else:
            _scan_segment(scorer, part, live, position, k, place, pieces)
    found = [_merge(p, k) for p in pieces]
    short = np.array([i for i, f in enumerate(found) if len(f.rows) < k], dtype=np.int64)
    if use_ann and len(short):
        for i, again in zip(short, search(snapshot, scorer.select(short), k, exact=True, ann=ann, place=place)):
            found[int(i)] = again
    return found


def _scan_segment(scorer: Scorer, part: Part, live: LiveSegment, position: int, k: int, place: Placement,
                  pieces: list[list]) -> None:
    row_bytes = part.vectors[0].nbytes + (part.crops[0].nbytes if part.crops is not None else 0)
    step = max(1024, _BLOCK_BYTES // max(1, row_bytes))
    for start in range(0, part.rows, step):
        stop = min(part.rows, start + step)
        scores = scorer.scores(part, slice(start, stop), place).float().cpu().numpy()
        rows = np.arange(start, stop)
        for q in range(len(scores)):
            _collect(pieces[q], scores[q], rows, live, scorer.kind, position, k)


def _ann_segment(scorer: Scorer, part: Part, live: LiveSegment, position: int, k: int, ann: AnnConfig,
                 place: Placement, pieces: list[list]) -> None:
    """Each query's k x refine live candidates from the segment's FAISS structure, re-scored exactly."""
    candidates = part.ann.search(scorer.candidates, k * ann.refine, ann, live.live_bits.get(scorer.kind))
    for q, rows in enumerate(candidates):
        rows = np.sort(rows[rows >= 0])
        if len(rows):
            scores = scorer.select(np.array([q])).scores(part, rows, place).float().cpu().numpy()[0]
            _collect(pieces[q], scores, rows, live, scorer.kind, position, k)


def _collect(into: list, scores: np.ndarray, rows: np.ndarray, live: LiveSegment, kind: str, position: int,
             k: int) -> None:
    """Keep the top-k live rows of one query's scores over `rows` of one segment."""
    mask = live.masks.get(kind)
    if mask is not None:
        keep = ~mask[rows]
        scores, rows = scores[keep], rows[keep]
    if not len(rows):
        return
    values, order = topk_rows(scores[None], min(k, len(rows)))
    into.append((values[0], position, rows[order[0]]))


def _merge(pieces: list[tuple[np.ndarray, int, np.ndarray]], k: int) -> Found:
    if not pieces:
        return Found(np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    scores = np.concatenate([p[0] for p in pieces])
    positions = np.concatenate([np.full(len(p[0]), p[1], np.int64) for p in pieces])
    rows = np.concatenate([p[2] for p in pieces]).astype(np.int64)
    order = np.lexsort((rows, positions, -scores))[:k]
    return Found(scores[order], positions[order], rows[order])

