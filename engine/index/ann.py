"""ANN candidate structures per segment, built with FAISS when a segment is written and stored inside it.

IVF: k-means centroids over a segment's primary vectors (image globals, text embeddings); the segment's rows
are stored list by list, so probing a list reads one contiguous slice, and the probed rows are then scored
exactly (the candidates *are* the re-scored rows). HNSW: a FAISS graph (inner product) whose k x refine
candidates are re-scored exactly. FAISS is imported lazily; without it segments get no ANN structure and
every search is exact (logged once).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .manifest import AnnConfig
from .storage import Rows

log = logging.getLogger(__name__)
_TRAIN_POINTS_PER_LIST = 40  # faiss asks for at least 39 per centroid
_KMEANS_ITERATIONS = 12
_SEED = 1234


@lru_cache(maxsize=1)
def faiss_module() -> Any:
    """The faiss module, or None (logged once) when it is not installed."""
    try:
        import faiss
    except ImportError:
        log.warning("faiss is not installed: no ANN structures are built and every search is exact "
                    "(pip install faiss-cpu)")
        return None
    return faiss


@dataclass(frozen=True)
class IvfLayout:
    """Row order (list by list), centroids [nlist, D] and list boundaries [nlist + 1] in that order."""

    order: np.ndarray
    centroids: np.ndarray
    offsets: np.ndarray


def build_ivf(vectors: Rows, config: AnnConfig) -> IvfLayout | None:
    """Train k-means on a sample, assign every row to its nearest centroid (inner product); None without faiss."""
    faiss = faiss_module()
    if faiss is None:
        return None
    n, d = vectors.shape
    nlist = config.lists_for(n)
    rng = np.random.default_rng(_SEED)
    sample_size = min(n, nlist * _TRAIN_POINTS_PER_LIST)
    sample = np.ascontiguousarray(vectors.take(np.sort(rng.choice(n, sample_size, replace=False))), np.float32)
    kmeans = faiss.Kmeans(d, nlist, niter=_KMEANS_ITERATIONS, spherical=True, seed=_SEED, verbose=False)
    kmeans.train(sample)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)
    assign = np.concatenate([quantizer.search(np.ascontiguousarray(chunk, np.float32), 1)[1][:, 0]
                             for chunk in Rows(vectors.pieces, np.dtype(np.float32)).chunks()])
    order = np.argsort(assign, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=nlist))]).astype(np.int64)
    return IvfLayout(order, np.ascontiguousarray(kmeans.centroids, np.float32), offsets)


def build_hnsw(vectors: Rows, config: AnnConfig) -> np.ndarray | None:
    """A serialised FAISS HNSW graph over the rows (inner product); None without faiss."""
    faiss = faiss_module()
    if faiss is None:
        return None
    index = faiss.IndexHNSWFlat(vectors.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    for chunk in Rows(vectors.pieces, np.dtype(np.float32), vectors.order).chunks():
        index.add(np.ascontiguousarray(chunk, np.float32))
    return faiss.serialize_index(index)


class IvfProbe:
    """Which rows of a segment the `nprobe` lists nearest to a query hold."""

    def __init__(self, centroids: np.ndarray, offsets: np.ndarray) -> None:
        self.centroids = np.asarray(centroids, np.float32)
        self.offsets = np.asarray(offsets)

    def ranges(self, query: np.ndarray, nprobe: int) -> list[tuple[int, int]]:
        """(start, stop) row ranges of the probed lists, in row order (each list is a contiguous slice)."""
        sims = self.centroids @ query
        nprobe = min(nprobe, len(sims))
        lists = np.sort(np.argpartition(-sims, nprobe - 1)[:nprobe])
        return [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in lists if self.offsets[i + 1] > self.offsets[i]]


class HnswGraph:
    """A FAISS HNSW graph, deserialised on first use (then held in memory)."""

    def __init__(self, data: np.ndarray) -> None:
        self._data = data
        self._index: Any = None
        self._lock = threading.Lock()

    def candidates(self, query: np.ndarray, n: int, ef_search: int) -> np.ndarray:
        """Up to n row numbers nearest to `query` [D] by inner product."""
        with self._lock:
            if self._index is None:
                self._index = faiss_module().deserialize_index(np.ascontiguousarray(self._data))
        params = faiss_module().SearchParametersHNSW()
        params.efSearch = max(ef_search, n)
        n = min(n, self._index.ntotal)
        _, rows = self._index.search(np.ascontiguousarray(query[None], np.float32), n, params=params)
        return rows[0][rows[0] >= 0]
