"""`Retriever`: the Python API everything else (CLI, HTTP server, evaluation) is built on.

Every call runs the same stages, each a public method so the server can put its batchers around the encoder:
prepare (`prepare_images`: decode, views, thumbnails; `prepare_texts`: normalise, tokenize) -> encode
(`encode_views`, `encode_tokens`: a tower) -> add (`store_images` / `store_texts`: ids, the one payload rule, one
durable write) or score over one immutable index snapshot (`search_*_embeddings`) -> hits (id, score, payload).

Adds store through one payload rule (engine.payloads) and one id rule (engine.ids, with defaults from file
names); the server, the CLI and Ray jobs store through the same methods. The module is longer than ~400 lines
because the Retriever's stages are its methods: one class, a section per stage.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from .backends import Encoder, TorchEncoder
from .backends.base import encoder_device
from .backends.export_reader import BACKENDS
from .device_views import DeviceViewMaker
from .errors import IndexFormatError, InputError
from .ids import Id, check_ids, default_ids, id_key
from .duplicates import DEFAULT_DUPLICATE_THRESHOLD, DuplicateGroups, check_threshold, find_duplicates, groups_json
from .evidence import crop_evidence
from .index import AnnConfig, ImageRows, Index, IndexManifest, Snapshot
from .index.manifest import identity_mismatch
from .index.search import Found
from .index.thumbnails import make_thumbnail
from .laclip import LaclipConfig, ScoreConfig, crop_boxes
from .models import load_model
from .payloads import check_payloads, image_payloads, text_payloads
from .preprocess import (DEFAULT_CONTEXT_LENGTH, DEFAULT_MAX_PIXELS, ImageInput, ImageTransform,
                         TokenizedTexts, Tokenizer, content_seed, load_image)

VIEW_PATHS = ("auto", "pil", "device")  # how images become views: see Retriever.prepare_images


class Hit(NamedTuple):
    """One search result: the id, its score, its payload (a dict, or None) and, when asked for with
    `explain=True` on a LACLIP index, its crop evidence (engine.evidence)."""

    id: Id
    score: float
    payload: dict[str, Any] | None = None
    evidence: dict[str, Any] | None = None


@dataclass(frozen=True)
class ImageEmbeddings:
    """Global [n, D] and, with LACLIP, crop [n, K, D] embeddings of a batch of images."""

    global_: np.ndarray
    crops: np.ndarray | None

    @classmethod
    def of(cls, views: np.ndarray, crops: bool) -> "ImageEmbeddings":
        """From per-view embeddings [n, 1 + K, D] (the global view first); `crops`: keep the K crop rows."""
        return cls(np.ascontiguousarray(views[:, 0]), np.ascontiguousarray(views[:, 1:]) if crops else None)


@dataclass(frozen=True)
class PreparedImages:
    """What the image encoder needs for a batch: normalised views [n, 1 + K, 3, R, R] float32 (the global view,
    then the LACLIP crops), each image's ~256 px JPEG thumbnail when they were asked for, and its geometry
    [n, 3] (width, height, crop seed: where its crops lie) when known."""

    views: torch.Tensor
    thumbnails: list[bytes] | None
    geometry: np.ndarray | None = None


@dataclass(frozen=True)
class ModelIdentity:
    """Which weights produced the embeddings: an index must match it to be searched."""

    model: str
    checkpoint_hash: str
    checkpoint_path: str | None = None
    export_dir: str | None = None


class Retriever:
    """Encode, index and search images and Chinese texts with Chinese-CLIP, optionally with LACLIP scoring.

    `laclip` fixes the crops images are encoded with (CropConfig) and the default scoring (ScoreConfig); every
    search may pass its own `score=`. The index is in memory until `save(directory)` or `load(directory)` binds
    it to a directory; from then on every add and delete is durable before it returns."""

    def __init__(self, encoder: Encoder, identity: ModelIdentity, *, laclip: LaclipConfig | None = None,
                 batch_size: int = 32, context_length: int = DEFAULT_CONTEXT_LENGTH,
                 max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool | None = None, dtype: str = "float32",
                 ann: AnnConfig | None = None, views: str = "auto") -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if views not in VIEW_PATHS:
            raise InputError(f"views must be one of {', '.join(VIEW_PATHS)}, got {views!r}")
        self.encoder = encoder
        self.identity = identity
        self.laclip = laclip
        self.batch_size = batch_size
        self.max_pixels = max_pixels
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.transform = ImageTransform(encoder.input_resolution)
        self.tokenizer = Tokenizer(context_length)
        device = encoder_device(encoder)
        self.index = Index(self._manifest(dtype, ann or AnnConfig()), device=device)
        self.device_views = self._device_views(views, device)
        self.duplicate_threshold = DEFAULT_DUPLICATE_THRESHOLD  # what collapse="duplicates" groups by
        self._groups: tuple[tuple, DuplicateGroups] | None = None  # duplicate_groups' cache: (segments, groups)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None = None, model: str = "ViT-B-16", device: str = "cpu",
                        laclip: LaclipConfig | None = None, precision: str = "fp32", *, random_weights: bool = False,
                        **options: Any) -> "Retriever":
        """Load cn_clip weights (a path, or the official file for `model` when None) into the torch backend.

        `random_weights=True` builds seeded random weights for any model (benchmarks and trials only)."""
        loaded = load_model(checkpoint, model, random_weights)
        if precision == "auto":  # each tower's fastest precision on this CPU at the parity gate
            if torch.device(device).type != "cpu":
                raise InputError(f"precision 'auto' times CPU precisions; on {device!r} choose fp16, bf16 or "
                                 "bf16-compiled")
            from .backends.auto_precision import torch_auto_encoder

            encoder, _ = torch_auto_encoder(loaded.model, loaded.spec.input_resolution)
        else:
            encoder = TorchEncoder(loaded.model, loaded.spec.input_resolution, device=device, precision=precision)
        path = str(Path(checkpoint).resolve()) if checkpoint is not None else None
        return cls(encoder, ModelIdentity(model, loaded.checkpoint_hash, path), laclip=laclip, **options)

    @classmethod
    def from_export(cls, directory: str | Path, backend: str = BACKENDS[0], device: str = "cpu",
                    laclip: LaclipConfig | None = None, *, model: str | None = None,
                    backend_options: dict | None = None, **options: Any) -> "Retriever":
        """Serve the towers of a `python -m export` directory (onnxruntime or tensorrt), same API and index identity."""
        from .backends.export_reader import open_encoder

        encoder, manifest = open_encoder(directory, backend, device, model, **(backend_options or {}))
        options.setdefault("context_length", manifest.context_length)
        identity = ModelIdentity(manifest.model, manifest.checkpoint_hash, None, str(Path(directory).resolve()))
        return cls(encoder, identity, laclip=laclip, **options)

    @classmethod
    def load(cls, directory: str | Path, checkpoint: str | Path | None = None, device: str = "cpu", *,
             export: str | Path | None = None, backend: str = BACKENDS[0], backend_options: dict | None = None,
             **options: Any) -> "Retriever":
        """Open a saved index with the model, crop and scoring settings it records, and bind to it.

        The towers come from `checkpoint` (default: the path the index records) or from an `export` directory."""
        index = Index.open(directory, device=device)
        meta = index.manifest
        settings = dict(laclip=meta.laclip, context_length=meta.context_length, dtype=meta.dtype, ann=meta.ann)
        if export is not None:
            retriever = cls.from_export(export, backend, device, model=meta.model, backend_options=backend_options,
                                        **settings, **options)
        else:
            path = checkpoint if checkpoint is not None else meta.checkpoint_path
            retriever = cls.from_checkpoint(path, meta.model, device=device, **settings, **options)
        retriever.attach(index, source=str(directory))
        return retriever

    def _manifest(self, dtype: str, ann: AnnConfig) -> IndexManifest:
        return IndexManifest(self.identity.model, self.identity.checkpoint_hash, self.encoder.embed_dim,
                             self.laclip, self.identity.checkpoint_path, self.tokenizer.context_length,
                             export_dir=self.identity.export_dir, dtype=dtype, ann=ann)

    def attach(self, index: Index, source: str = "<index>") -> None:
        """Use `index`; refuse one made with another model, checkpoint, crop setting or context length.
        The retriever's own scoring settings become the index's defaults (re-pooled lazily, nothing re-encoded)."""
        theirs = index.manifest
        ours = self._manifest(theirs.dtype, theirs.ann)
        checks = [("model", ours.model, theirs.model), ("checkpoint hash", ours.checkpoint_hash,
                  theirs.checkpoint_hash), ("embedding size", ours.embed_dim, theirs.embed_dim),
                  ("context length", ours.context_length, theirs.context_length),
                  ("LACLIP crops", ours.crops, theirs.crops)]
        for what, mine, stored in checks:
            if mine != stored:
                raise identity_mismatch(source, what, stored, mine, theirs.checkpoint_path)
        index.manifest = theirs.with_laclip(self.laclip)
        self.index = index

    def save(self, directory: str | Path) -> Path:
        """Bind the index to `directory`: a full copy the first time, nothing when already bound there."""
        return self.index.save(directory)

    @property
    def directory(self) -> Path | None:
        """Where adds and deletes are written through to (None: in memory only)."""
        return self.index.directory

    # ---- encoding -------------------------------------------------------------------------------------------

    def _bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit="item", disable=not self.progress or total <= self.batch_size)

    def _batches(self, items: Sequence, desc: str) -> Iterator[Sequence]:
        with self._bar(len(items), desc) as bar:
            for start in range(0, len(items), self.batch_size):
                chunk = items[start:start + self.batch_size]
                yield chunk
                bar.update(len(chunk))

    # ---- prepare ------------------------------------------------------------------------------------------

    def prepare_texts(self, texts: Sequence[str]) -> TokenizedTexts:
        """cn_clip's text normalisation and tokenizer: token ids [n, context length] and truncation flags."""
        return self.tokenizer(texts)

    tokenize = prepare_texts

    def _device_views(self, views: str, device: str) -> DeviceViewMaker | None:
        """The view maker on the GPU ("device"; "auto": when a torch encoder runs on CUDA), else None (PIL)."""
        torch_on_cuda = isinstance(self.encoder, TorchEncoder) and torch.device(device).type == "cuda"
        if views == "device" or (views == "auto" and torch_on_cuda):
            crops = self.laclip.crops if self.laclip is not None else None
            return DeviceViewMaker(self.encoder.input_resolution, crops, device, self.max_pixels)
        return None

    def prepare_images(self, images: Sequence[ImageInput], *, thumbnails: bool = False) -> PreparedImages:
        """Decode each image (pixel limit), cut its views (global, then the K crops seeded by its content) and
        normalise them; with `thumbnails`, a ~256 px JPEG of each decoded image too. With device views
        (engine.device_views: nvJPEG, crops and resizing on the GPU) the views stay on the device."""
        if self.device_views is not None:
            made = self.device_views(list(images), thumbnails=thumbnails)
            return PreparedImages(made.views, made.thumbnails)
        decoded = [load_image(image, self.max_pixels) for image in images]
        views = [self.transform.normalise(self.resized_views(image)) for image in decoded]
        size = self.transform.resolution
        stacked = torch.stack(views) if views else torch.zeros((0, self.views_per_image, 3, size, size))
        geometry = np.array([(image.width, image.height, self._crop_seed(image)) for image in decoded],
                            np.int64).reshape(-1, 3)
        return PreparedImages(stacked, [make_thumbnail(image) for image in decoded] if thumbnails else None,
                              geometry)

    def _crop_seed(self, image: Any) -> int:
        """The per-image seed crop_boxes places random crops with (0 where it is not used)."""
        return content_seed(image) if self.laclip is not None and self.laclip.crop_mode == "random" else 0

    def region(self, image: ImageInput, box: Sequence[float]) -> Any:
        """The decoded image cut to `box` = [x0, y0, x1, y1] in its pixels (a region query encodes only that)."""
        decoded = load_image(image, self.max_pixels)
        return decoded.crop(check_box(box, decoded.width, decoded.height))

    def resized_views(self, image: ImageInput) -> torch.Tensor:
        """[1 + K, 3, R, R] uint8: the views of `prepare_images` before normalisation (`self.transform.normalise`),
        for stages that ship uint8 (Ray)."""
        decoded = load_image(image, self.max_pixels)
        views = [self.transform.resized(decoded).unsqueeze(0)]
        if self.laclip is not None:
            boxes = crop_boxes(decoded.width, decoded.height, self.laclip.crops, content_seed(decoded))
            views.append(self.transform.resized_crops(decoded, boxes))
        return torch.cat(views)

    @property
    def views_per_image(self) -> int:
        """1 + K: the global view plus the LACLIP crops."""
        return 1 + (self.laclip.num_crops if self.laclip else 0)

    # ---- encode -------------------------------------------------------------------------------------------

    def encode_tokens(self, ids: torch.Tensor) -> np.ndarray:
        """[n, D] float32 L2-normalised text embeddings of token ids [n, L] (one tower call)."""
        return self.encoder.encode_texts(ids)

    def encode_views(self, views: torch.Tensor, *, rows_per_call: int | None = None) -> np.ndarray:
        """[n, 1 + K, D] float32 embeddings of prepared views [n, 1 + K, 3, R, R], `rows_per_call` views per
        tower call (default: the batch size)."""
        n, per = views.shape[:2]
        flat = views.reshape(n * per, *views.shape[2:])
        step = rows_per_call or self.batch_size
        rows = [self.encoder.encode_images(flat[i:i + step]) for i in range(0, len(flat), step)]
        out = np.concatenate(rows) if rows else np.zeros((0, self.encoder.embed_dim), np.float32)
        return out.reshape(n, per, self.encoder.embed_dim)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[n, D] float32 L2-normalised text embeddings."""
        texts = _as_list(texts, str)
        out = [self.encode_tokens(self.prepare_texts(chunk).ids) for chunk in self._batches(texts, "texts")]
        return np.concatenate(out) if out else np.zeros((0, self.encoder.embed_dim), np.float32)

    def encode_image_views(self, images: Sequence[ImageInput], *, thumbnails: list[bytes] | None = None,
                           geometry: list[np.ndarray | None] | None = None) -> ImageEmbeddings:
        """Global and crop embeddings; each decoded image's crops are seeded by its content. Images are prepared
        one batch at a time; `thumbnails` and `geometry`, when given, receive each batch's thumbnails and
        geometry."""
        images = _as_list(images, None)
        grouped = []
        for chunk in self._batches(images, "images"):
            prepared = self.prepare_images(chunk, thumbnails=thumbnails is not None)
            if thumbnails is not None:
                thumbnails.extend(prepared.thumbnails)
            if geometry is not None:
                geometry.append(prepared.geometry)
            grouped.append(self.encode_views(prepared.views))
        views = np.concatenate(grouped) if grouped else np.zeros((0, self.views_per_image, self.encoder.embed_dim),
                                                                 np.float32)
        return ImageEmbeddings.of(views, self.laclip is not None)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[n, D] float32 L2-normalised global image embeddings (no crops are encoded)."""
        images = _as_list(images, None)
        out = [self.encoder.encode_images(torch.stack([self.transform(load_image(i, self.max_pixels))
                                                       for i in chunk]))
               for chunk in self._batches(images, "images")]
        return np.concatenate(out) if out else np.zeros((0, self.encoder.embed_dim), np.float32)

    # ---- indexing -------------------------------------------------------------------------------------------

    def add_images(self, images: Sequence[ImageInput], ids: Sequence[Id] | None = None,
                   payloads: Sequence[dict | None] | None = None) -> list[Id]:
        """Encode and index images (all or nothing). Ids default to file stems for paths, counters otherwise;
        payloads follow the module's payload rule; a ~256 px JPEG thumbnail is stored with each image."""
        images = _as_list(images, None)
        names = [Path(item).name if isinstance(item, (str, Path)) else None for item in images]
        ids = self.new_ids(names, ids, "images")
        payloads = check_payloads(payloads, len(images))
        thumbs: list[bytes] = []
        geometry: list[np.ndarray | None] = []
        emb = self.encode_image_views(images, thumbnails=thumbs, geometry=geometry)
        known = None if any(g is None for g in geometry) else np.concatenate(geometry)
        return self.store_images(emb, names, ids, payloads, thumbs, known)

    def add_texts(self, texts: Sequence[str], ids: Sequence[Id] | None = None,
                  payloads: Sequence[dict | None] | None = None) -> list[Id]:
        """Encode and index texts (all or nothing); ids default to counters; each payload's "text" is the text."""
        texts = _as_list(texts, str)
        ids = self.new_ids(texts, ids, "texts")
        payloads = check_payloads(payloads, len(texts))
        return self.store_texts(texts, self.encode_texts(texts), ids, payloads)

    # ---- add (the last stage of add_images / add_texts, and what the server's writer runs) ------------------

    def store_images(self, emb: ImageEmbeddings, names: Sequence[str | None], ids: Sequence[Id] | None = None,
                     payloads: Sequence[dict | None] | None = None, thumbnails: Sequence[bytes | None] | None = None,
                     geometry: np.ndarray | None = None) -> list[Id]:
        """Index encoded images durably. `names`: each image's file name (its payload "source" and default id
        stem) or None; ids default as `new_ids` gives them (taken here, so a caller holding its write lock gets
        counters no other write takes); `geometry` [n, 3] (PreparedImages.geometry) places crop evidence."""
        ids = self.new_ids(names, ids, "images")
        return self.index.add(images=ImageRows(ids, emb.global_, emb.crops, image_payloads(names, payloads),
                                               thumbnails, geometry))

    def store_texts(self, texts: Sequence[str], embeddings: np.ndarray, ids: Sequence[Id] | None = None,
                    payloads: Sequence[dict | None] | None = None) -> list[Id]:
        """Index encoded texts durably, each payload carrying its text under "text"."""
        ids = self.new_ids(texts, ids, "texts")
        return self.index.add_texts(ids, embeddings, text_payloads(texts, payloads))

    def add_image_embeddings(self, ids: Sequence[Id], global_: np.ndarray, crops: np.ndarray | None = None,
                             payloads: Sequence[dict | None] | None = None,
                             thumbnails: Sequence[bytes | None] | None = None) -> list[Id]:
        """Index images encoded elsewhere: global [n, D], crops [n, K, D] for a LACLIP index (checked; rows that
        are not unit length are re-normalised with a warning)."""
        return self.index.add_images(ids, global_, crops, payloads, thumbnails)

    def add_text_embeddings(self, ids: Sequence[Id], embeddings: np.ndarray,
                            payloads: Sequence[dict | None] | None = None) -> list[Id]:
        """Index texts encoded elsewhere: embeddings [n, D] (checked and re-normalised like images)."""
        return self.index.add_texts(ids, embeddings, payloads)

    def delete_images(self, ids: Sequence[Id]) -> int:
        """Delete images by id (an unknown id is an InputError and nothing is deleted); returns the count."""
        return self.index.delete_images(ids)

    def delete_texts(self, ids: Sequence[Id]) -> int:
        """Delete texts by id (an unknown id is an InputError and nothing is deleted); returns the count."""
        return self.index.delete_texts(ids)

    def refresh(self) -> bool:
        """Follow another process's newer commit of this index now (reads also do it at most every
        `index.refresh_interval_s`); True when the index changed."""
        return self.index.refresh()

    def compact(self) -> None:
        """Merge all segments into one and drop deleted rows (automatic compaction handles the usual case)."""
        self.index.compact()

    def stats(self) -> dict[str, Any]:
        """Counts, segments, deleted rows, bytes on disk, ANN state."""
        return self.index.stats()

    def thumbnail(self, item: Id) -> bytes | None:
        """JPEG bytes of a stored image's thumbnail (None if it has none); unknown id: InputError."""
        return self.index.thumbnail(item)

    def image_payload(self, item: Id) -> dict[str, Any] | None:
        return self.index.payload("images", item)

    def text_payload(self, item: Id) -> dict[str, Any] | None:
        return self.index.payload("texts", item)

    def new_ids(self, items: Sequence, given: Sequence[Id] | None, what: str) -> list[Id]:
        """Validated ids for new `what` ("images" or "texts"): `given`, or defaults (for images, the stem of each
        item that is a file name or path; else counters on from the largest int id). A caller that adds later
        should hold its write lock meanwhile."""
        snap = self.index.snapshot()
        ids = given if given is not None else default_ids(items, what, 1 + snap.max_int_id(what))
        checked = check_ids(ids, lambda key: snap.contains(what, key))
        if len(checked) != len(items):
            raise InputError(f"{len(checked)} ids given for {len(items)} {what}")
        return checked

    # ---- search ---------------------------------------------------------------------------------------------

    def search_images(self, query: str | Sequence[str], k: int = 10, *, exact: bool = False,
                      score: ScoreConfig | None = None, where: dict | None = None,
                      negative: str | Sequence[str] | None = None, negative_weight: float = 0.5,
                      explain: bool = False, collapse: str | None = None) -> list[Hit] | list[list[Hit]]:
        """Text -> image. A str gives its hits; a list of str gives one list of hits per query. `where`: a payload
        filter; `negative`: text(s) whose best score, times `negative_weight`, is subtracted from each image's;
        `explain`: crop evidence on each hit; `collapse="duplicates"`: the best hit of each near-duplicate group."""
        single = isinstance(query, str)
        queries = [query] if single else _as_list(query, str)
        check_k(k, self.index.snapshot().live("images"), "images")
        negatives = None if negative is None else self.encode_texts(negative_texts(negative))
        hits = self.search_image_embeddings(self.encode_texts(queries), k, exact=exact, score=score, where=where,
                                            negative=negatives, negative_weight=negative_weight, explain=explain,
                                            collapse=collapse)
        return hits[0] if single else hits

    def search_texts(self, image: ImageInput | Sequence[ImageInput], k: int = 10, *, exact: bool = False,
                     score: ScoreConfig | None = None, where: dict | None = None,
                     box: Sequence[float] | None = None) -> list[Hit] | list[list[Hit]]:
        """Image -> text. One image gives its hits; a list of images gives one list of hits per image. `box`
        [x0, y0, x1, y1] (pixels): only that region of each image is encoded."""
        single = not isinstance(image, (list, tuple))
        images = [image] if single else list(image)
        check_k(k, self.index.snapshot().live("texts"), "texts")
        if box is not None:
            images = [self.region(item, box) for item in images]
        emb = self.encode_image_views(images)
        hits = self.search_text_embeddings(emb.global_, emb.crops, k, exact=exact, score=score, where=where)
        return hits[0] if single else hits

    def search_image_embeddings(self, text_vectors: np.ndarray, k: int = 10, *, exact: bool = False,
                                score: ScoreConfig | None = None, where: dict | None = None,
                                negative: np.ndarray | None = None, negative_weight: float = 0.5,
                                explain: bool = False, collapse: str | None = None) -> list[list[Hit]]:
        """Top-k images for each text vector [Q, D] (L2-normalised) under `score` (None: the retriever's own);
        `negative`: text vectors [N, D]; the other options as in search_images."""
        t = _query_vectors(text_vectors, self.encoder.embed_dim, "text vectors")
        snap = self.index.snapshot()
        check_k(k, snap.live("images"), "images")
        score = self._score(score)
        return self._image_hits(
            t, k, snap, lambda n: self.index.search_images(t, n, score=score, exact=exact, snapshot=snap,
                                                           where=where, negative=negative,
                                                           negative_weight=negative_weight),
            score=score, explain=explain, collapse=collapse)

    def search_text_embeddings(self, global_: np.ndarray, crops: np.ndarray | None = None, k: int = 10, *,
                               exact: bool = False, score: ScoreConfig | None = None,
                               where: dict | None = None) -> list[list[Hit]]:
        """Top-k texts for each query image (global [Q, D], crops [Q, K, D] for LACLIP scoring)."""
        g = _query_vectors(global_, self.encoder.embed_dim, "image vectors")
        snap = self.index.snapshot()
        check_k(k, snap.live("texts"), "texts")
        found = self.index.search_texts(g, crops, k, score=self._score(score), exact=exact, snapshot=snap,
                                        where=where)
        return to_hits(found, snap, "texts")

    def search_similar(self, id_or_image: Id | ImageInput, k: int = 10, *, exact: bool = False,
                       where: dict | None = None, box: Sequence[float] | None = None, against: str = "global",
                       explain: bool = False, collapse: str | None = None) -> list[Hit]:
        """Image -> image by global embeddings. An indexed id uses its stored vector (nothing re-encoded) and is
        left out of its own hits; anything else is an image (path, bytes, PIL), cut to `box` when given.
        `against="crops"`: each image scores by its best-matching crop (a fragment finds what contains it)."""
        snap = self.index.snapshot()
        by_id = isinstance(id_or_image, (int, str)) and not isinstance(id_or_image, bool) and \
            snap.contains("images", id_key(id_or_image))
        options = dict(exact=exact, where=where, against=against, explain=explain, collapse=collapse)
        if by_id:
            if box is not None:
                raise InputError("box cuts a query image; a stored id is searched by its stored vector")
            vector, _ = self.index.vector("images", id_or_image)
            check_k(k, snap.live("images") - 1, "other images")
            itself = snap.locate("images", id_key(id_or_image))
            return self._similar(vector[None], k, snap, exclude=itself, **options)[0]
        if isinstance(id_or_image, int) and not isinstance(id_or_image, bool):
            raise InputError(f"unknown image id {id_or_image!r}")
        check_k(k, snap.live("images"), "images")
        image = id_or_image if box is None else self.region(id_or_image, box)
        return self._similar(self.encode_images([image]), k, snap, **options)[0]

    def search_similar_embeddings(self, global_: np.ndarray, k: int = 10, *, exact: bool = False,
                                  where: dict | None = None, against: str = "global", explain: bool = False,
                                  collapse: str | None = None) -> list[list[Hit]]:
        """Top-k images for each query image's global vector [Q, D]: plain CLIP (global vectors alone) whatever
        the scoring settings, as image -> image compares like with like; or, against="crops", by best crop."""
        g = _query_vectors(global_, self.encoder.embed_dim, "image vectors")
        snap = self.index.snapshot()
        check_k(k, snap.live("images"), "images")
        return self._similar(g, k, snap, exact=exact, where=where, against=against, explain=explain,
                             collapse=collapse)

    def _similar(self, g: np.ndarray, k: int, snap: Snapshot, *, exact: bool, where: dict | None, against: str,
                 explain: bool, collapse: str | None, exclude: tuple[int, int] | None = None) -> list[list[Hit]]:
        if against not in AGAINST:
            raise InputError(f"against must be one of {', '.join(AGAINST)}, got {against!r}")
        if against == "crops":
            def search(n: int) -> list[Found]:
                return self.index.search_crops(g, n, snapshot=snap, where=where)
        else:
            def search(n: int) -> list[Found]:
                return self.index.search_images(g, n, score=None, exact=exact, snapshot=snap, where=where)
        return self._image_hits(g, k, snap, search, score=None, explain=explain, collapse=collapse,
                                against_crops=against == "crops", exclude=exclude)

    def _image_hits(self, q: np.ndarray, k: int, snap: Snapshot, search: Any, *, score: ScoreConfig | None,
                    explain: bool, collapse: str | None, against_crops: bool = False,
                    exclude: tuple[int, int] | None = None) -> list[list[Hit]]:
        """`search(n)`'s top hits, without `exclude` (a query's own row), the best of each duplicate group with
        `collapse`, evidence with `explain`; at most k per query."""
        if collapse not in COLLAPSE:
            raise InputError(f"collapse must be None or 'duplicates', got {collapse!r}")
        if not isinstance(explain, bool):
            raise InputError(f"explain must be true or false, got {explain!r}")
        groups = self.duplicate_groups(snap, self.duplicate_threshold) if collapse else None
        extra = min(MAX_COLLAPSED, sum(len(g) - 1 for g in groups.groups)) if groups else 0
        wanted = min(snap.live("images"), k + extra + (exclude is not None))
        group_of = groups.group_of if groups else None
        found = [_kept(f, k, exclude, group_of) for f in search(wanted)]
        hits = to_hits(found, snap, "images")
        if not explain or not self.index.has_crops:
            return hits
        return [self._explained(h, f, snap, q[i], score, against_crops) for i, (h, f) in enumerate(zip(hits, found))]

    def _explained(self, hits: list[Hit], found: Found, snap: Snapshot, q: np.ndarray, score: ScoreConfig | None,
                   against_crops: bool) -> list[Hit]:
        parts = [snap.part_at("images", int(p)) for p in found.positions]
        rows = [int(r) for r in found.rows]
        if not rows:
            return hits
        g = np.stack([np.asarray(part.vectors[r], np.float32) for part, r in zip(parts, rows)])
        c = np.stack([np.asarray(part.crops[r], np.float32) for part, r in zip(parts, rows)])
        geometry = np.concatenate([part.geometry_rows(np.array([r])) for part, r in zip(parts, rows)])
        evidence = crop_evidence(q, g, c, geometry, snap.manifest.laclip.crops, score, against_crops)
        return [h._replace(evidence=e) for h, e in zip(hits, evidence)]

    def duplicate_groups(self, snapshot: Snapshot | None = None,
                         threshold: float = DEFAULT_DUPLICATE_THRESHOLD) -> DuplicateGroups:
        """Near-duplicate groups of the live images (engine.duplicates), computed once per commit and threshold."""
        snap = snapshot or self.index.snapshot()
        threshold = check_threshold(threshold)
        cached = self._groups
        if cached is None or cached[0] is not snap.segments or cached[1].threshold != threshold:
            cached = self._groups = (snap.segments, find_duplicates(snap, threshold))
        return cached[1]

    def duplicates(self, threshold: float = DEFAULT_DUPLICATE_THRESHOLD, limit: int | None = None) -> dict[str, Any]:
        """{"threshold", "groups": [{"size", "members": [id, ...]}] (largest first), "images"}."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InputError(f"limit must be a positive int, got {limit!r}")
        snap = self.index.snapshot()
        return groups_json(self.duplicate_groups(snap, threshold), snap, limit)

    def _score(self, score: ScoreConfig | LaclipConfig | None) -> ScoreConfig | None:
        """The scoring for one call: `score`, else the retriever's own (None: plain CLIP)."""
        if isinstance(score, LaclipConfig):
            return score.score
        if score is not None and not isinstance(score, ScoreConfig):
            raise InputError(f"score must be a ScoreConfig, got {type(score).__name__}")
        return score if score is not None else (self.laclip.score if self.laclip else None)


