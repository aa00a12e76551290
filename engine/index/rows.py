"""Rows to add (ImageRows, TextRows) and their complete validation, done before anything is written.

Vectors must have the index's dimension and be finite; rows that are not unit length are re-normalised with a
warning. Payloads are JSON objects (at most MAX_PAYLOAD_BYTES encoded); thumbnails are JPEG bytes. Every error
names the row.
"""
from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..ids import Id, check_ids
from .manifest import IndexManifest

log = logging.getLogger(__name__)

MAX_PAYLOAD_BYTES = 64 * 1024
MAX_THUMBNAIL_BYTES = 1 << 20
UNIT_TOLERANCE = 1e-3
_CHECK_ROWS = 65536


@dataclass(frozen=True)
class ImageRows:
    """Images to store: global [n, D], crops [n, K, D] for a LACLIP index, optional payloads and JPEG thumbnails,
    and optional geometry [n, 3] (width, height, crop seed of each decoded image: its crop boxes, for evidence)."""

    ids: Sequence[Id]
    global_: np.ndarray
    crops: np.ndarray | None = None
    payloads: Sequence[dict[str, Any] | None] | None = None
    thumbnails: Sequence[bytes | None] | None = None
    geometry: np.ndarray | None = None


@dataclass(frozen=True)
class TextRows:
    """Texts to store: embeddings [n, D] and optional payloads."""

    ids: Sequence[Id]
    embeddings: np.ndarray
    payloads: Sequence[dict[str, Any] | None] | None = None


@dataclass(frozen=True)
class CheckedRows:
    """Validated rows of one kind: ids, unit vectors [n, D], crops or None, encoded payloads and thumbnails."""

    kind: str
    ids: list[Id]
    vectors: np.ndarray
    crops: np.ndarray | None
    payloads: list[bytes]
    thumbnails: list[bytes] | None
    geometry: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def check_image_rows(rows: ImageRows, manifest: IndexManifest,
                     present: Callable[[str], bool] = lambda key: False) -> CheckedRows:
    """Validate images for `manifest`'s index; `present(key)` tells whether an id is already stored."""
    ids = check_ids(rows.ids, present)
    n, d, k = len(ids), manifest.embed_dim, manifest.num_crops
    vectors = check_vectors("global image embeddings", rows.global_, (n, d))
    crops = None
    if k:
        if rows.crops is None:
            raise InputError(f"this LACLIP index needs crop embeddings [n, {k}, {d}] for every image")
        crops = check_vectors("crop embeddings", rows.crops, (n, k, d))
    elif rows.crops is not None:
        raise InputError("this index has no LACLIP crops; pass crops=None")
    thumbnails = None if rows.thumbnails is None else check_thumbnails(rows.thumbnails, n)
    geometry = None if rows.geometry is None else check_geometry(rows.geometry, n)
    return CheckedRows("images", ids, vectors, crops, encode_payloads(rows.payloads, n), thumbnails, geometry)


def check_text_rows(rows: TextRows, manifest: IndexManifest,
                    present: Callable[[str], bool] = lambda key: False) -> CheckedRows:
    """Validate texts for `manifest`'s index; `present(key)` tells whether an id is already stored."""
    ids = check_ids(rows.ids, present)
    vectors = check_vectors("text embeddings", rows.embeddings, (len(ids), manifest.embed_dim))
    return CheckedRows("texts", ids, vectors, None, encode_payloads(rows.payloads, len(ids)), None)


