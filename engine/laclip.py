"""LACLIP local alignment: settings, seeded crop boxes, and the pure-PyTorch reference scoring.

Settings come in two parts: CropConfig (fixed when images are encoded) and ScoreConfig (chosen per query).

Score of text t against an image with global embedding g and crop embeddings c_1..c_K (all L2-normalised):
    s = alpha * (g . t) + (1 - alpha) * sum_j w_j (c_j . t)
    w_j = softmax_j(c_j . g / tau)   weights="image" (the paper's figure)
    w_j = softmax_j(c_j . t / tau)   weights="text"  (query-aware extension)
With image weights s = p . t for the pooled vector p = alpha g + (1 - alpha) sum_j w_j c_j, so a query is one GEMM.
This module is the truth the native kernel (engine.ops) is tested against.
"""
from __future__ import annotations

import math
from dataclasses import asdict, astuple, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch

from .errors import InputError

WeightsMode = Literal["image", "text"]
CropMode = Literal["random", "grid"]


@dataclass(frozen=True)
class CropConfig:
    """How crops are cut at encode time: part of an index's identity (changing it means re-encoding).

    num_crops: K crops per image. crop_mode: "random" (area/aspect ranges, seeded per image) or "grid"
    (a sqrt(K) x sqrt(K) tiling; K must be a square). crop_area: crop area as a fraction of the image.
    crop_aspect: width/height range, sampled log-uniformly. seed: mixed with each image's content hash.
    """

    num_crops: int = 4
    crop_mode: CropMode = "random"
    crop_area: tuple[float, float] = (0.25, 0.6)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_area", tuple(self.crop_area))
        object.__setattr__(self, "crop_aspect", tuple(self.crop_aspect))
        if isinstance(self.num_crops, bool) or not isinstance(self.num_crops, int) or self.num_crops < 1:
            raise InputError(f"num_crops must be a positive int, got {self.num_crops!r}")
        if self.crop_mode not in ("random", "grid"):
            raise InputError(f"crop_mode must be 'random' or 'grid', got {self.crop_mode!r}")
        if self.crop_mode == "grid" and math.isqrt(self.num_crops) ** 2 != self.num_crops:
            raise InputError(f"crop_mode='grid' needs a square num_crops (1, 4, 9, ...), got {self.num_crops}")
        lo, hi = self.crop_area
        if not 0 < lo <= hi <= 1:
            raise InputError(f"crop_area must satisfy 0 < min <= max <= 1, got {self.crop_area!r}")
        lo, hi = self.crop_aspect
        if not 0 < lo <= hi:
            raise InputError(f"crop_aspect must satisfy 0 < min <= max, got {self.crop_aspect!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CropConfig":
        return cls(**data)


MIN_TAU = 1e-4  # similarities lie in [-1, 1]: 2 / 1e-4 keeps every exponent and its pooled sum finite in fp32


@dataclass(frozen=True)
class ScoreConfig:
    """How a query is scored: chosen per call (per HTTP request too), no re-encoding needed.

    tau: softmax temperature of the crop weights. alpha: weight of the global term (0 = the paper's figure,
    1 = plain CLIP). weights: "image" (w_j from c_j . g) or "text" (query-aware, w_j from c_j . t).
    """

    tau: float = 0.1
    alpha: float = 0.5
    weights: WeightsMode = "image"

    def __post_init__(self) -> None:
        for name in ("tau", "alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{name} must be a number, got {value!r}")
        if not MIN_TAU <= self.tau or not math.isfinite(self.tau):
            raise InputError(f"tau must be a finite number >= {MIN_TAU:g} (below it the crop softmax overflows), "
                             f"got {self.tau!r}")
        if not 0 <= self.alpha <= 1:
            raise InputError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if self.weights not in ("image", "text"):
            raise InputError(f"weights must be 'image' or 'text', got {self.weights!r}")

    @property
    def plain(self) -> bool:
        """alpha = 1: the global term only (plain CLIP), whatever the crops."""
        return self.alpha == 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScoreConfig":
        return cls(**data)


@dataclass(frozen=True)
class LaclipConfig:
    """LACLIP settings: the crop settings (`.crops`, fixed at encode time) plus the default scoring (`.score`).

    The paper gives no K, tau or crop sizes, so these defaults are ours (tune on validation). The fields are the
    union of CropConfig's and ScoreConfig's, flat (index manifests store this form), with their defaults; the
    parts document and validate them.
    """

    num_crops: int = CropConfig.num_crops
    crop_mode: CropMode = CropConfig.crop_mode
    crop_area: tuple[float, float] = CropConfig.crop_area
    crop_aspect: tuple[float, float] = CropConfig.crop_aspect
    tau: float = ScoreConfig.tau
    alpha: float = ScoreConfig.alpha
    weights: WeightsMode = ScoreConfig.weights
    seed: int = CropConfig.seed

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_area", tuple(self.crop_area))
        object.__setattr__(self, "crop_aspect", tuple(self.crop_aspect))
        _ = self.crops, self.score  # building both parts validates every field

    @property
    def crops(self) -> CropConfig:
        return CropConfig(**{f.name: getattr(self, f.name) for f in fields(CropConfig)})

    @property
    def score(self) -> ScoreConfig:
        return ScoreConfig(**{f.name: getattr(self, f.name) for f in fields(ScoreConfig)})

    @classmethod
    def from_parts(cls, crops: CropConfig, score: ScoreConfig | None = None) -> "LaclipConfig":
        return cls(**crops.to_dict(), **(score or ScoreConfig()).to_dict())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LaclipConfig":
        return cls(**data)

    def crop_settings(self) -> tuple[Any, ...]:
        """The settings that change stored crop embeddings (scoring settings excluded)."""
        return astuple(self.crops)


def crop_boxes(width: int, height: int, config: CropConfig | LaclipConfig, image_seed: int) -> list[tuple[int, int, int, int]]:
    """K (left, top, right, bottom) boxes inside a width x height image, reproducible for a given image seed."""
    k = config.num_crops
    if config.crop_mode == "grid":
        n = math.isqrt(k)
        xs = [round(i * width / n) for i in range(n + 1)]
        ys = [round(i * height / n) for i in range(n + 1)]
        return [
            (xs[c], ys[r], max(xs[c + 1], xs[c] + 1), max(ys[r + 1], ys[r] + 1))
            for r in range(n) for c in range(n)
        ]
    rng = np.random.default_rng([config.seed, image_seed])
    area = width * height
    log_lo, log_hi = math.log(config.crop_aspect[0]), math.log(config.crop_aspect[1])
    boxes = []
    for _ in range(k):
        frac = rng.uniform(*config.crop_area)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = min(width, max(1, round(math.sqrt(frac * area * aspect))))
        h = min(height, max(1, round(math.sqrt(frac * area / aspect))))
        left = int(rng.integers(0, width - w + 1))
        top = int(rng.integers(0, height - h + 1))
        boxes.append((left, top, left + w, top + h))
    return boxes


def image_weights(g: torch.Tensor, c: torch.Tensor, tau: float) -> torch.Tensor:
    """[N, K] crop weights softmax_j(c_j . g / tau) for G [N, D], C [N, K, D]."""
    return torch.softmax(torch.einsum("nkd,nd->nk", c, g) / tau, dim=-1)


def pooled_vectors(g: torch.Tensor, c: torch.Tensor, *, alpha: float, tau: float) -> torch.Tensor:
    """[N, D] pooled p = alpha g + (1 - alpha) sum_j w_j c_j (not re-normalised), so s = p . t."""
    w = image_weights(g, c, tau)
    return alpha * g + (1 - alpha) * torch.einsum("nk,nkd->nd", w, c)


def laclip_scores_reference(
    t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, alpha: float, tau: float, weights: WeightsMode
) -> torch.Tensor:
    """[Q, N] LACLIP scores by the direct formula, computed in fp32 (materialises [Q, N, K])."""
    t, g, c = t.float(), g.float(), c.float()
    global_term = t @ g.T  # [Q, N]
    crop_sims = torch.einsum("qd,nkd->qnk", t, c)  # [Q, N, K]
    if weights == "image":
        w = image_weights(g, c, tau).unsqueeze(0)  # [1, N, K]
    elif weights == "text":
        w = torch.softmax(crop_sims / tau, dim=-1)
    else:
        raise InputError(f"weights must be 'image' or 'text', got {weights!r}")
    return alpha * global_term + (1 - alpha) * (w * crop_sims).sum(-1)


def laclip_topk_reference(
    t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, k: int, alpha: float, tau: float, weights: WeightsMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the reference scores per query: (values [Q, k], indices [Q, k]), ties to the lower index."""
    scores = laclip_scores_reference(t, g, c, alpha=alpha, tau=tau, weights=weights)
    if not 1 <= k <= scores.shape[1]:
        raise InputError(f"k must be in 1..{scores.shape[1]}, got {k}")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.gather(scores, 1, order), order
