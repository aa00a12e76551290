"""ANN candidate structures per segment, built with FAISS when a segment is written and stored inside it.

Both kinds index a segment's primary vectors (image globals, text embeddings) with FAISS labels equal to row
numbers, and return `n` candidate rows per query, deleted rows excluded by a bitmap selector; the search then
re-scores the candidates exactly. IVF: spherical k-means lists plus 4-bit product-quantised codes scanned with
FAISS's fast-scan kernels (`IndexIVFPQFastScan`; one code per `pq_dims` dimensions: 128 bytes a row at D=512
by default, an eighth of the fp16 row), so a probe costs a fraction of reading the rows. HNSW: a FAISS `IndexHNSWFlat` graph (inner product). FAISS is imported
lazily; without it segments get no ANN structure and every search is exact (logged once).
"""
from __future__ import annotations

import logging
import threading
from functools import lru_cache
from typing import Any

import numpy as np

from .manifest import AnnConfig
from .storage import Rows

log = logging.getLogger(__name__)
_TRAIN_POINTS_PER_LIST = 40  # faiss asks for at least 39 per centroid
_MIN_PQ_TRAIN = 4096  # the 4-bit codebooks (16 centroids per sub-quantiser) want a few thousand residuals
_KMEANS_ITERATIONS = 12
_SEED = 1234
_PQ_BITS = 4  # fast-scan codes
# FAISS fast-scan search variant 14 spreads one query's probed lists over the threads: measured at 1M rows, Q=1
# latency fell from 1.26 to 0.87 ms, while batches of 64 cost 10% more per query (0.66 -> 0.73 ms)
_FASTSCAN_IMPLEM = 14
# A single query searches on one thread: on a busy machine an OpenMP team waits for its slowest member's time
# slice (measured on a loaded 2-core EPYC: IVF at 8 ms whatever nprobe with 2 threads, 0.2 ms with one), and one
# query's work is too small to share. Batches keep FAISS's thread count.
_SINGLE_QUERY_THREADS = 1


@lru_cache(maxsize=1)
def _batch_threads() -> int:
    """FAISS's OpenMP thread count for batches: what it had when first used."""
    return int(faiss_module().omp_get_max_threads())


def search_threads(queries: int) -> int:
    """Threads FAISS uses for a search of `queries` rows."""
    batch = _batch_threads()  # read before the first single query lowers the count
    return _SINGLE_QUERY_THREADS if queries <= 1 else batch


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


def pq_subquantizers(d: int, dims_per_code: int) -> int:
    """Sub-quantisers for D dimensions: the largest divisor of D not above D / dims_per_code."""
    return next(m for m in range(max(1, d // dims_per_code), 0, -1) if d % m == 0)


def _float_chunks(vectors: Rows) -> list[np.ndarray]:
    return [np.ascontiguousarray(chunk, np.float32) for chunk in Rows(vectors.pieces, np.dtype(np.float32),
                                                                           vectors.order).chunks()]


def build_ivf(vectors: Rows, config: AnnConfig) -> np.ndarray | None:
    """A serialised FAISS IVF fast-scan index over the rows (labels = row numbers); None without faiss.

    The coarse lists are spherical k-means on a seeded sample (about sqrt(rows) lists); the same sample trains
    the product quantiser on the residuals."""
    faiss = faiss_module()
    if faiss is None:
        return None
    n, d = vectors.shape
    nlist = config.lists_for(n)
    rng = np.random.default_rng(_SEED)
    sample_size = min(n, max(nlist * _TRAIN_POINTS_PER_LIST, _MIN_PQ_TRAIN))
    sample = np.ascontiguousarray(vectors.take(np.sort(rng.choice(n, sample_size, replace=False))), np.float32)
    kmeans = faiss.Kmeans(d, nlist, niter=_KMEANS_ITERATIONS, spherical=True, seed=_SEED, verbose=False)
    kmeans.train(sample)
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(kmeans.centroids)
    codes = pq_subquantizers(d, config.pq_dims)
    index = faiss.IndexIVFPQFastScan(quantizer, d, nlist, codes, _PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.seed = _SEED
    index.train(sample)  # the quantizer already holds nlist centroids: only the codebooks are trained
    for chunk in _float_chunks(vectors):
        index.add(chunk)
    return faiss.serialize_index(index)


def build_hnsw(vectors: Rows, config: AnnConfig) -> np.ndarray | None:
    """A serialised FAISS HNSW graph over the rows (inner product); None without faiss."""
    faiss = faiss_module()
    if faiss is None:
        return None
    index = faiss.IndexHNSWFlat(vectors.shape[1], config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = config.ef_construction
    for chunk in _float_chunks(vectors):
        index.add(chunk)
    return faiss.serialize_index(index)


class Candidates:
    """A segment's serialised FAISS structure ("ivf" or "hnsw"), deserialised on first use (then held in memory:
    about 32 bytes a row for IVF), answering candidate rows for a batch of queries."""

    def __init__(self, kind: str, data: np.ndarray) -> None:
        self.kind = kind
        self._data = data
        self._index: Any = None
        self._lock = threading.Lock()

    def _loaded(self) -> Any:
        with self._lock:
            if self._index is None:
                index = faiss_module().deserialize_index(np.ascontiguousarray(self._data))
                if self.kind == "ivf":
                    index.implem = _FASTSCAN_IMPLEM
                self._index = index
            return self._index

    def search(self, queries: np.ndarray, n: int, config: AnnConfig, live_bits: np.ndarray | None) -> np.ndarray:
        """[Q, n] row numbers nearest to each query [Q, D] by inner product, best first, -1 where fewer exist;
        rows whose bit is 0 in `live_bits` (the packed little-endian live mask) are never returned."""
        faiss = faiss_module()
        index = self._loaded()
        selector = faiss.IDSelectorBitmap(index.ntotal, faiss.swig_ptr(live_bits)) if live_bits is not None else None
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=config.probes_for(index.nlist), sel=selector)
        else:
            params = faiss.SearchParametersHNSW(efSearch=max(config.ef_search, n), sel=selector)
        # set on every call (not restored afterwards), so concurrent searches never leave another's count behind
        faiss.omp_set_num_threads(search_threads(len(queries)))
        _, rows = index.search(np.ascontiguousarray(queries, np.float32), min(n, index.ntotal), params=params)
        return rows
