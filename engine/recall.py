"""Recall@K in both directions and MR, as cn_clip's evaluation scripts define them.

A query is a hit at K when any of its ground-truth items is among its top K. Ranking is by descending score,
ties broken by the lower gallery index (the same order as `engine.index.topk_rows`), so results are
deterministic. MR is the mean of the six recalls (text->image and image->text at 1, 5, 10).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError

KS = (1, 5, 10)
Metrics = dict  # {"text_to_image": {"R@1": ..}, "image_to_text": {..}, "MR": ..}, recalls in percent


def best_ranks(scores: np.ndarray, relevant: Sequence[Sequence[int]]) -> np.ndarray:
    """0-based rank of each query's best-placed relevant item in its row of `scores` [Q, N].

    Items ahead of item g: those scoring higher, and those tied with g at a lower index.
    """
    if scores.ndim != 2 or scores.shape[0] != len(relevant):
        raise InputError(f"scores must be [Q, N] with Q = {len(relevant)} queries, got shape {scores.shape}")
    positions = np.arange(scores.shape[1])
    ranks = np.empty(len(relevant), dtype=np.int64)
    for q, items in enumerate(relevant):
        items = np.asarray(items, dtype=np.int64)
        if items.size == 0 or items.min() < 0 or items.max() >= scores.shape[1]:
            raise InputError(f"query {q}: relevant items must be a non-empty subset of 0..{scores.shape[1] - 1}, "
                             f"got {items.tolist()}")
        row = scores[q]
        target = row[items][:, None]  # [G, 1]
        ahead = (row[None, :] > target) | ((row[None, :] == target) & (positions[None, :] < items[:, None]))
        ranks[q] = ahead.sum(axis=1).min()
    return ranks


def recalls(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """{"R@k": percent of queries whose best relevant item ranks within the top k}."""
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in ks}


def retrieval_metrics(scores: np.ndarray, text_to_images: Sequence[Sequence[int]]) -> Metrics:
    """Both directions from one [T, I] text-image score matrix and each text's ground-truth image indices.

    Image->text queries are the images that at least one text describes (as in cn_clip), ranked over all texts.
    """
    t2i = recalls(best_ranks(scores, text_to_images))
    image_texts: dict[int, list[int]] = {}
    for t, images in enumerate(text_to_images):
        for i in images:
            image_texts.setdefault(int(i), []).append(t)
    queries = sorted(image_texts)
    i2t_scores = np.ascontiguousarray(scores[:, queries].T)
    i2t = recalls(best_ranks(i2t_scores, [image_texts[i] for i in queries]))
    mean = float(np.mean(list(t2i.values()) + list(i2t.values())))
    return {"text_to_image": t2i, "image_to_text": i2t, "MR": mean}
