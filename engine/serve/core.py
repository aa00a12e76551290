"""The server core: a Retriever behind one dynamic batcher per tower, a preprocessing pool and one writer.

The server runs the Retriever's own stages and adds only batching: `prepare_texts` / `prepare_images` run in the
pool, the batchers call `encode_tokens` / `encode_views` on their batched rows (searches and index adds alike, so
no tower is ever called from two threads), then the Retriever's `search_*_embeddings` score over its immutable
snapshot, or its `store_images` / `store_texts` (ids, the one payload rule) and `delete_*` run one at a time in
the writer thread and write through to the index directory before returning: a write that fails changes nothing,
and searches see a write only once it is durable.
No HTTP here: engine.serve.app maps errors to status codes.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..backends.export_reader import BACKENDS
from ..batcher import Batcher, BatcherConfig
from ..decoding import DecodeBudget, DecodePool, PixelGate
from ..errors import IndexFormatError, InputError
from ..gallery import folder_images, read_texts_jsonl
from ..ids import Id, check_id, check_ids, id_key
from ..iiif.links import decorate_hit
from ..index import COMMIT
from ..index.filters import payload_keys
from ..index.verification import verify_index
from ..laclip import LaclipConfig
from ..preprocess import DEFAULT_MAX_PIXELS
from ..retriever import Hit, ImageEmbeddings, PreparedImages, Retriever, negative_texts
from .cluster import Cluster, ClusterOptions
from .errors import HttpError, IndexWriteError, NotFound, NotReady
from .gallery_check import usable_gallery_images

log = logging.getLogger("engine.serve")
ADD_CHUNK = 8  # images of one add prepared and encoded together (peak memory follows this, not the add's size)


@dataclass(frozen=True)
class ServeConfig:
    """What the server loads and how it batches (see `python -m engine.serve --help`)."""

    model: str | None = "tiny"  # None with an export: the export's manifest names it
    checkpoint: str | None = None
    random_weights: bool = False
    export_dir: Path | None = None  # serve the towers of a `python -m export` directory instead of PyTorch
    backend: str = BACKENDS[0]  # onnxruntime
    index_dir: Path | None = None  # None: in memory only (--in-memory)
    gallery: Path | None = None
    texts: Path | None = None
    laclip: LaclipConfig | None = None
    device: str = "cpu"
    precision: str = "fp32"  # PyTorch towers (not an export): fp32, bf16, bf16-compiled, fp16 (CUDA)
    batch: BatcherConfig = field(default_factory=BatcherConfig)
    workers: int = 2
    max_pixels: int = DEFAULT_MAX_PIXELS
    encode_batch_size: int = 32  # gallery indexing at start-up
    read_only: bool = False  # a replica: follows the index's commits, answers writes 403
    cluster: ClusterOptions | None = None  # score on Ray Serve shards of --index (engine.serve.cluster)
    verify_on_start: bool = False  # read the whole index against its checksums before serving it
    decode: DecodeBudget | None = field(default_factory=DecodeBudget)  # None: decode in-process, no time budget
    max_request_pixels: int = 2_000_000_000  # decoded pixels one add may carry (413 before decoding past it)
    iiif_viewer: str | None = None  # viewer URL pattern for IIIF hits, with {manifest} and {canvas} (engine.iiif.links)
    skip_bad: bool = False  # --gallery: leave out (and log) images that do not decode instead of refusing to start


@dataclass(frozen=True)
class TextQueryResult:
    """One value per text query (its image hits, or its embedding) and whether the tokenizer truncated it."""

    values: list[Any]
    truncated: list[bool]


def check_index_files(index_dir: Path | None) -> None:
    """--verify-on-start: an IndexFormatError naming every damaged file of the index (none yet: nothing to check)."""
    if index_dir is None or not (index_dir / COMMIT).exists():
        return
    report = verify_index(index_dir)
    log.info("--verify-on-start: %s", report.summary().splitlines()[0])
    if not report.ok:
        raise IndexFormatError(f"--verify-on-start: index {index_dir.name} is damaged: {report.summary()}")


def build_retriever(config: ServeConfig) -> Retriever:
    """A Retriever for the config: bound to an existing index directory (its settings win), else new (and
    bound to --index when given, so every add writes through)."""
    options = dict(batch_size=config.encode_batch_size, max_pixels=config.max_pixels)
    index_dir = config.index_dir
    if index_dir is not None and index_dir.is_dir() and any(index_dir.iterdir()):
        if config.export_dir is not None:
            return Retriever.load(index_dir, export=config.export_dir, backend=config.backend,
                                  device=config.device, **options)
        return Retriever.load(index_dir, checkpoint=config.checkpoint, device=config.device,
                              random_weights=config.random_weights, precision=config.precision, **options)
    if config.export_dir is not None:
        retriever = Retriever.from_export(config.export_dir, config.backend, config.device, config.laclip,
                                          model=config.model, **options)
    else:
        retriever = Retriever.from_checkpoint(config.checkpoint, model=config.model, device=config.device,
                                              laclip=config.laclip, precision=config.precision,
                                              random_weights=config.random_weights, **options)
    if index_dir is not None:
        retriever.save(index_dir)
    return retriever


def index_gallery(retriever: Retriever, gallery: Path, texts: Path | None, skip_bad: bool = False) -> None:
    """Add the folder's images (ids by engine.gallery's folder-id rule) and the JSON-lines texts not yet in the
    index."""
    index = retriever.index
    images = [(i, p) for i, p in folder_images(gallery) if not index.has_image(i)]
    images = usable_gallery_images(images, skip_bad, retriever.max_pixels)  # every bad file named up front
    retriever.progress = True
    if images:  # "source": the path relative to the folder, as `python -m engine index --images` stores it
        retriever.add_images([p for _, p in images], [i for i, _ in images],
                             [{"source": p.relative_to(gallery).as_posix()} for _, p in images])
    if texts is not None:
        new = read_texts_jsonl(texts).where(lambda text_id: not index.has_text(text_id))
        if new.ids:
            retriever.add_texts(new.texts, new.ids, new.payloads)
    log.info("gallery %s: %d new images", gallery, len(images))


class ServerCore:
    """Async retrieval service over one Retriever: batched towers, pooled preprocessing, one writer."""

    def __init__(self, config: ServeConfig, on_batch: Callable[[str, int, float], None] | None = None) -> None:
        self.config = config
        self.retriever: Retriever | None = None
        self.ready = False
        self._on_batch = on_batch
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="preprocess")
        # waits on the decoding processes stay off the preprocessing threads, so a slow decode never delays a text
        decode_threads = config.decode.workers if config.decode is not None else 1
        self._decode_waits = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="decode-wait")
        self.decoder: DecodePool | None = None
        self._gate = PixelGate(config.max_pixels)  # decoded pixels held at once, across requests
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-writer")
        self._write_lock = asyncio.Lock()
        self.batchers: dict[str, Batcher] = {}
        self.cluster: Cluster | None = None

    # ---- life cycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model and index (off the loop), start the batchers, warm both towers up, then be ready."""
        Image.MAX_IMAGE_PIXELS = self.config.max_pixels  # Pillow's own bomb guard follows --max-pixels
        loop = asyncio.get_running_loop()
        self.retriever = await loop.run_in_executor(self._writer, self._load)
        for name, fn in (("text", self._encode_text_rows), ("image", self._encode_image_views)):
            batcher = Batcher(name, fn, self.config.batch, on_batch=self._batch_callback(name))
            batcher.start()
            self.batchers[name] = batcher
        await self._encode_texts(["预热"])
        await self._image_embeddings(Image.new("RGB", (64, 48), (120, 80, 40)))
        self.ready = True
        images, texts = self.counts()
        log.info("ready: model %s, %d images, %d texts", self.retriever.identity.model, images, texts)

    def _load(self) -> Retriever:
        if self.config.verify_on_start:
            check_index_files(self.config.index_dir)
        retriever = build_retriever(self.config)
        if self.config.decode is not None and retriever.device_views is None:
            self.decoder = DecodePool(self.config.decode, self.config.max_pixels)
        retriever.index.read_only = self.config.read_only
        if self.config.gallery is not None:
            index_gallery(retriever, self.config.gallery, self.config.texts, self.config.skip_bad)
        if self.config.cluster is not None:  # the shards open what the gallery committed
            self.cluster = Cluster(self.config.index_dir, self.config.cluster).start()
            retriever.index.scatter = self.cluster.scan
        return retriever

    async def close(self) -> None:
        """Finish queued work and release the pools (every acknowledged write is already durable)."""
        self.ready = False
        for batcher in self.batchers.values():
            await batcher.close()
        async with self._write_lock:
            pass
        self._pool.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        self._decode_waits.shutdown(wait=True)
        if self.decoder is not None:
            self.decoder.close()
        if self.cluster is not None:
            self.cluster.close()

    def _batch_callback(self, name: str) -> Callable[[int, float], None] | None:
        if self._on_batch is None:
            return None
        return lambda size, seconds: self._on_batch(name, size, seconds)

    def _require_ready(self) -> Retriever:
        if not self.ready or self.retriever is None:
            raise NotReady("the model is still loading or warming up; retry shortly (see /readyz)")
        return self.retriever

    async def _in_pool(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # ---- what is served ---------------------------------------------------------------------------------------

    @property
    def persistent(self) -> bool:
        return self.config.index_dir is not None

    def describe(self) -> dict[str, Any]:
        """Model, backend, precision, device and whether the weights are random (`--random-weights`, or `tiny`
        without a checkpoint: rankings mean nothing), for /readyz and /v1/info."""
        retriever = self._require_ready()
        encoder = retriever.encoder
        backend = self.config.backend if self.config.export_dir is not None else "torch"
        return {"model": retriever.identity.model, "backend": backend,
                "precision": str(getattr(encoder, "precision", "fp32")), "device": self.config.device,
                "random_weights": retriever.identity.checkpoint_hash.startswith("random-seed-")}

    def laclip_info(self) -> dict[str, Any] | None:
        laclip = self._require_ready().laclip
        return None if laclip is None else laclip.to_dict()

    def counts(self) -> tuple[int, int]:
        """(images, texts) live in the index now."""
        snap = self._require_ready().index.snapshot()
        return snap.live("images"), snap.live("texts")

    async def stats(self) -> dict[str, Any]:
        return await self._in_pool(self._stats)

    def _stats(self) -> dict[str, Any]:
        stats = self._require_ready().stats()
        if self.cluster is not None:
            stats["shards"] = self.cluster.shard_rows()
        return stats

    # ---- tower batch functions (run in each batcher's worker thread) ------------------------------------------

    def _encode_text_rows(self, rows: list[torch.Tensor]) -> list[np.ndarray]:
        return list(self.retriever.encode_tokens(torch.stack(rows)))

    def _encode_image_views(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        views = torch.stack(items)
        return list(self.retriever.encode_views(views, rows_per_call=views.shape[0] * views.shape[1]))

    # ---- prepare and encode -----------------------------------------------------------------------------------

    async def _encode_texts(self, texts: Sequence[str]) -> TextQueryResult:
        """[D] embeddings per text via the text batcher; empty texts are InputErrors."""
        if not texts:
            raise InputError("no texts given (an empty list)")
        self.batchers["text"].check_capacity(len(texts))
        tokens = await self._in_pool(self.retriever.prepare_texts, list(texts))
        rows = await self.batchers["text"].submit_many(list(tokens.ids))
        return TextQueryResult(rows, tokens.truncated)

    async def _image_embeddings(self, image: Any, name: str = "image") -> np.ndarray:
        """[1 + K, D] (global, then crops) for one image, prepared in the pool."""
        self.batchers["image"].check_capacity(1)
        prepared = await self._prepare(image, name)
        return await self.batchers["image"].submit(prepared.views[0])

    async def _in_decoder(self, fn: Callable, *args: Any) -> Any:
        """fn(*args) in a thread that only waits on the decoding processes (never a preprocessing thread)."""
        return await asyncio.get_running_loop().run_in_executor(self._decode_waits, functools.partial(fn, *args))

    @contextlib.asynccontextmanager
    async def _decoded(self, image: Any, name: str) -> AsyncIterator[Any]:
        """The image decoded in a worker process under the time budget (as given when there is no pool), its
        pixels counted against the gate until the block ends."""
        pixels = 0
        if self.decoder is not None:
            image, pixels = await self._in_decoder(self.decoder.decode, image, name, self._gate)
        try:
            yield image
        finally:
            self._gate.release(pixels)

    async def _prepare(self, image: Any, name: str, thumbnails: bool = False) -> PreparedImages:
        """Decode (`_decoded`), then cut the views and the thumbnail in the preprocessing threads."""
        async with self._decoded(image, name) as decoded:
            return await self._in_pool(_named, name, functools.partial(self.retriever.prepare_images,
                                                                       thumbnails=thumbnails), [decoded])

    async def _check_request_pixels(self, uploads: Sequence[Any]) -> None:
        """413 before anything is decoded when the images' headers add up to more than --max-request-pixels."""
        if self.decoder is None:
            return
        sizes = await asyncio.gather(*(self._in_decoder(self.decoder.size, u.data, u.name) for u in uploads))
        total = sum(w * h for w, h in sizes)
        if total > self.config.max_request_pixels:
            raise HttpError(413, "PayloadTooLarge", f"{len(uploads)} images of {total} pixels in all exceed the "
                                                    f"limit of {self.config.max_request_pixels} decoded pixels per "
                                                    "request (--max-request-pixels): send fewer per request")

    async def encode_image(self, upload: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """(global [D], crops [K, D] or None) for one uploaded image."""
        retriever = self._require_ready()
        emb = await self._image_embeddings(upload.data, upload.name)
        return emb[0], (emb[1:] if retriever.laclip is not None else None)

    async def encode_text(self, texts: Sequence[str]) -> TextQueryResult:
        """[D] embeddings of texts, with truncation flags."""
        self._require_ready()
        return await self._encode_texts(texts)

    # ---- search ---------------------------------------------------------------------------------------------

    def _score(self, settings: Any) -> Any:
        """The request's query-time LACLIP settings over the server's (None: the server's own)."""
        laclip = self.retriever.laclip
        if settings is None or laclip is None:
            return None
        given = {k: v for k, v in settings.model_dump().items() if v is not None}
        return dataclasses.replace(laclip.score, **given)

    async def search_images(self, queries: Sequence[str], k: int, settings: Any = None, exact: bool = False,
                            negative: str | Sequence[str] | None = None, **options: Any) -> TextQueryResult:
        """Text -> image: one list of hits per query, best first. `negative` texts go through the text batcher;
        `options` (where, negative_weight, explain, collapse) are Retriever.search_image_embeddings'."""
        retriever = self._require_ready()
        score = self._score(settings)
        encoded = await self._encode_texts(queries)
        if negative is not None:
            options["negative"] = np.stack((await self._encode_texts(negative_texts(negative))).values)
        hits = await self._in_pool(retriever.search_image_embeddings, np.stack(encoded.values), k,
                                   exact=exact, score=score, **options)
        hits = [[decorate_hit(hit, self.config.iiif_viewer) for hit in row] for row in hits]  # payload["iiif"]
        return TextQueryResult(hits, encoded.truncated)

    async def search_texts(self, upload: Any, k: int, settings: Any = None, exact: bool = False,
                           where: dict | None = None, box: Sequence[float] | None = None) -> list[Hit]:
        """Image -> text: the hits for one uploaded image (only `box` of it, when given), best first (payloads
        carry the texts)."""
        retriever = self._require_ready()
        score = self._score(settings)
        emb = await self._image_embeddings(await self._region(upload, box), upload.name)
        crops = emb[None, 1:] if retriever.laclip is not None else None
        hits = await self._in_pool(retriever.search_text_embeddings, emb[None, 0], crops, k, exact=exact,
                                   score=score, where=where)
        return hits[0]

    async def search_similar(self, item_id: Id | None, upload: Any, k: int, exact: bool = False,
                             box: Sequence[float] | None = None, **options: Any) -> list[Hit]:
        """Image -> image, by a stored image's id (its stored vector, no re-encoding) or by an uploaded image (only
        `box` of it, when given); `options` (where, against, explain, collapse) are Retriever.search_similar's."""
        retriever = self._require_ready()
        if item_id is not None:
            self._known("images", check_id(item_id))
            return await self._in_pool(retriever.search_similar, item_id, k, exact=exact, box=box, **options)
        emb = await self._image_embeddings(await self._region(upload, box), upload.name)
        hits = await self._in_pool(retriever.search_similar_embeddings, emb[None, 0], k, exact=exact, **options)
        return hits[0]

    async def _region(self, upload: Any, box: Sequence[float] | None) -> Any:
        """The upload's bytes, or its decoded image cut to `box` (errors name the upload)."""
        if box is None:
            return upload.data
        async with self._decoded(upload.data, upload.name) as image:  # under the time budget, like every upload
            return await self._in_pool(_named, upload.name, self.retriever.region, image, box)

    async def duplicates(self, threshold: float, limit: int | None) -> dict[str, Any]:
        """Near-duplicate groups of the indexed images (computed once per commit and threshold)."""
        return await self._in_pool(self._require_ready().duplicates, threshold, limit)

    async def payload_keys(self, kind: str) -> list[dict[str, Any]]:
        """Keys seen in the payloads of the first 10,000 live rows of `kind`, with types and examples."""
        return await self._in_pool(payload_keys, self._require_ready().index.snapshot(), kind)

    async def thumbnail(self, item_id: str) -> bytes:
        retriever = self._require_ready()
        self._known("images", item_id)
        data = await self._in_pool(retriever.thumbnail, item_id)
        if data is None:
            raise NotFound(f"image {item_id!r} has no stored thumbnail")
        return data

    def _known(self, kind: str, item_id: Id) -> None:
        """NotFound (404) unless `item_id` is in the index."""
        index = self.retriever.index
        present = index.has_image if kind == "images" else index.has_text
        if not present(id_key(item_id)):
            raise NotFound(f"no {kind[:-1]} with id {item_id!r} in the index")

    # ---- index mutation -------------------------------------------------------------------------------------

    async def add_images(self, uploads: Sequence[Any], ids: Sequence[Id] | None,
                         payloads: Sequence[dict | None] | None) -> list[Id]:
        """Prepare (pool), encode (image batcher), then store durably (writer); all or nothing."""
        retriever = self._require_ready()
        self._check_new(uploads, ids, payloads, "images", retriever.index.has_image)
        self.batchers["image"].check_capacity(len(uploads))
        await self._check_request_pixels(uploads)
        views, thumbnails, geometries = [], [], []
        for start in range(0, len(uploads), ADD_CHUNK):  # memory follows the chunk, not the request
            chunk = uploads[start:start + ADD_CHUNK]
            prepared = await asyncio.gather(*(self._prepare(u.data, u.name, True) for u in chunk))
            views += await self.batchers["image"].submit_many([p.views[0] for p in prepared])
            thumbnails += [p.thumbnails[0] for p in prepared]
            geometries += [p.geometry for p in prepared]
        emb = ImageEmbeddings.of(np.stack(views), retriever.laclip is not None)
        names = [u.basename for u in uploads]
        geometry = None if any(g is None for g in geometries) else np.concatenate(geometries)
        # ids (default counters included) are taken in the writer, under the write lock
        return await self._write(lambda: retriever.store_images(emb, names, ids, payloads, thumbnails,
                                                                  geometry))

    async def add_texts(self, texts: Sequence[str], ids: Sequence[Id] | None,
                        payloads: Sequence[dict | None] | None) -> list[Id]:
        """Encode (text batcher), then store durably (writer); all or nothing."""
        retriever = self._require_ready()
        self._check_new(texts, ids, payloads, "texts", retriever.index.has_text)
        encoded = await self._encode_texts(texts)
        return await self._write(lambda: retriever.store_texts(texts, np.stack(encoded.values), ids, payloads))

    @staticmethod
    def _check_new(items: Sequence, ids: Sequence[Id] | None, payloads: Sequence | None, what: str,
                   present: Callable[[str], bool]) -> None:
        """Counts and ids checked before any decoding or encoding (the writer checks again, atomically)."""
        if not items:
            raise InputError(f"no {what} given (an empty list)")
        for name, values in (("ids", ids), ("payloads", payloads)):
            if values is not None and len(values) != len(items):
                raise InputError(f"{len(values)} {name} given for {len(items)} {what}")
        if ids is not None:
            check_ids(ids, present)

    async def delete(self, kind: str, ids: Sequence[Id]) -> int:
        """Delete images or texts by id, durably; every id must exist (404 naming the first that does not)."""
        retriever = self._require_ready()
        checked = check_ids(ids)
        remove = retriever.delete_images if kind == "images" else retriever.delete_texts

        def apply() -> int:
            for item in checked:
                self._known(kind, item)
            return remove(checked)

        return await self._write(apply)

    async def _write(self, apply: Callable[[], Any]) -> Any:
        """Run one write in the writer thread, one at a time; a failing disk is an IndexWriteError (500)."""
        async with self._write_lock:
            try:
                return await asyncio.get_running_loop().run_in_executor(self._writer, apply)
            except OSError as exc:
                log.exception("index write failed")
                raise IndexWriteError(f"the index could not be written ({exc}); nothing was changed") from exc


def _named(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), with an InputError's message naming the upload instead of the engine's `<N bytes>` placeholder."""
    try:
        return fn(*args)
    except InputError as exc:
        raise type(exc)(f"{name}: {_strip_repr(str(exc))}") from None


def _strip_repr(message: str) -> str:
    """An engine message about `<N bytes>` inputs, without that placeholder (the caller names the upload)."""
    head, sep, rest = message.partition(": ")
    return rest if sep and head.startswith("<") and head.endswith(">") else message