def check_vectors(what: str, array: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`array` if it has `shape`, is finite and unit length along the last axis; re-normalised (with a warning)
    when some rows are not unit length. Checked in chunks, so a memory-mapped input is not copied when valid."""
    if not isinstance(array, np.ndarray):
        try:
            array = np.asarray(array, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{what}: not a numeric array ({exc})") from None
    if array.dtype.kind != "f":
        raise InputError(f"{what}: expected floating-point values, got dtype {array.dtype}")
    if tuple(array.shape) != shape:
        raise InputError(f"{what}: expected shape {list(shape)}, got {list(array.shape)}")
    off_unit = False
    for start in range(0, shape[0], _CHECK_ROWS):
        chunk = np.asarray(array[start:start + _CHECK_ROWS], dtype=np.float32)
        finite = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if not finite.all():
            raise InputError(f"{what}: row #{start + int(np.argmin(finite))} holds a NaN or infinite value")
        norms = np.linalg.norm(chunk, axis=-1)
        if (norms == 0).any():
            bad = start + int(np.argwhere(norms == 0)[0][0])
            raise InputError(f"{what}: row #{bad} is a zero vector")
        off_unit = off_unit or bool((np.abs(norms - 1) > UNIT_TOLERANCE).any())
    if not off_unit:
        return array
    warnings.warn(f"{what}: some rows are not unit length; re-normalising them", stacklevel=3)
    values = np.asarray(array, dtype=np.float32)
    return values / np.linalg.norm(values, axis=-1, keepdims=True)


def encode_payloads(payloads: Sequence[Any] | None, n: int) -> list[bytes]:
    """Each payload as compact UTF-8 JSON (b"" for None); InputError naming the payload that is not a JSON object."""
    if payloads is None:
        return [b""] * n
    if isinstance(payloads, (dict, str, bytes)) or not hasattr(payloads, "__len__"):
        raise InputError(f"payloads must be a list of dicts (one per row), got {type(payloads).__name__}")
    if len(payloads) != n:
        raise InputError(f"{len(payloads)} payloads for {n} rows")
    out = []
    for position, payload in enumerate(payloads):
        if payload is None:
            out.append(b"")
            continue
        if not isinstance(payload, dict):
            raise InputError(f"payload #{position} must be a dict (a JSON object), got {type(payload).__name__}")
        try:
            data = json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
        except (TypeError, ValueError, RecursionError, UnicodeEncodeError) as exc:
            raise InputError(f"payload #{position} is not JSON-serialisable: {exc}") from None
        if len(data) > MAX_PAYLOAD_BYTES:
            raise InputError(f"payload #{position} is {len(data)} bytes as JSON; at most {MAX_PAYLOAD_BYTES} allowed")
        out.append(data)
    return out


def decode_payload(data: bytes) -> dict[str, Any] | None:
    return json.loads(data) if data else None


def check_geometry(geometry: Any, n: int) -> np.ndarray:
    """int64 [n, 3]: width and height (>= 1, or 0 0 for unknown) and a crop seed (>= 0) per image."""
    try:
        array = np.asarray(geometry)
    except (TypeError, ValueError) as exc:
        raise InputError(f"geometry: not an array ({exc})") from None
    if array.shape != (n, 3) or array.dtype.kind not in "iu":
        raise InputError(f"geometry: expected integers of shape [{n}, 3], got {array.dtype} {list(array.shape)}")
    array = array.astype(np.int64)
    bad = (array < 0).any(axis=1) | ((array[:, 0] == 0) != (array[:, 1] == 0))
    if bad.any():
        raise InputError(f"geometry row #{int(np.argmax(bad))} is not (width, height, seed) >= 0: "
                         f"{array[int(np.argmax(bad))].tolist()}")
    return array


def check_thumbnails(thumbnails: Sequence[Any], n: int) -> list[bytes]:
    """JPEG bytes (or None -> b"") per row."""
    if len(thumbnails) != n:
        raise InputError(f"{len(thumbnails)} thumbnails for {n} images")
    out = []
    for position, thumb in enumerate(thumbnails):
        if thumb is None:
            out.append(b"")
            continue
        if not isinstance(thumb, (bytes, bytearray, memoryview)) or bytes(thumb[:2]) != b"\xff\xd8":
            raise InputError(f"thumbnail #{position} is not JPEG bytes")
        if len(thumb) > MAX_THUMBNAIL_BYTES:
            raise InputError(f"thumbnail #{position} is {len(thumb)} bytes; at most {MAX_THUMBNAIL_BYTES} allowed")
        out.append(bytes(thumb))
    return out
