"""Score queries against stored embeddings: plain cosine, pooled LACLIP (one GEMM), or query-aware LACLIP.

Query-aware weights do not collapse to a pooled vector, so they go to the fused native kernel
(engine.ops) when it is built, and to the chunked PyTorch reference otherwise.
"""
from __future__ import annotations

import numpy as np
import torch

from . import ops
from .index import topk_rows
from .laclip import LaclipConfig, laclip_scores_reference, pooled_vectors

_REFERENCE_CHUNK_ELEMENTS = 1 << 24  # bound the reference's [Q, n, K] intermediate when the kernel is absent


def pool(g: np.ndarray, c: np.ndarray, config: LaclipConfig) -> np.ndarray:
    """[N, D] pooled vectors for image-conditioned weights."""
    p = pooled_vectors(torch.from_numpy(g), torch.from_numpy(c), alpha=config.alpha, tau=config.tau)
    return p.numpy().astype(np.float32, copy=False)


def query_aware_scores(t: np.ndarray, g: np.ndarray, c: np.ndarray, config: LaclipConfig) -> np.ndarray:
    """[Q, N] scores with text-conditioned weights: the native kernel, or the reference in bounded chunks."""
    tt, gg, cc = (torch.from_numpy(np.ascontiguousarray(x)) for x in (t, g, c))
    if ops.extension_available():
        return ops.laclip_scores(tt, gg, cc, alpha=config.alpha, tau=config.tau, weights="text").numpy()
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, len(t) * c.shape[1]))
    parts = [
        laclip_scores_reference(tt, gg[i:i + chunk], cc[i:i + chunk], alpha=config.alpha, tau=config.tau,
                                weights="text")
        for i in range(0, len(g), chunk)
    ]
    return torch.cat(parts, dim=1).numpy()


def score_images(t: np.ndarray, g: np.ndarray, c: np.ndarray | None, p: np.ndarray | None,
                 config: LaclipConfig | None) -> np.ndarray:
    """[Q, N] scores of Q text queries against N images under `config` (None = global CLIP)."""
    if config is None:
        return t @ g.T
    if config.weights == "image":
        return t @ (p if p is not None else pool(g, c, config)).T
    return query_aware_scores(t, g, c, config)


def topk_images(t: np.ndarray, g: np.ndarray, c: np.ndarray | None, p: np.ndarray | None,
                config: LaclipConfig | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k images per text query; query-aware LACLIP uses the fused top-k kernel (no [Q, N] matrix)."""
    if config is not None and config.weights == "text" and ops.extension_available():
        values, indices = ops.laclip_topk(torch.from_numpy(t), torch.from_numpy(g), torch.from_numpy(c), k=k,
                                          alpha=config.alpha, tau=config.tau, weights="text")
        return values.numpy(), indices.numpy()
    return topk_rows(score_images(t, g, c, p, config), k)


def score_texts(t: np.ndarray, g: np.ndarray, c: np.ndarray | None, config: LaclipConfig | None) -> np.ndarray:
    """[Q, M] scores of Q query images (g [Q, D], c [Q, K, D]) against M stored texts t [M, D]."""
    if config is None:
        return g @ t.T
    if config.weights == "image":
        return pool(g, c, config) @ t.T
    return np.stack([query_aware_scores(t, g[i:i + 1], c[i:i + 1], config)[:, 0] for i in range(len(g))])
