"""The server core: a Retriever behind one dynamic batcher per tower, a preprocessing pool and an index lock.

Requests from many clients share tower calls: texts are tokenized in the pool and their rows batched into
one `encoder.encode_texts`; images are decoded and cut into views in the pool and batched into one
`encoder.encode_images`. Scoring runs per request in the pool against an immutable snapshot of the index
(`IndexView`), so searches never see a half-applied add. Adds are serialised, persisted atomically
(engine.index), and only then published to searches. No HTTP here: `engine.serve.app` maps to status codes.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .. import scoring
from ..batcher import Batcher, BatcherConfig
from ..errors import EngineError, InputError
from ..gallery import list_images, read_texts_jsonl
from ..index import Id, Index, check_ids, topk_rows
from ..laclip import LaclipConfig
from ..preprocess import DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_PIXELS, load_image
from ..retriever import Hit, Retriever, check_k, to_hits

log = logging.getLogger("engine.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What the server loads and how it batches (see `python -m engine.serve --help`)."""

    model: str = "tiny"
    checkpoint: str | None = None
    random_weights: bool = False
    export_dir: Path | None = None  # serve the towers of a `python -m export` directory instead of PyTorch
    backend: str = "onnxruntime"
    index_dir: Path | None = None
    gallery: Path | None = None
    texts: Path | None = None
    laclip: LaclipConfig | None = None
    device: str = "cpu"
    batch: BatcherConfig = field(default_factory=BatcherConfig)
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    encode_batch_size: int = 32  # gallery indexing and index adds


@dataclass(frozen=True)
class IndexView:
    """An immutable snapshot of the index arrays and ids that searches read."""

    image_ids: tuple[Id, ...]
    text_ids: tuple[Id, ...]
    image_global: np.ndarray
    image_crops: np.ndarray | None
    image_pooled: np.ndarray | None
    text_emb: np.ndarray

    @classmethod
    def of(cls, index: Index) -> "IndexView":
        crops = index.has_crops
        return cls(tuple(index.image_ids), tuple(index.text_ids), index.array("image_global"),
                   index.array("image_crops") if crops else None, index.array("image_pooled") if crops else None,
                   index.array("text_emb"))


@dataclass(frozen=True)
class TextResult:
    """Search hits (or embeddings) for each query, and whether the tokenizer truncated it."""

    values: list[Any]
    truncated: list[bool]


class NotReady(EngineError):
    """The model is still loading or warming up."""


def build_retriever(config: ServeConfig, laclip: LaclipConfig | None,
                    context_length: int = DEFAULT_CONTEXT_LENGTH) -> Retriever:
    """A Retriever for config.model: a checkpoint, the official weights, an export (onnxruntime/tensorrt), or
    (--random-weights) seeded random ones."""
    options = dict(laclip=laclip, batch_size=config.encode_batch_size, context_length=context_length,
                   max_pixels=config.max_pixels)
    if config.export_dir is not None:
        return Retriever.from_export(config.export_dir, config.backend, config.device, model=config.model, **options)
    return Retriever.from_checkpoint(config.checkpoint, model=config.model, device=config.device,
                                     random_weights=config.random_weights, **options)


def load_retriever(config: ServeConfig) -> Retriever:
    """Open --index if it exists (its LACLIP and context settings win), then index any new --gallery items."""
    index_dir = config.index_dir
    if index_dir is not None and (index_dir / "CURRENT").is_file():
        index = Index.load(index_dir)
        retriever = build_retriever(config, index.manifest.laclip, index.manifest.context_length)
        retriever.attach(index, source=str(index_dir))
        log.info("loaded index %s: %d images, %d texts", index_dir, len(index.image_ids), len(index.text_ids))
    else:
        retriever = build_retriever(config, config.laclip)
    if config.gallery is not None:
        index_gallery(retriever, config.gallery, config.texts)
        if index_dir is not None:
            retriever.save(index_dir)
            log.info("saved index %s", index_dir)
    return retriever


