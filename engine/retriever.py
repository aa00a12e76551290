"""`Retriever`: the Python API everything else (CLI, HTTP server, evaluation) is built on."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from . import scoring
from .backends import Encoder, TorchEncoder
from .errors import IndexFormatError, InputError
from .index import Id, Index, IndexManifest, check_ids
from .laclip import LaclipConfig, crop_boxes
from .models import load_model
from .preprocess import (DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_PIXELS, ImageInput, ImageTransform,
                         TokenizedTexts, Tokenizer, content_seed, load_image)


class Hit(NamedTuple):
    """One search result."""

    id: Id
    score: float


@dataclass(frozen=True)
class ImageEmbeddings:
    """Global [n, D] and, with LACLIP, crop [n, K, D] embeddings of a batch of images."""

    global_: np.ndarray
    crops: np.ndarray | None


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights produced the embeddings: an index must match it to be searched."""

    model: str
    checkpoint_hash: str
    checkpoint_path: str | None = None


class Retriever:
    """Encode, index and search images and Chinese texts with Chinese-CLIP, optionally with LACLIP scoring."""

    def __init__(self, encoder: Encoder, identity: ModelIdentity, *, laclip: LaclipConfig | None = None,
                 batch_size: int = 32, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool | None = None) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        self.identity = identity
        self.laclip = laclip
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.transform = ImageTransform(encoder.input_resolution)
        self.tokenizer = Tokenizer(context_length)
        self.index = Index(self._manifest())

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None = None, model: str = "ViT-B-16", device: str = "cpu",
                        laclip: LaclipConfig | None = None, precision: str = "fp32", *, random_weights: bool = False,
                        **options) -> "Retriever":
        """Load cn_clip weights (a path, or the official file for `model` when None) into the torch backend.

        `random_weights=True` builds seeded random weights for any model (benchmarks and trials only)."""
        loaded = load_model(checkpoint, model, random_weights)
        encoder = TorchEncoder(loaded.model, loaded.spec.input_resolution, device=device, precision=precision)
        path = str(Path(checkpoint).resolve()) if checkpoint is not None else None
        return cls(encoder, ModelIdentity(model, loaded.checkpoint_hash, path), laclip=laclip, **options)

    @classmethod
    def from_export(cls, directory: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                    laclip: LaclipConfig | None = None, *, model: str | None = None,
                    backend_options: dict | None = None, **options) -> "Retriever":
        """Serve the towers of a `python -m export` directory (onnxruntime or tensorrt), same API and index identity."""
        from export.serving import open_encoder

        encoder, manifest = open_encoder(directory, backend, device, model, **(backend_options or {}))
        options.setdefault("context_length", manifest.context_length)
        return cls(encoder, ModelIdentity(manifest.model, manifest.checkpoint_hash, None), laclip=laclip, **options)

    @classmethod
    def load(cls, directory: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             **options) -> "Retriever":
        """Open a saved index with the model and LACLIP settings it records (checkpoint overrides the path)."""
        index = Index.load(directory)
        meta = index.manifest
        path = checkpoint if checkpoint is not None else meta.checkpoint_path
        retriever = cls.from_checkpoint(path, meta.model, device=device, laclip=meta.laclip,
                                        context_length=meta.context_length, **options)
        retriever.attach(index, source=str(directory))
        return retriever

    def _manifest(self) -> IndexManifest:
        return IndexManifest(self.identity.model, self.identity.checkpoint_hash, self.encoder.embed_dim,
                             self.laclip, self.identity.checkpoint_path, self.tokenizer.context_length)

    def attach(self, index: Index, source: str = "<index>") -> None:
        """Use `index`; refuse one made with another model, checkpoint, crop setting or context length."""
        ours, theirs = self._manifest(), index.manifest
        checks = [("model", ours.model, theirs.model), ("checkpoint hash", ours.checkpoint_hash,
                  theirs.checkpoint_hash), ("embedding size", ours.embed_dim, theirs.embed_dim),
                  ("context length", ours.context_length, theirs.context_length),
                  ("LACLIP crops", _crop_settings(ours.laclip), _crop_settings(theirs.laclip))]
        for what, mine, stored in checks:
            if mine != stored:
                raise IndexFormatError(f"index {source} was built with {what} {stored!r}, "
                                       f"but this retriever has {mine!r}")
        index.manifest.laclip = self.laclip
        if self.laclip is not None and self.laclip.weights == "image" and index.image_ids:
            fresh = scoring.pool(index.array("image_global"), index.array("image_crops"), self.laclip)
            index._chunks["image_pooled"][:] = [fresh]
        self.index = index

    def save(self, directory: str | Path) -> Path:
        """Write the index atomically (see engine.index)."""
        return self.index.save(directory)

    # ---- encoding -------------------------------------------------------------------------------------------

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="item", disable=not self.progress or total <= self.batch_size)

    def _batches(self, items: Sequence, desc: str) -> Iterator[Sequence]:
        with self._bar(len(items), desc) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                yield chunk
                bar.update(len(chunk))

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        return self.tokenizer(texts)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[n, D] float32 L2-normalised text embeddings."""
        texts = _as_list(texts, str)
        out = [self.encoder.encode_texts(self.tokenizer(chunk).ids) for chunk in self._batches(texts, "texts")]
        return np.concatenate(out) if out else np.zeros((0, self.encoder.embed_dim), np.float32)

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """[1 + K, 3, R, R]: the global view, then the LACLIP crops (none without LACLIP)."""
        decoded = load_image(image, self.max_pixels)
        views = [self.transform(decoded).unsqueeze(0)]
        if self.laclip is not None:
            boxes = crop_boxes(decoded.width, decoded.height, self.laclip, content_seed(decoded))
            views.append(self.transform.crops(decoded, boxes))
        return torch.cat(views)

    def encode_image_views(self, images: Sequence[ImageInput]) -> ImageEmbeddings:
        """Global and crop embeddings; each decoded image's crops are seeded by its content."""
        images = _as_list(images, None)
        views = 1 + (self.laclip.num_crops if self.laclip else 0)
        rows: list[np.ndarray] = []
        for chunk in self._batches(images, "images"):
            stacked = torch.cat([self.pixels(image) for image in chunk])
            rows.extend(self.encoder.encode_images(stacked[i:i + self.batch_size])
                        for i in range(0, len(stacked), self.batch_size))
        flat = np.concatenate(rows) if rows else np.zeros((0, self.encoder.embed_dim), np.float32)
        grouped = flat.reshape(len(images), views, self.encoder.embed_dim)
        crops = np.ascontiguousarray(grouped[:, 1:]) if self.laclip else None
        return ImageEmbeddings(np.ascontiguousarray(grouped[:, 0]), crops)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[n, D] float32 L2-normalised global image embeddings (no crops are encoded)."""
        images = _as_list(images, None)
        out = [self.encoder.encode_images(torch.stack([self.transform(load_image(i, self.max_pixels))
                                                       for i in chunk]))
               for chunk in self._batches(images, "images")]
        return np.concatenate(out) if out else np.zeros((0, self.encoder.embed_dim), np.float32)

    # ---- indexing -------------------------------------------------------------------------------------------

    def add_images(self, images: Sequence[ImageInput], ids: Sequence[Id] | None = None) -> list[Id]:
        """Encode and index images; ids default to file stems for paths and counters otherwise."""
        images = _as_list(images, None)
        ids = self._new_ids(images, ids, self.index.image_ids, "images")
        emb = self.encode_image_views(images)
        pooled = None
        if self.laclip is not None:
            pooled = scoring.pool(emb.global_, emb.crops, self.laclip)
        self.index.add_images(ids, emb.global_, emb.crops, pooled)
        return ids

    def add_texts(self, texts: Sequence[str], ids: Sequence[Id] | None = None) -> list[Id]:
        """Encode and index texts; ids default to counters."""
        texts = _as_list(texts, str)
        ids = self._new_ids(texts, ids, self.index.text_ids, "texts")
        self.index.add_texts(ids, self.encode_texts(texts))
        return ids

    @staticmethod
    def _new_ids(items: Sequence, given: Sequence[Id] | None, existing: Sequence[Id], what: str) -> list[Id]:
        """Validated ids for new items: `given`, or defaults (image file stems, else counters)."""
        ids = check_ids(given if given is not None else _default_ids(items, existing, stems=what == "images"),
                        existing)
        if len(ids) != len(items):
            raise InputError(f"{len(ids)} ids given for {len(items)} {what}")
        return ids

    # ---- search ---------------------------------------------------------------------------------------------


    def search_images(self, query: str | Sequence[str], k: int = 10) -> list[Hit] | list[list[Hit]]:
        """Text -> image. A str gives its hits; a list of str gives one list of hits per query."""
        single = isinstance(query, str)
        queries = [query] if single else _as_list(query, str)
        check_k(k, len(self.index.image_ids), "images")
        t = self.encode_texts(queries)
        idx = self.index
        values, indices = scoring.topk_images(
            t, idx.array("image_global"), idx.array("image_crops") if idx.has_crops else None,
            idx.array("image_pooled") if idx.has_crops else None, self.laclip, k)
        hits = to_hits(values, indices, idx.image_ids)
        return hits[0] if single else hits

    def search_texts(self, image: ImageInput | Sequence[ImageInput], k: int = 10) -> list[Hit] | list[list[Hit]]:
        """Image -> text. One image gives its hits; a list of images gives one list of hits per image."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        check_k(k, len(self.index.text_ids), "texts")
        emb = self.encode_image_views(images)
        scores = scoring.score_texts(self.index.array("text_emb"), emb.global_, emb.crops, self.laclip)
        values, indices = scoring.topk_rows(scores, k)
        hits = to_hits(values, indices, self.index.text_ids)
        return hits[0] if single else hits


