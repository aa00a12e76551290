"""Run an evaluation: read the split, encode (or load cached) features, score global CLIP and LACLIP, sweep."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import scoring
from ..dataset_features import DEFAULT_CACHE_DIR, FeatureCache, ImageFeatures, image_features, text_features
from ..datasets import Dataset, DatasetError, Layout, Problem, check_images, read_dataset
from ..errors import InputError
from ..laclip import LaclipConfig
from ..recall import Metrics, retrieval_metrics
from ..retriever import Retriever
from .predictions import Rankings, rank


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how. `laclip` None evaluates global CLIP only; sweep lists default to `laclip`'s value."""

    data: Path
    model: str = "ViT-B-16"
    checkpoint: str | None = None
    split: str = "test"
    layout: Layout = "auto"
    laclip: LaclipConfig | None = field(default_factory=LaclipConfig)
    sweep_crops: tuple[int, ...] = ()
    sweep_tau: tuple[float, ...] = ()
    sweep_alpha: tuple[float, ...] = ()
    sweep_weights: tuple[str, ...] = ()
    batch_size: int = 32
    device: str = "cpu"
    cache_dir: Path | None = DEFAULT_CACHE_DIR
    skip_bad: bool = False
    progress: bool | None = None
    rank_mode: str | None = None  # "global" or "laclip": keep that mode's top-10 rankings (prediction files)

    def __post_init__(self) -> None:
        if self.rank_mode not in (None, "global", "laclip"):
            raise InputError(f"rank_mode must be None, 'global' or 'laclip', got {self.rank_mode!r}")
        if self.rank_mode == "laclip" and self.laclip is None:
            raise InputError("rank_mode 'laclip' needs LACLIP on (--crops >= 1)")

    @property
    def sweeping(self) -> bool:
        return bool(self.sweep_crops or self.sweep_tau or self.sweep_alpha or self.sweep_weights)

    def sweep_configs(self) -> list[LaclipConfig]:
        """Every combination of the swept values (unswept ones from `laclip`), in the order given."""
        if not self.sweeping:
            return []
        if self.laclip is None:
            raise InputError("a sweep needs LACLIP on (--crops >= 1)")
        base = self.laclip
        grid = itertools.product(self.sweep_crops or (base.num_crops,), self.sweep_tau or (base.tau,),
                                 self.sweep_alpha or (base.alpha,), self.sweep_weights or (base.weights,))
        return [replace(base, num_crops=k, tau=tau, alpha=alpha, weights=w) for k, tau, alpha, w in grid]


@dataclass
class EvalReport:
    """Metrics per mode ("global", "laclip"), one row per swept setting, what was skipped, and the counts."""

    results: dict[str, Metrics]
    sweep: list[tuple[LaclipConfig, Metrics]]
    skipped: list[Problem]
    meta: dict[str, Any]
    rankings: Rankings | None = None  # the top-10 rankings of `EvalSettings.rank_mode`

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.results)
        if self.sweep:
            out["sweep"] = [{"crops": c.num_crops, "tau": c.tau, "alpha": c.alpha, "weights": c.weights, **m}
                            for c, m in self.sweep]
        out["meta"] = {**self.meta, "skipped": len(self.skipped), "problems": [str(p) for p in self.skipped]}
        return out


def evaluate(settings: EvalSettings) -> EvalReport:
    """Recall@1/5/10 both ways and MR for global CLIP and LACLIP (and each sweep setting) on one split."""
    dataset = read_dataset(settings.data, settings.split, settings.layout)
    retriever = Retriever.from_checkpoint(settings.checkpoint, model=settings.model, device=settings.device,
                                          batch_size=settings.batch_size, progress=False)
    if dataset.problems and not settings.skip_bad:  # fail before encoding, with the complete list
        raise DatasetError(dataset.problems + check_images(dataset.images, retriever.max_pixels))
    cache = FeatureCache(settings.cache_dir)
    texts = text_features(retriever, dataset, cache, settings.progress)
    sweep = settings.sweep_configs()
    crop_configs = {c.crop_settings(): c for c in ([settings.laclip] if settings.laclip else []) + sweep}
    images = {crops: image_features(_with(retriever, config), dataset, cache, settings.progress)
              for crops, config in crop_configs.items()}
    if not images:
        images[None] = image_features(retriever, dataset, cache, settings.progress)
    first = next(iter(images.values()))
    if first.problems and not settings.skip_bad:
        raise DatasetError(first.problems)
    kept, dropped = dataset.evaluable_texts(set(first.ids))
    if not kept:
        raise InputError(f"no text in {dataset.texts_file} can be evaluated (all were skipped)")
    row = {text_id: i for i, text_id in enumerate(texts.ids)}
    t = texts.emb[[row[r.id] for r in kept]]
    position = {image_id: i for i, image_id in enumerate(first.ids)}
    truth = [[position[i] for i in r.image_ids] for r in kept]

    def scores(config: LaclipConfig | None) -> np.ndarray:
        feats = images[config.crop_settings()] if config is not None else first
        return scoring.score_images(t, feats.global_, feats.crops, None, config)

    modes = {"global": None, **({"laclip": settings.laclip} if settings.laclip is not None else {})}
    results, rankings = {}, None
    for mode, config in modes.items():
        matrix = scores(config)
        results[mode] = retrieval_metrics(matrix, truth)
        if mode == settings.rank_mode:
            rankings = rank(matrix, [r.id for r in kept], first.ids)
    rows = [(c, results["laclip"] if c == settings.laclip else retrieval_metrics(scores(c), truth))
            for c in sweep]
    skipped = dataset.problems + first.problems + dropped
    meta = _meta(settings, retriever, dataset, first, len(kept), len({i for r in kept for i in r.image_ids}),
                 cached=texts.cached and all(f.cached for f in images.values()))
    return EvalReport(results, rows, skipped, meta, rankings)


def _with(retriever: Retriever, config: LaclipConfig) -> Retriever:
    """A retriever sharing `retriever`'s loaded encoder, with other LACLIP settings."""
    return Retriever(retriever.encoder, retriever.identity, laclip=config, batch_size=retriever.batch_size,
                     context_length=retriever.tokenizer.context_length, max_pixels=retriever.max_pixels,
                     progress=False)


def _meta(settings: EvalSettings, retriever: Retriever, dataset: Dataset, images: ImageFeatures, n_texts: int,
          n_image_queries: int, cached: bool) -> dict[str, Any]:
    return {
        "model": retriever.identity.model, "checkpoint_hash": retriever.identity.checkpoint_hash,
        "data": str(Path(settings.data)), "split": settings.split, "layout": dataset.layout,
        "texts": n_texts, "images": len(images.ids), "image_queries": n_image_queries,
        "laclip": settings.laclip.to_dict() if settings.laclip is not None else None,
        "features_cached": cached,
    }