def index_gallery(retriever: Retriever, gallery: Path, texts: Path | None) -> None:
    """Add the folder's images (ids = file stems) and the JSON-lines texts not yet in the index."""
    have_images, have_texts = set(retriever.index.image_ids), set(retriever.index.text_ids)
    images = [p for p in list_images(gallery) if p.stem not in have_images]
    retriever.progress = True
    if images:
        retriever.add_images(images, [p.stem for p in images])
    if texts is not None:
        ids, items = read_texts_jsonl(texts)
        new = [(i, t) for i, t in zip(ids, items) if i not in have_texts]
        if new:
            retriever.add_texts([t for _, t in new], [i for i, _ in new])
    log.info("gallery %s: %d new images; index holds %d images, %d texts", gallery, len(images),
             len(retriever.index.image_ids), len(retriever.index.text_ids))


class ServerCore:
    """Async retrieval service over one Retriever: batched towers, pooled preprocessing, consistent index."""

    def __init__(self, config: ServeConfig, on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.config = config
        self.retriever: Retriever | None = None
        self.view: IndexView | None = None
        self.ready = False
        self.dirty = False
        self._on_batch = on_batch
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="preprocess")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        self._write_lock = asyncio.Lock()
        self.batchers: dict[str, Batcher] = {}

    # ---- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and index (off the loop), start the batchers, warm both towers up, then be ready."""
        loop = asyncio.get_running_loop()
        self.retriever = await loop.run_in_executor(self._writer, load_retriever, self.config)
        self.view = IndexView.of(self.retriever.index)
        for name, fn in (("text", self._encode_text_rows), ("image", self._encode_image_views)):
            batcher = Batcher(name, fn, self.config.batch, on_batch=self._batch_callback(name))
            batcher.start()
            self.batchers[name] = batcher
        await self._encode_texts(["预热"])
        await self._image_embeddings(Image.new("RGB", (64, 48), (120, 80, 40)))
        self.ready = True
        log.info("ready: model %s, %d images, %d texts", self.config.model, len(self.view.image_ids),
                 len(self.view.text_ids))

    async def close(self) -> None:
        """Finish queued work, flush an unsaved index, release the pools."""
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.close()
        async with self._write_lock:
            if self.dirty and self.config.index_dir is not None and self.retriever is not None:
                await asyncio.get_running_loop().run_in_executor(self._writer, self._save)
        self._pool.shutdown(wait=True)
        self._writer.shutdown(wait=True)

    def _batch_callback(self, name: str) -> Callable[[int, float], None] | None:
        if self._on_batch is None:
            return None
        return lambda size, seconds: self._on_batch(name, size, seconds)

    def _require_ready(self) -> Retriever:
        if not self.ready or self.retriever is None:
            raise NotReady("the model is still loading or warming up; retry shortly (see /readyz)")
        return self.retriever

    async def _in_pool(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- tower batch functions (run in each batcher's worker thread) ------------------------------------------

    def _encode_text_rows(self, rows: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.retriever.encoder.encode_texts(torch.stack(rows)))

    def _encode_image_views(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        flat = self.retriever.encoder.encode_images(torch.cat(items))
        return list(flat.reshape(len(items), -1, flat.shape[-1]))

    # ---- encoding -------------------------------------------------------------------------------------------

    async def _encode_texts(self, texts: Sequence[str]) -> TextResult:
        """[D] embeddings per text via the text batcher; empty or non-string texts are InputErrors."""
        retriever = self.retriever
        if not texts:
            raise InputError("no texts given (an empty list)")
        self.batchers["text"].check_capacity(len(texts))
        tokens = await self._in_pool(retriever.tokenize, list(texts))
        rows = await self.batchers["text"].submit_many(list(tokens.ids))
        return TextResult(rows, tokens.truncated)

    async def _image_embeddings(self, image: Any) -> np.ndarray:
        """[1 + K, D] (global, then crops) for one image input, decoded and cut into views in the pool."""
        self.batchers["image"].check_capacity(1)
        views = await self._in_pool(self._pixels, image)
        return await self.batchers["image"].submit(views)

    def _pixels(self, image: Any) -> torch.Tensor:
        try:
            return self.retriever.pixels(image)
        except InputError as exc:
            raise type(exc)(f"image: {exc}") from None

    async def encode_image(self, image: bytes) -> tuple[np.ndarray, np.ndarray | None]:
        """(global [D], crops [K, D] or None) for one encoded image file."""
        self._require_ready()
        emb = await self._image_embeddings(image)
        return emb[0], (emb[1:] if self.retriever.laclip is not None else None)

    async def encode_text(self, texts: Sequence[str]) -> TextResult:
        """[D] embeddings of texts, with truncation flags."""
        self._require_ready()
        return await self._encode_texts(texts)

    # ---- search ---------------------------------------------------------------------------------------------

    async def search_images(self, queries: Sequence[str], k: int) -> TextResult:
        """Text -> image: one list of hits per query, best first."""
        retriever = self._require_ready()
        view = self.view
        check_k(k, len(view.image_ids), "images")
        encoded = await self._encode_texts(queries)
        hits = await self._in_pool(self._score_images, view, np.stack(encoded.values), k, retriever.laclip)
        return TextResult(hits, encoded.truncated)

    @staticmethod
    def _score_images(view: IndexView, t: np.ndarray, k: int, laclip: LaclipConfig | None) -> list[list[Hit]]:
        values, indices = scoring.topk_images(t, view.image_global, view.image_crops, view.image_pooled, laclip, k)
        return to_hits(values, indices, view.image_ids)

    async def search_texts(self, image: bytes, k: int) -> list[Hit]:
        """Image -> text: the hits for one encoded image file, best first."""
        retriever = self._require_ready()
        view = self.view
        check_k(k, len(view.text_ids), "texts")
        emb = await self._image_embeddings(image)
        return await self._in_pool(self._score_texts, view, emb, k, retriever.laclip)

    @staticmethod
    def _score_texts(view: IndexView, emb: np.ndarray, k: int, laclip: LaclipConfig | None) -> list[Hit]:
        crops = emb[None, 1:] if laclip is not None else None
        scores = scoring.score_texts(view.text_emb, emb[None, 0], crops, laclip)
        values, indices = topk_rows(scores, k)
        return to_hits(values, indices, view.text_ids)[0]

    # ---- index mutation -------------------------------------------------------------------------------------

    async def add_images(self, images: Sequence[tuple[bytes, str]], ids: Sequence[Id] | None) -> list[Id]:
        """Decode (in the pool), encode, index and persist images given as (data, name); all or nothing."""
        retriever = self._require_ready()
        if not images:
            raise InputError("no images given")
        if ids is not None and len(ids) != len(images):
            raise InputError(f"{len(ids)} ids given for {len(images)} images")
        decoded = await asyncio.gather(*(self._in_pool(self._decode, data, f"image #{i} ({name})")
                                         for i, (data, name) in enumerate(images)))
        return await self._mutate(retriever.add_images, decoded, ids)

    def _decode(self, data: bytes, what: str) -> Image.Image:
        try:
            return load_image(data, self.retriever.max_pixels)
        except InputError as exc:
            raise type(exc)(f"{what}: {exc}") from None

    async def add_texts(self, texts: Sequence[str], ids: Sequence[Id] | None) -> list[Id]:
        """Encode, index and persist texts; all or nothing."""
        retriever = self._require_ready()
        if not texts:
            raise InputError("no texts given (an empty list)")
        if ids is not None:
            check_ids(ids, self.view.text_ids)
        return await self._mutate(retriever.add_texts, list(texts), ids)

    async def _mutate(self, add: Callable[[Sequence, Sequence[Id] | None], list[Id]], items: Sequence,
                      ids: Sequence[Id] | None) -> list[Id]:
        async with self._write_lock:
            return await asyncio.get_running_loop().run_in_executor(self._writer, self._apply, add, items, ids)

    def _apply(self, add: Callable, items: Sequence, ids: Sequence[Id] | None) -> list[Id]:
        added = add(items, list(ids) if ids is not None else None)
        self.dirty = True
        if self.config.index_dir is not None:
            self._save()
        self.view = IndexView.of(self.retriever.index)
        return added

    def _save(self) -> None:
        self.retriever.save(self.config.index_dir)
        self.dirty = False

    @property
    def persistent(self) -> bool:
        return self.config.index_dir is not None