def check_k(k: int, size: int, what: str) -> None:
    """k must be an int in 1..size (the number of indexed `what`)."""
    if size == 0:
        raise InputError(f"the index holds no {what}; add some first")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise InputError(f"k must be an int in 1..{size} (indexed {what}), got {k!r}")


def _default_ids(items: Sequence, existing: Sequence[Id], stems: bool) -> list[Id]:
    """File stems for paths (when `stems`), else integers counting on from the largest int id."""
    counter = 1 + max([i for i in existing if isinstance(i, int)], default=-1)
    out: list[Id] = []
    for item in items:
        if stems and isinstance(item, (str, Path)):
            out.append(Path(item).stem)
        else:
            out.append(counter)
            counter += 1
    return out


def _crop_settings(config: LaclipConfig | None) -> tuple | None:
    return config.crop_settings() if config is not None else None


def to_hits(values: np.ndarray, indices: np.ndarray, ids: Sequence[Id]) -> list[list[Hit]]:
    """Top-k (values, indices) rows as lists of Hit(id, score)."""
    return [[Hit(ids[int(i)], float(v)) for v, i in zip(vrow, irow)] for vrow, irow in zip(values, indices)]


def _as_list(items: Union[Sequence, object], kind: type | None) -> list:
    """A list of inputs; a bare str where a list of texts is expected is an error, not a list of characters."""
    if isinstance(items, (str, bytes)) and kind is str:
        raise InputError("expected a list of texts, got a single str (wrap it in a list)")
    if isinstance(items, (str, bytes, Path)) or not hasattr(items, "__len__"):
        if kind is None:
            return [items]
        raise InputError(f"expected a list, got {type(items).__name__}")
    return list(items)
