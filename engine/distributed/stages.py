"""The three stages of an indexing job, as callables over column batches (dicts of numpy arrays, Ray Data's
"numpy" batch format), so the single-process run and the Ray run execute exactly the same code:

prepare (CPU: read bytes, decode, LACLIP crops, thumbnail) -> encode (one model per worker) -> write (one
segment per batch, not visible until the driver publishes it).

A bad image never raises: its row carries a `problem` (a JSON `Problem`) and zero pixels, later stages pass
it through, and the driver decides (fail the job, or skip and report with --skip-bad).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ImageDecodeError, InputError
from ..index.thumbnails import make_thumbnail
from ..laclip import LaclipConfig
from ..models import get_spec
from ..preprocess import DEFAULT_MAX_PIXELS, load_image
from ..retriever import ModelIdentity, Retriever
from ..sources import ImageRef, open_all
from .watchdog import beating

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class EncoderSpec:
    """What every worker needs to rebuild the same towers and preprocessing: small and picklable."""

    model: str
    checkpoint: str | None = None
    random_weights: bool = False
    laclip: LaclipConfig | None = None
    precision: str = "fp32"
    batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def views(self) -> int:
        """Views encoded per image: the global one plus K crops."""
        return 1 + (self.laclip.num_crops if self.laclip is not None else 0)

    def retriever(self, device: str = "cpu") -> Retriever:
        """A Retriever with the towers loaded on `device`."""
        return Retriever.from_checkpoint(self.checkpoint, model=self.model, device=device, laclip=self.laclip,
                                         precision=self.precision, random_weights=self.random_weights,
                                         batch_size=self.batch_size, max_pixels=self.max_pixels, progress=False)

    def preparer(self) -> Retriever:
        """A Retriever without towers (no weights loaded): its `resized_views` stage is all the prepare stage runs."""
        spec = get_spec(self.model)
        encoder = _NoTowers(int(spec.config()["embed_dim"]), spec.input_resolution)
        return Retriever(encoder, ModelIdentity(self.model, ""), laclip=self.laclip, batch_size=self.batch_size,
                         max_pixels=self.max_pixels, progress=False)


@functools.lru_cache(maxsize=4)
def _preparer(spec: EncoderSpec) -> Retriever:
    """One tower-less Retriever per worker process and spec (a Ray task unpickles a fresh stage per batch)."""
    return spec.preparer()


class _NoTowers:
    """The shape of a model's towers without the towers: enough to build its image transform."""

    def __init__(self, embed_dim: int, input_resolution: int) -> None:
        self.embed_dim = embed_dim
        self.input_resolution = input_resolution

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        raise RuntimeError("the prepare stage has no towers (encode runs in the encode stage)")

    encode_texts = encode_images


def ref_rows(refs: list[ImageRef]) -> list[dict[str, Any]]:
    """ImageRefs as plain rows (what a Ray dataset is made of)."""
    return [{"id": r.id, "where": r.where, "file": r.file, "kind": r.kind, "offset": r.offset, "size": r.size,
             "line": -1 if r.line is None else r.line, "payload": json.dumps(r.payload, ensure_ascii=False)}
            for r in refs]


def ref_columns(refs: list[ImageRef]) -> Batch:
    """ImageRefs as one column batch (what the single-process run feeds the prepare stage)."""
    rows = ref_rows(refs)
    return {key: np.array([row[key] for row in rows], dtype=object) for key in rows[0]} if rows else {}


def _ref(batch: Batch, i: int) -> ImageRef:
    line = int(batch["line"][i])
    return ImageRef(str(batch["id"][i]), str(batch["where"][i]), str(batch["file"][i]), str(batch["kind"][i]),
                    int(batch["offset"][i]), int(batch["size"][i]), None if line < 0 else line)


