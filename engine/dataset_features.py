"""Encode a dataset's texts and images once and cache the embeddings as .npy files.

An entry is keyed by everything that changes the embeddings: model, checkpoint hash, the files' fingerprint,
the text pipeline version and context length (texts), and the LACLIP crop settings (images). Scoring settings
(tau, alpha, weights) are not in the key, so re-scoring with other values reuses the entry; another K encodes
(and caches) its own crops.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from .datasets import Dataset
from .errors import ImageDecodeError
from .preprocess import TEXT_PIPELINE
from .records import ImageRecord, Problem, undecodable
from .retriever import Retriever

CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/cnclip-engine/features").expanduser()


@dataclass(frozen=True)
class TextFeatures:
    """[n, D] text embeddings for the dataset's texts, row i for ids[i]."""

    ids: list[str]
    emb: np.ndarray
    cached: bool


@dataclass(frozen=True)
class ImageFeatures:
    """Global [n, D] and crop [n, K, D] (None without LACLIP) embeddings of the decodable images."""

    ids: list[str]
    global_: np.ndarray
    crops: np.ndarray | None
    problems: list[Problem]  # images that could not be decoded (and so have no row)
    cached: bool


class FeatureCache:
    """A directory of entries `<key digest>/{meta.json, *.npy}`, each written atomically; root None disables it."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root).expanduser() if root is not None else None

    def load(self, key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """(meta, arrays) stored under `key`, or None when absent or unreadable (it is then rebuilt)."""
        if self.root is None:
            return None
        key = _canonical(key)
        entry = self.root / _digest(key)
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
            if meta.get("key") != key:
                return None
            arrays = {name: np.load(entry / f"{name}.npy", allow_pickle=False) for name in meta["arrays"]}
        except (OSError, ValueError, KeyError):
            return None
        return meta, arrays

    def store(self, key: dict[str, Any], meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Write an entry into a temporary folder, then move it into place (readers never see half an entry)."""
        if self.root is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        key = _canonical(key)
        entry = self.root / _digest(key)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.root))
        try:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array, allow_pickle=False)
            full = {**meta, "key": key, "arrays": sorted(arrays)}
            (tmp / "meta.json").write_text(json.dumps(full, ensure_ascii=False), encoding="utf-8")
            if entry.exists():
                shutil.rmtree(entry)
            os.replace(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def text_features(retriever: Retriever, dataset: Dataset, cache: FeatureCache, progress: bool | None = None
                  ) -> TextFeatures:
    """Embeddings of every well-formed text, from the cache when the texts file and model are unchanged."""
    ids = [r.id for r in dataset.texts]
    key = {"kind": "texts", **_model_key(retriever), "text_pipeline": TEXT_PIPELINE,
           "context_length": retriever.tokenizer.context_length, "texts": dataset.texts_fingerprint}
    hit = cache.load(key)
    if hit is not None and hit[0].get("ids") == ids:
        return TextFeatures(ids, hit[1]["emb"], cached=True)
    rows = []
    with tqdm(total=len(ids), desc="encoding texts", unit="text", disable=_disable(progress)) as bar:
        for start in range(0, len(ids), retriever.batch_size):
            chunk = dataset.texts[start:start + retriever.batch_size]
            rows.append(retriever.encode_texts([r.text for r in chunk]))
            bar.update(len(chunk))
    emb = _stack(rows, (0, retriever.encoder.embed_dim))
    cache.store(key, {"ids": ids}, {"emb": emb})
    return TextFeatures(ids, emb, cached=False)


def image_features(retriever: Retriever, dataset: Dataset, cache: FeatureCache, progress: bool | None = None
                   ) -> ImageFeatures:
    """Global and (with `retriever.laclip`) crop embeddings of every image; undecodable ones become Problems."""
    config = retriever.laclip
    key = {"kind": "images", **_model_key(retriever), "layout": dataset.layout, "images": dataset.images_fingerprint,
           "crops": list(config.crop_settings()) if config is not None else None,
           "resolution": retriever.encoder.input_resolution, "max_pixels": retriever.max_pixels}
    all_ids = [r.id for r in dataset.images]
    hit = cache.load(key)
    if hit is not None and hit[0].get("all_ids") == all_ids:
        meta, arrays = hit
        return ImageFeatures(meta["ids"], arrays["global"], arrays.get("crops"),
                             [Problem.from_dict(p) for p in meta["problems"]], cached=True)
    ids, globals_, crops, problems = _encode_images(retriever, dataset.images, progress)
    d, k = retriever.encoder.embed_dim, config.num_crops if config is not None else 0
    arrays = {"global": _stack(globals_, (0, d))}
    if config is not None:
        arrays["crops"] = _stack(crops, (0, k, d))
    cache.store(key, {"ids": ids, "all_ids": all_ids, "problems": [p.to_dict() for p in problems]}, arrays)
    return ImageFeatures(ids, arrays["global"], arrays.get("crops"), problems, cached=False)


def _encode_images(retriever: Retriever, images: Sequence[ImageRecord], progress: bool | None
                   ) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list[Problem]]:
    """Decode each image once (recording the undecodable) and encode the rest in batches."""
    ids: list[str] = []
    globals_: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    problems: list[Problem] = []
    with tqdm(total=len(images), desc="encoding images", unit="img", disable=_disable(progress)) as bar:
        for start in range(0, len(images), retriever.batch_size):
            chunk = images[start:start + retriever.batch_size]
            decoded = []
            for record in chunk:
                try:
                    decoded.append(record.decode(retriever.max_pixels))
                    ids.append(record.id)
                except ImageDecodeError as exc:
                    problems.append(undecodable(record, exc))
            if decoded:
                emb = retriever.encode_image_views(decoded)
                globals_.append(emb.global_)
                if emb.crops is not None:
                    crops.append(emb.crops)
            bar.update(len(chunk))
    return ids, globals_, crops, problems


def _model_key(retriever: Retriever) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "model": retriever.identity.model,
            "checkpoint_hash": retriever.identity.checkpoint_hash}


def _canonical(key: dict[str, Any]) -> dict[str, Any]:
    """The key as it reads back from JSON (tuples become lists), so a stored key compares equal."""
    return json.loads(json.dumps(key, sort_keys=True))


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _stack(parts: list[np.ndarray], empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate(parts)) if parts else np.zeros(empty_shape, np.float32)


def _disable(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None lets tqdm hide the bar when stderr is not a terminal."""
    return None if progress is None else not progress
