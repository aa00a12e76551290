"""The interface every tower backend implements: preprocessed tensors in, L2-normalised float32 rows out."""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch


class Encoder(Protocol):
    """Runs the two towers. Inputs are already preprocessed (engine.preprocess)."""

    embed_dim: int
    input_resolution: int

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """[B, 3, R, R] float32 pixels -> [B, D] float32, L2-normalised."""
        ...

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        """[B, L] int64 cn_clip token ids (0 = padding) -> [B, D] float32, L2-normalised."""
        ...


def encoder_device(encoder: object) -> str:
    """Where an encoder's towers run, so the index scores on the same device: torch and TensorRT encoders say so
    (`.device`); an ONNX Runtime encoder runs on CUDA when its first provider is CUDA's."""
    device = getattr(encoder, "device", None)
    if device is not None:
        return str(device)
    providers = getattr(encoder, "providers", None) or []
    return "cuda" if providers and providers[0] == "CUDAExecutionProvider" else "cpu"


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32 (an all-zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def trim_padding(token_ids: np.ndarray, pad_id: int = 0, min_length: int = 2) -> np.ndarray:
    """Drop trailing all-pad columns, so a short query does not pay for a full context of padding.

    Padding keys are masked out of attention, so the embeddings do not change; every backend trims this way.
    """
    used = np.flatnonzero((token_ids != pad_id).any(axis=0))
    length = int(used[-1]) + 1 if used.size else 1
    if length < min_length:  # e.g. an exported text graph takes at least `min_length` tokens
        pad = np.full((token_ids.shape[0], min_length - length), pad_id, dtype=token_ids.dtype)
        return np.concatenate([token_ids[:, :length], pad], axis=1)
    return token_ids[:, :length]
