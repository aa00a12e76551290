"""Validation of the weights being trained, through the feature and metric code engine.eval uses.

The live model is wrapped in a Retriever (no checkpoint written), so the figures are those `python -m engine.eval`
reports for the same weights: same preprocessing, same scoring (global and LACLIP), same Recall@K and MR.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import scoring
from ..backends import TorchEncoder
from ..dataset_features import FeatureCache, image_features, text_features
from ..datasets import Dataset
from ..laclip import LaclipConfig
from ..recall import Metrics, retrieval_metrics
from ..retriever import ModelIdentity, Retriever


def validate(model: torch.nn.Module, model_name: str, resolution: int, dataset: Dataset, *,
             laclip: LaclipConfig | None, context_length: int, batch_size: int, device: str) -> dict[str, Any]:
    """{"global": metrics, "laclip": metrics (when set)} on `dataset`; leaves `model` in eval mode."""
    encoder = TorchEncoder(model, resolution, device=device)
    identity = ModelIdentity(model_name, "finetune-in-progress")
    retriever = Retriever(encoder, identity, laclip=laclip, batch_size=batch_size, context_length=context_length,
                          progress=False)
    no_cache = FeatureCache(None)
    texts = text_features(retriever, dataset, no_cache, progress=False)
    images = image_features(retriever, dataset, no_cache, progress=False)
    kept, _ = dataset.evaluable_texts(set(images.ids))
    row = {text_id: i for i, text_id in enumerate(texts.ids)}
    t = texts.emb[[row[r.id] for r in kept]]
    position = {image_id: i for i, image_id in enumerate(images.ids)}
    truth = [[position[i] for i in r.image_ids] for r in kept]

    def metrics(config: LaclipConfig | None) -> Metrics:
        return retrieval_metrics(scoring.score_images(t, images.global_, images.crops, None, config), truth)

    out = {"global": metrics(None)}
    if laclip is not None:
        out["laclip"] = metrics(laclip)
    return out
