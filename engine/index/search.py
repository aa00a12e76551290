"""Search over a snapshot: exact scans in bounded blocks, or ANN candidates re-scored exactly; deleted rows skipped,
and rows a payload filter rejects (engine.index.filters) skipped the same way.

One scoring path for both: a Scorer turns query vectors and a run of stored rows into exact scores through the one
dispatch in engine.scoring (plain CLIP, pooled image-weight LACLIP, or query-aware LACLIP through the fused
kernel). The exact scan feeds it every row in bounded blocks, except where the kernel's own top-k answers a whole
segment (query-aware weights on the host; every mode on a GPU once rows are resident); the ANN stage feeds it
each query's k x refine FAISS
candidates (IVF fast-scan or HNSW over the primary vectors, deleted rows filtered inside FAISS), gathered from the
memory map. Per-segment top-k lists are merged with ties going to the earlier segment, then the lower row.

On a GPU, scoring stays on the device: columns become resident in the background (engine.index.residency), a
segment whose rows are resident is scored by the kernel's own top-k (laclip_topk) in one call, other blocks are
reduced to their top-k on the device, and only k results per query are copied to the host.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, replace
from typing import Union

import numpy as np
import torch

from .. import scoring
from .. import ops
from ..laclip import ScoreConfig, pooled_vectors
from .filters import Filter, restrict
from .manifest import AnnConfig
from .residency import Residency, ResidencyConfig
from .segment import Part
from .snapshot import LiveSegment, Snapshot
from .topk import topk_rows

log = logging.getLogger(__name__)
_BLOCK_BYTES = 64 << 20
RowSelection = Union[slice, np.ndarray]


class Placement:
    """Where scoring runs. On CUDA, whole columns become resident in the background (engine.index.residency)
    while the device has room; until then, and for columns that do not fit, rows are streamed block by block
    from the memory-mapped host copy."""

    def __init__(self, device: str = "cpu", residency: ResidencyConfig | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            log.warning("device %s requested for scoring, but torch sees no CUDA GPU: scoring on the host", device)
            self.device = torch.device("cpu")
        if residency is None and self.device.type == "cuda":
            residency = ResidencyConfig()
        self.resident = Residency(self.device, residency) if residency is not None else None

    @property
    def on_device(self) -> bool:
        """Whether scoring runs on a GPU (results reduced there, k per query copied back)."""
        return self.device.type == "cuda"

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device, non_blocking=True)

    def column(self, part: Part, column: str) -> torch.Tensor | None:
        """The resident copy of `part.<column>`, starting its upload when there is none yet."""
        if self.resident is None or getattr(part, column) is None:
            return None
        return self.resident.request(part, column, lambda: getattr(part, column))

    def rows(self, part: Part, column: str, rows: RowSelection) -> torch.Tensor:
        """`part.<column>[rows]` as a tensor on the device: a view of the resident copy when there is one."""
        resident = self.column(part, column)
        if resident is not None:
            return resident[rows if isinstance(rows, slice) else torch.from_numpy(rows).to(self.device)]
        return self.tensor(getattr(part, column)[rows])

    def pooled(self, part: Part, score: ScoreConfig, rows: RowSelection) -> torch.Tensor:
        """Pooled vectors of `rows` for (tau, alpha) in the storage dtype. With resident rows they are pooled on the
        device once per setting (kept LRU), streamed rows on the device as they arrive; a host scan reads the
        segment's cached pooled column; ANN candidates on the host are pooled as gathered, so no query pays for
        the whole column."""
        resident = self.resident_pooled(part, score)
        if resident is not None:
            return resident[rows if isinstance(rows, slice) else torch.from_numpy(rows).to(self.device)]
        if self.on_device:  # streamed rows are pooled where they land, never the whole column on the host
            return _pool_rows(self.rows(part, "vectors", rows), self.rows(part, "crops", rows), score)
        if isinstance(rows, slice):
            return self.tensor(part.pooled(score, scoring.pool)[rows])
        return self.tensor(scoring.pool(part.vectors[rows], part.crops[rows], score).astype(part.vectors.dtype))

    def resident_pooled(self, part: Part, score: ScoreConfig) -> torch.Tensor | None:
        """The pooled column on the device, made there from the resident vectors and crops (None until both are)."""
        if self.resident is None:
            return None
        key = f"derived:pooled:{float(score.tau)!r}:{float(score.alpha)!r}"
        found = self.resident.get(part, key)
        if found is not None:
            return found
        g, c = self.column(part, "vectors"), self.column(part, "crops")
        if g is None or c is None:
            return None
        step = 1 << 16
        out = torch.empty_like(g)
        for start in range(0, len(g), step):
            out[start:start + step] = _pool_rows(g[start:start + step], c[start:start + step], score)
        self.resident.put(part, key, out, derived=True)
        return out

    def deleted(self, live: LiveSegment, kind: str) -> torch.Tensor | None:
        """The deleted-rows mask of `live` on the device (None when nothing is deleted); one small copy per scan
        of a segment whose rows are not resident (a resident segment's scan needs no mask)."""
        mask = live.masks.get(kind)
        return None if mask is None else self.tensor(mask)

    def forget(self, parts: list[Part]) -> None:
        """Drop resident copies of parts no longer in any live snapshot."""
        if self.resident is not None:
            self.resident.forget(list(parts))


def _pool_rows(g: torch.Tensor, c: torch.Tensor, score: ScoreConfig) -> torch.Tensor:
    """Pooled vectors of rows already on their device, computed in fp32 and stored in the rows' dtype."""
    return pooled_vectors(g.float(), c.float(), alpha=score.alpha, tau=score.tau).to(g.dtype)


@dataclass(frozen=True)
class ImageScorer:
    """Text queries t [Q, D] against stored images; score None = plain CLIP (global term only). `t_dev` is the
    queries' device copy, made once per search by `bind`. `negative` [N, D] (text vectors) turns every score into
    s(t, image) - negative_weight * max_n s(negative_n, image), the same scoring for both; ANN candidates come
    from t alone. `where`: only rows whose payload matches are scored."""

    t: np.ndarray
    score: ScoreConfig | None
    t_dev: torch.Tensor | None = None
    where: Filter | None = None
    negative: np.ndarray | None = None
    negative_weight: float = 0.5
    negative_dev: torch.Tensor | None = None
    kind = "images"
    ann_ok = True

    @property
    def candidates(self) -> np.ndarray:
        return self.t

    def bind(self, place: Placement) -> "ImageScorer":
        negative = None if self.negative is None else place.tensor(self.negative)
        return replace(self, t_dev=place.tensor(self.t), negative_dev=negative)

    def select(self, queries: np.ndarray) -> "ImageScorer":
        return replace(self, t=self.t[queries], t_dev=None if self.t_dev is None else self.t_dev[queries])

    def scores(self, part: Part, rows: RowSelection, place: Placement) -> torch.Tensor:
        t = self.t_dev if self.t_dev is not None else place.tensor(self.t)
        out = self.positive_scores(t, part, rows, place)
        if self.negative is None:
            return out
        negative = self.negative_dev if self.negative_dev is not None else place.tensor(self.negative)
        worst = self.positive_scores(negative, part, rows, place).max(dim=0, keepdim=True).values
        return out - self.negative_weight * worst

    def positive_scores(self, t: torch.Tensor, part: Part, rows: RowSelection, place: Placement) -> torch.Tensor:
        """[Q, n] scores of query vectors t against `rows` under this scorer's settings (no negatives)."""
        if scoring.is_plain(self.score):
            return scoring.image_scores(t, place.rows(part, "vectors", rows), None, None)
        if self.score.weights == "image":
            return scoring.image_scores(t, None, None, self.score, pooled=place.pooled(part, self.score, rows))
        return scoring.image_scores(t, place.rows(part, "vectors", rows), place.rows(part, "crops", rows),
                                    self.score)

    def fused_topk(self, part: Part, k: int, place: Placement) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(values, rows) [Q, k] of the whole part by the kernel's own top-k, or None where blocks are scored
        instead (always with negatives). On a GPU: every mode, once the rows are resident. On the host:
        query-aware weights, straight from the memory map (faster than scores plus a top-k per block:
        bench_laclip_kernel times both); plain and pooled rows stay one GEMM per block there."""
        if self.negative is not None:
            return None
        if not place.on_device:
            if (scoring.is_plain(self.score) or self.score.weights == "image" or part.crops is None
                    or not ops.extension_available()):
                return None
            g, c = host_tensor(part.vectors), host_tensor(part.crops)
            return ops.laclip_topk(self.t_dev.to(g.dtype), g, c, k=k, alpha=self.score.alpha, tau=self.score.tau,
                                   weights="text")
        if not ops.cuda_available():
            return None
        g = place.column(part, "vectors")
        if g is None:
            return None
        if scoring.is_plain(self.score) or self.score.weights == "image":
            rows = g if scoring.is_plain(self.score) else place.resident_pooled(part, self.score)
            if rows is None:
                return None
            # alpha = 1: the global term only; the crop argument is a view the kernel never reads
            return ops.laclip_topk(self.t_dev.to(rows.dtype), rows, rows[:, None], k=k, alpha=1.0, tau=1.0,
                                   weights="text")
        c = place.column(part, "crops")
        if c is None:
            return None
        return ops.laclip_topk(self.t_dev.to(g.dtype), g, c, k=k, alpha=self.score.alpha, tau=self.score.tau,
                               weights="text")


@dataclass(frozen=True)
class TextScorer:
    """Query images (global g [Q, D], crops c [Q, K, D] or None) against stored texts."""

    g: np.ndarray
    c: np.ndarray | None
    score: ScoreConfig | None
    g_dev: torch.Tensor | None = None
    c_dev: torch.Tensor | None = None
    where: Filter | None = None
    kind = "texts"
    ann_ok = True

    @property
    def candidates(self) -> np.ndarray:
        if not scoring.is_plain(self.score) and self.score.weights == "image":
            return scoring.pool(self.g, self.c, self.score)
        return self.g

    def bind(self, place: Placement) -> "TextScorer":
        return replace(self, g_dev=place.tensor(self.g), c_dev=None if self.c is None else place.tensor(self.c))

    def select(self, queries: np.ndarray) -> "TextScorer":
        def pick(x: np.ndarray | torch.Tensor | None) -> np.ndarray | torch.Tensor | None:
            return None if x is None else x[queries]
        return replace(self, g=self.g[queries], c=pick(self.c), g_dev=pick(self.g_dev), c_dev=pick(self.c_dev))

    def scores(self, part: Part, rows: RowSelection, place: Placement) -> torch.Tensor:
        g = self.g_dev if self.g_dev is not None else place.tensor(self.g)
        c = self.c_dev if self.c_dev is not None or self.c is None else place.tensor(self.c)
        return scoring.text_scores(g, c, place.rows(part, "vectors", rows), self.score)

    def fused_topk(self, part: Part, k: int, place: Placement) -> None:
        return None  # the texts are the kernel's queries here, so its per-query top-k runs the other way


@dataclass(frozen=True)
class CropScorer:
    """Query image vectors q [Q, D] against each stored image's best crop: max_j (c_j . q), so a fragment finds
    the whole images that contain it. Always exact (the ANN structures index the global vectors)."""

    q: np.ndarray
    q_dev: torch.Tensor | None = None
    where: Filter | None = None
    kind = "images"
    ann_ok = False

    @property
    def candidates(self) -> np.ndarray:
        return self.q

    def bind(self, place: Placement) -> "CropScorer":
        return replace(self, q_dev=place.tensor(self.q))

    def select(self, queries: np.ndarray) -> "CropScorer":
        return replace(self, q=self.q[queries], q_dev=None if self.q_dev is None else self.q_dev[queries])

    def scores(self, part: Part, rows: RowSelection, place: Placement) -> torch.Tensor:
        q = self.q_dev if self.q_dev is not None else place.tensor(self.q)
        return scoring.best_crop_scores(q, place.rows(part, "crops", rows))

    def fused_topk(self, part: Part, k: int, place: Placement) -> None:
        return None


Scorer = Union[ImageScorer, TextScorer, CropScorer]


@dataclass(frozen=True)
class Found:
    """Top-k of one query: scores, segment positions and rows, best first."""

    scores: np.ndarray
    positions: np.ndarray
    rows: np.ndarray


def search(snapshot: Snapshot, scorer: Scorer, k: int, *, exact: bool, ann: AnnConfig,
           place: Placement, fallback_exact: bool = True) -> list[Found]:
    """Top-k live rows per query (only rows matching `scorer.where`, when it is set). ANN is used for segments
    that have a structure, unless `exact`, the scorer needs every row, or the index holds fewer than
    `ann.exact_below` live rows; a segment where few rows match the filter scores just those rows; a query whose
    ANN candidates hold fewer than k live rows is answered exactly (unless not `fallback_exact`: a shard leaves
    that choice to the merge of all shards)."""
    queries = len(scorer.candidates)
    scorer = scorer.bind(place)
    use_ann = not exact and scorer.ann_ok and ann.kind != "none" and snapshot.live(scorer.kind) >= ann.exact_below
    pieces: list[list[tuple[np.ndarray, int, np.ndarray]]] = [[] for _ in range(queries)]
    candidates: list[tuple[int, LiveSegment, torch.Tensor, torch.Tensor]] = []
    for position, live, part in snapshot.parts(scorer.kind):
        with_ann = use_ann and part.ann is not None
        if scorer.where is not None:
            live, allowed = restrict(live, part, scorer.kind, scorer.where)
            if len(allowed) <= few_rows(part, k, ann, with_ann):
                _rows_segment(scorer, part, live, position, allowed, k, place, pieces)
                continue
        if with_ann:
            _ann_segment(scorer, part, live, position, k, ann, place, pieces)
            continue
        deleted = len(live.deleted.get(scorer.kind, ()))
        fused = scorer.fused_topk(part, min(part.rows, k + deleted), place) if scorer.where is None else None
        if fused is not None:  # k + deleted candidates: the deleted ones are dropped in _collect
            candidates.append((position, live, *fused))
        elif place.on_device:
            candidates.append((position, live, *_device_blocks(scorer, part, live, k, place)))
        else:
            _scan_segment(scorer, part, live, position, k, place, pieces)
    if candidates:  # one copy to the host for every segment's candidates (none when they are host tensors)
        widths = [values.shape[1] for _, _, values, _ in candidates]
        values = torch.cat([v for _, _, v, _ in candidates], dim=1).cpu().numpy()
        rows = torch.cat([r for _, _, _, r in candidates], dim=1).cpu().numpy()
        start = 0
        for (position, live, _, _), width in zip(candidates, widths):
            for q in range(queries):
                _collect(pieces[q], values[q, start:start + width], rows[q, start:start + width], live,
                         scorer.kind, position, k)
            start += width
    found = [_merge(p, k) for p in pieces]
    short = np.array([i for i, f in enumerate(found) if len(f.rows) < k], dtype=np.int64)
    if use_ann and fallback_exact and len(short):
        for i, again in zip(short, search(snapshot, scorer.select(short), k, exact=True, ann=ann, place=place)):
            found[int(i)] = again
    return found


def few_rows(part: Part, k: int, ann: AnnConfig, with_ann: bool) -> int:
    """Up to how many rows matching a filter a segment scores directly (gathered) instead of by its ANN
    structure (k x refine, or 2% of its rows) or by a masked scan of every row (a quarter of them)."""
    return max(k * ann.refine, part.rows // 50) if with_ann else part.rows // 4


def _rows_segment(scorer: Scorer, part: Part, live: LiveSegment, position: int, rows: np.ndarray, k: int,
                  place: Placement, pieces: list[list]) -> None:
    """Exact scores of the given (sorted, live) rows only, gathered block by block."""
    step = _block_rows(part)
    for start in range(0, len(rows), step):
        chosen = rows[start:start + step]
        scores = scorer.scores(part, chosen, place).float().cpu().numpy()
        for q in range(len(scores)):
            _collect(pieces[q], scores[q], chosen, live, scorer.kind, position, k)


def _scan_segment(scorer: Scorer, part: Part, live: LiveSegment, position: int, k: int, place: Placement,
                  pieces: list[list]) -> None:
    for start, stop in _blocks(part):
        scores = scorer.scores(part, slice(start, stop), place).float().cpu().numpy()
        rows = np.arange(start, stop)
        for q in range(len(scores)):
            _collect(pieces[q], scores[q], rows, live, scorer.kind, position, k)


def _blocks(part: Part) -> list[tuple[int, int]]:
    """Row ranges of about _BLOCK_BYTES of stored vectors and crops each."""
    step = _block_rows(part)
    return [(start, min(part.rows, start + step)) for start in range(0, part.rows, step)]


def _block_rows(part: Part) -> int:
    row_bytes = part.vectors[0].nbytes + (part.crops[0].nbytes if part.crops is not None else 0)
    return max(1024, _BLOCK_BYTES // max(1, row_bytes))


def _device_blocks(scorer: Scorer, part: Part, live: LiveSegment, k: int,
                   place: Placement) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, rows) [Q, <= k] of a segment whose rows are not resident on the GPU: each streamed block's top-k
    on the device with deleted rows masked, merged there."""
    mask = place.deleted(live, scorer.kind)
    best: tuple[torch.Tensor, torch.Tensor] | None = None
    for start, stop in _blocks(part):
        scores = scorer.scores(part, slice(start, stop), place).float()
        if mask is not None:
            scores = scores.masked_fill(mask[start:stop], float("-inf"))
        block = device_topk(scores, min(k, stop - start), offset=start)
        best = block if best is None else device_topk_merge(best, block, k)
    return best


def host_tensor(rows: np.ndarray) -> torch.Tensor:
    """A tensor over memory-mapped rows without a copy (they are only read: torch's not-writable warning is moot)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def sort_keys(scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by score, then by the lower row (rows < 2**32), so one top-k on keys is exact with the
    engine's tie rule (the kernel's topk_key, restated in torch)."""
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0 folds -0.0 into +0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered << 32) | (0xFFFFFFFF - rows)


def keys_to_results(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores float32, rows int64) of keys made by sort_keys."""
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def device_topk(scores: torch.Tensor, k: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of [Q, n] scores on their device, best first, ties to the lower row; rows numbered
    from `offset`."""
    rows = torch.arange(offset, offset + scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    keys = torch.topk(sort_keys(scores, rows), k, dim=1).values
    return keys_to_results(keys)


def device_topk_merge(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                      k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k of two candidate lists (values, rows) [Q, *], on the device."""
    keys = torch.cat([sort_keys(*a), sort_keys(*b)], dim=1)
    return keys_to_results(torch.topk(keys, min(k, keys.shape[1]), dim=1).values)


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
    return best_of(scores, positions, rows, k)


def best_of(scores: np.ndarray, positions: np.ndarray, rows: np.ndarray, k: int) -> Found:
    """The k best candidates, in the index's one order: score descending, ties by segment position then row."""
    order = np.lexsort((rows, positions, -scores))[:k]
    return Found(scores[order], positions[order], rows[order])