AGAINST = ("global", "crops")
COLLAPSE = (None, "duplicates")
MAX_COLLAPSED = 1000  # extra hits fetched so that collapsing still leaves k (more duplicates: fewer hits)
MAX_NEGATIVES = 64


def _kept(found: Found, k: int, exclude: tuple[int, int] | None,
          group_of: dict[tuple[int, int], int] | None) -> Found:
    """The first k hits that are not `exclude`, and (with `group_of`) not behind a better hit of their group."""
    keep, seen = [], set()
    for i, (p, r) in enumerate(zip(found.positions.tolist(), found.rows.tolist())):
        if (p, r) == exclude:
            continue
        group = group_of.get((p, r)) if group_of else None
        if group is not None:
            if group in seen:
                continue
            seen.add(group)
        keep.append(i)
        if len(keep) == k:
            break
    return Found(found.scores[keep], found.positions[keep], found.rows[keep])


def check_box(box: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1] (numbers, rounded to pixels) inside a width x height image, with x0 < x1 and y0 < y1."""
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise InputError(f"box must be [x0, y0, x1, y1] (4 numbers, pixels), got {box!r}")
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InputError(f"box {list(box)} is not a non-empty region inside the {width}x{height} image "
                         "(0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    return x0, y0, x1, y1


def check_k(k: int, size: int, what: str) -> None:
    """k must be an int in 1..size (the number of indexed `what`)."""
    if size == 0:
        raise InputError(f"the index holds no {what}; add some first")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
        raise InputError(f"k must be an int in 1..{size} (indexed {what}), got {k!r}")


def _query_vectors(vectors: Any, dim: int, what: str) -> np.ndarray:
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: not a numeric array ({exc})") from None
    if array.ndim != 2 or array.shape[1] != dim or not len(array):
        raise InputError(f"{what}: expected shape [Q >= 1, {dim}], got {list(array.shape)}")
    if not np.isfinite(array).all():
        raise InputError(f"{what}: NaN or infinite values")
    return array


def to_hits(found: list[Found], snap: Snapshot, kind: str) -> list[list[Hit]]:
    """Search results as lists of Hit(id, score, payload)."""
    out = []
    for f in found:
        parts = [snap.part_at(kind, int(p)) for p in f.positions]
        out.append([Hit(part.id_at(int(r)), float(v), part.payload(int(r)))
                    for part, v, r in zip(parts, f.scores, f.rows)])
    return out


def negative_texts(negative: str | Sequence[str]) -> list[str]:
    """One negative text or a non-empty list of them."""
    texts = [negative] if isinstance(negative, str) else _as_list(negative, str)
    if not texts or len(texts) > MAX_NEGATIVES or not all(isinstance(t, str) and t for t in texts):
        raise InputError(f"negative must be a non-empty text or a list of 1..{MAX_NEGATIVES} of them, "
                         f"got {negative!r}")
    return texts


def _as_list(items: Union[Sequence, object], kind: type | None) -> list:
    """A list of inputs; a bare str where a list of texts is expected is an error, not a list of characters."""
    if isinstance(items, (str, bytes)) and kind is str:
        raise InputError("expected a list of texts, got a single str (wrap it in a list)")
    if isinstance(items, (str, bytes, Path)) or not hasattr(items, "__len__"):
        if kind is None:
            return [items]
        raise InputError(f"expected a list, got {type(items).__name__}")
    return list(items)
