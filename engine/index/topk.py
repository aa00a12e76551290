"""Exact top-k of score rows with the documented tie-break (the lower index first)."""
from __future__ import annotations

import numpy as np

from ..errors import InputError


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of [Q, N] scores, best first, ties broken by the lower index."""
    q, n = scores.shape
    if not 1 <= k <= n:
        raise InputError(f"k must be in 1..{n} (the number of indexed items), got {k}")
    if k == n:
        order = np.argsort(-scores, axis=1, kind="stable")
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
        order = np.empty((q, k), dtype=np.int64)
        for row in range(q):  # candidates: everything >= the k-th value, then a stable sort by score
            candidates = np.flatnonzero(scores[row] >= kth[row])
            ranked = candidates[np.argsort(-scores[row, candidates], kind="stable")]
            order[row] = ranked[:k]
    order = order[:, :k]
    return np.take_along_axis(scores, order, 1), order
