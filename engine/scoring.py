"""Score queries against stored embeddings: plain cosine, pooled LACLIP (one GEMM), or query-aware LACLIP.

Query-aware weights do not collapse to a pooled vector, so they go to the fused native kernel
(engine.ops) when it is built, and to the chunked PyTorch reference otherwise.
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch

from . import ops
from .laclip import LaclipConfig, ScoreConfig, laclip_scores_reference, pooled_vectors

_REFERENCE_CHUNK_ELEMENTS = 1 << 24  # bound the reference's [Q, n, K] intermediate when the kernel is absent


Settings = Union[ScoreConfig, LaclipConfig]


def pool(g: np.ndarray, c: np.ndarray, config: Settings) -> np.ndarray:
    """[N, D] float32 pooled vectors for image-conditioned weights (fp16 rows are widened first, by torch: numpy's
    half-to-float conversion is several times slower)."""
    g, c = (torch.from_numpy(np.ascontiguousarray(x)).float() for x in (g, c))
    return pooled_vectors(g, c, alpha=config.alpha, tau=config.tau).numpy()


def query_aware_tensor(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, config: Settings) -> torch.Tensor:
    """[Q, N] float32 text-conditioned scores: the fused kernel in the rows' dtype and device when it is built,
    else the PyTorch reference in bounded chunks."""
    if ops.extension_available() and (g.device.type == "cpu" or ops.cuda_available()):
        return ops.laclip_scores(t.to(g.dtype), g, c.to(g.dtype), alpha=config.alpha, tau=config.tau,
                                 weights="text")
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, len(t) * c.shape[1]))
    parts = [laclip_scores_reference(t, g[i:i + chunk], c[i:i + chunk], alpha=config.alpha, tau=config.tau,
                                     weights="text") for i in range(0, len(g), chunk)]
    return torch.cat(parts, dim=1) if parts else torch.zeros((len(t), 0), device=t.device)


def query_aware_scores(t: np.ndarray, g: np.ndarray, c: np.ndarray, config: Settings) -> np.ndarray:
    """[Q, N] scores with text-conditioned weights (numpy in and out)."""
    tt, gg, cc = (torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)) for x in (t, g, c))
    return query_aware_tensor(tt, gg, cc, config).numpy()


def is_plain(config: Settings | None) -> bool:
    """Plain CLIP (the global term only): no settings, or alpha = 1 (the crop term has weight 0)."""
    return config is None or config.alpha == 1


def image_scores(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor | None, config: Settings | None,
                 pooled: torch.Tensor | None = None) -> torch.Tensor:
    """[Q, N] float32 scores of text queries t [Q, D] against images g [N, D] / c [N, K, D]: the one dispatch
    (plain -> global term, image weights -> pooled vectors (given, or pooled here), text weights -> the kernel).
    The index scan, evaluation and fine-tuning validation all score through it."""
    t = t.float()
    if is_plain(config):
        return t @ g.float().T
    if config.weights == "image":
        p = pooled if pooled is not None else pooled_vectors(g.float(), c.float(), alpha=config.alpha, tau=config.tau)
        return t @ p.float().T
    return query_aware_tensor(t, g, c, config)


def text_scores(g: torch.Tensor, c: torch.Tensor | None, texts: torch.Tensor,
                config: Settings | None) -> torch.Tensor:
    """[Q, M] float32 scores of query images (g [Q, D], c [Q, K, D]) against stored texts [M, D]."""
    texts = texts.float()
    if is_plain(config):
        return g.float() @ texts.T
    if config.weights == "image":
        return pooled_vectors(g.float(), c.float(), alpha=config.alpha, tau=config.tau) @ texts.T
    return torch.stack([query_aware_tensor(texts, g[i:i + 1], c[i:i + 1], config)[:, 0] for i in range(len(g))])


def best_crop_scores(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[Q, N] float32 max_j (c_j . q): query image vectors q [Q, D] against each image's best crop (c [N, K, D])."""
    return crop_similarities(q, c).amax(dim=-1)


def crop_similarities(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[Q, N, K] float32 similarity of each query vector to each crop of each image."""
    return torch.einsum("qd,nkd->qnk", q.float(), c.float())


def score_images(t: np.ndarray, g: np.ndarray, c: np.ndarray | None, p: np.ndarray | None,
                 config: Settings | None) -> np.ndarray:
    """[Q, N] scores of Q text queries against N images under `config` (None = global CLIP), numpy in and out."""
    def tensor(x: np.ndarray | None) -> torch.Tensor | None:
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))
    return image_scores(tensor(t), tensor(g), tensor(c), config, tensor(p)).numpy()