class PrepareStage:
    """Read and decode each image, make its [1 + K, 3, R, R] views with the engine's own preprocessing, as uint8
    before normalisation: a quarter of the bytes float32 pixels would take through Ray's object store."""

    def __init__(self, spec: EncoderSpec, beats: Any = None) -> None:
        self.spec = spec
        self.beats = beats  # a Heartbeats actor on Ray (engine.distributed.watchdog), else None

    def __call__(self, batch: Batch) -> Batch:
        with beating(self.beats, "prepare", batch):
            return self._prepare(batch)

    def _prepare(self, batch: Batch) -> Batch:
        preparer = _preparer(self.spec)
        n = len(batch["id"])
        resolution = preparer.transform.resolution
        pixels = np.zeros((n, self.spec.views, 3, resolution, resolution), np.uint8)
        thumbnails = np.empty(n, dtype=object)
        problems = np.full(n, "", dtype=object)
        refs = [_ref(batch, i) for i in range(n)]
        for i, (ref, source) in enumerate(zip(refs, open_all(refs))):  # IIIF images fetched concurrently
            try:
                if isinstance(source, InputError):  # unreadable or unreachable: a problem of this image
                    raise source if isinstance(source, ImageDecodeError) else ImageDecodeError(str(source))
                image = load_image(source, self.spec.max_pixels)
                pixels[i] = preparer.resized_views(image).numpy()
                thumbnails[i] = make_thumbnail(image)
            except ImageDecodeError as exc:
                problems[i] = json.dumps(ref.problem(exc).to_dict(), ensure_ascii=False)
                thumbnails[i] = b""
        return {"id": batch["id"], "payload": batch["payload"], "thumbnail": thumbnails, "problem": problems,
                "pixels": pixels}


class EncodeStage:
    """One model per worker: the views of each good row normalised and through the image tower, grouped back
    per image."""

    def __init__(self, spec: EncoderSpec, device: str | None = None, threads: int | None = None,
                 beats: Any = None) -> None:
        self.beats = beats
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads is not None:
            torch.set_num_threads(threads)
        self.spec = spec
        self.retriever = spec.retriever(device)

    def __call__(self, batch: Batch) -> Batch:
        with beating(self.beats, "encode", batch):
            return self._encode(batch)

    def _encode(self, batch: Batch) -> Batch:
        pixels = batch.pop("pixels")
        n, views = pixels.shape[:2]
        dim = self.retriever.encoder.embed_dim
        embeddings = np.zeros((n, views, dim), np.float32)
        good = np.flatnonzero(batch["problem"] == "")
        if good.size:
            flat = torch.from_numpy(np.ascontiguousarray(pixels[good]).reshape(-1, *pixels.shape[2:]))
            step, normalise = self.spec.batch_size, self.retriever.transform.normalise
            rows = [self.retriever.encoder.encode_images(normalise(flat[i:i + step]))
                    for i in range(0, len(flat), step)]
            embeddings[good] = np.concatenate(rows).reshape(good.size, views, dim)
        batch["global"] = np.ascontiguousarray(embeddings[:, 0])
        if views > 1:
            batch["crops"] = np.ascontiguousarray(embeddings[:, 1:])
        return batch


class WriteStage:
    """Write the good rows of a batch as one unpublished segment; report the segment and the batch's problems."""

    def __init__(self, directory: str | Path, beats: Any = None) -> None:
        self.directory = str(directory)
        self.beats = beats

    def __call__(self, batch: Batch) -> Batch:
        with beating(self.beats, "write", batch):
            return self._write(batch)

    def _write(self, batch: Batch) -> Batch:
        from ..index import ImageRows, write_segment

        good = np.flatnonzero(batch["problem"] == "")
        problems = [json.loads(p) for p in batch["problem"] if p]
        ref = None
        if good.size:
            crops = batch["crops"][good] if "crops" in batch else None
            rows = ImageRows([str(i) for i in batch["id"][good]], batch["global"][good], crops,
                             [json.loads(p) for p in batch["payload"][good]],
                             [bytes(t) for t in batch["thumbnail"][good]])
            ref = write_segment(self.directory, images=rows)
        return {"segment": np.array([ref], dtype=object), "count": np.array([good.size]),
                "problems": np.array([json.dumps(problems, ensure_ascii=False)], dtype=object)}
