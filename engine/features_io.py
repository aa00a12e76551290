"""Reading embeddings computed elsewhere, to import them with `Retriever.add_image_embeddings` /
`add_text_embeddings` (which check dimension and finiteness and re-normalise with a warning).

Two formats:
- cn_clip's `extract_features.py` output: JSON lines `{"image_id": 1, "feature": [...]}` or
  `{"text_id": 1, "feature": [...]}` (one file may hold both kinds).
- A `.npy` array plus an ids file (one id per line, in row order): [n, D] vectors, or [n, 1 + K, D] for an
  index with K LACLIP crops (the global vector first, then the crops). The kind (image or text) is given.
Errors name the file and line (or row).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import InputError
from .ids import Id
from .retriever import Retriever

FeatureKind = Literal["image", "text"]
_KEYS: dict[str, FeatureKind] = {"image_id": "image", "text_id": "text"}


@dataclass(frozen=True)
class FeatureFile:
    """Where embeddings are: a cn_clip jsonl, or a `.npy` with `ids` (a text file) and `kind`."""

    path: str
    ids: str | None = None
    kind: FeatureKind | None = None


@dataclass(frozen=True)
class Features:
    """Embeddings of one kind: ids and [n, D] (or, for images, [n, 1 + K, D]) float32 vectors."""

    kind: FeatureKind
    ids: list[Id]
    vectors: np.ndarray
    source: str


def read_features(spec: FeatureFile) -> list[Features]:
    """The embeddings in `spec.path`: one `Features` per kind it holds (images first)."""
    path = Path(spec.path)
    if not path.is_file():
        raise InputError(f"features file not found: {path}")
    if path.suffix.lower() == ".npy":
        return [_read_npy(path, spec)]
    if spec.ids is not None:
        raise InputError(f"{path}: an ids file goes with a .npy features file, not with a jsonl")
    return _read_jsonl(path, spec.kind)


def import_features(retriever: Retriever, features: Features) -> tuple[int, int]:
    """Add the rows whose ids the index does not hold yet; (added, already indexed)."""
    has = retriever.index.has_image if features.kind == "image" else retriever.index.has_text
    new = [i for i, item in enumerate(features.ids) if not has(item)]
    if new:
        ids = [features.ids[i] for i in new]
        vectors = features.vectors[new]
        if features.kind == "text":
            retriever.add_text_embeddings(ids, vectors)
        elif vectors.ndim == 3:
            retriever.add_image_embeddings(ids, vectors[:, 0], vectors[:, 1:])
        else:
            retriever.add_image_embeddings(ids, vectors)
    return len(new), len(features.ids) - len(new)


def _read_npy(path: Path, spec: FeatureFile) -> Features:
    if spec.kind not in ("image", "text"):
        raise InputError(f"{path}: say whether a .npy holds image or text embeddings (kind), got {spec.kind!r}")
    if spec.ids is None:
        raise InputError(f"{path}: a .npy features file needs an ids file (one id per line, in row order)")
    try:
        vectors = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
    allowed = (2, 3) if spec.kind == "image" else (2,)
    if vectors.ndim not in allowed or not np.issubdtype(vectors.dtype, np.number):
        shapes = "[n, D] or [n, 1 + K, D]" if spec.kind == "image" else "[n, D]"
        raise InputError(f"{path}: {spec.kind} embeddings must be a numeric {shapes} array, "
                         f"got {vectors.dtype} {list(vectors.shape)}")
    ids = _read_ids(Path(spec.ids))
    if len(ids) != len(vectors):
        raise InputError(f"{spec.ids} holds {len(ids)} ids but {path} holds {len(vectors)} rows")
    return Features(spec.kind, ids, np.asarray(vectors, dtype=np.float32), str(path))


def _read_ids(path: Path) -> list[Id]:
    """One id per line; a line of digits is an int id (as cn_clip's integer ids), anything else a str."""
    if not path.is_file():
        raise InputError(f"ids file not found: {path}")
    ids: list[Id] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.rstrip("\r\n")
            if not text.strip():
                raise InputError(f"{path}:{number}: empty id (one id per line, in row order)")
            ids.append(int(text) if text.isdigit() else text)
    return ids


def _read_jsonl(path: Path, only: FeatureKind | None) -> list[Features]:
    rows: dict[FeatureKind, tuple[list[Id], list[list[float]]]] = {"image": ([], []), "text": ([], [])}
    dims: dict[FeatureKind, tuple[int, int]] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            kind, item, feature = _parse_line(line, f"{path}:{number}")
            if only is not None and kind != only:
                raise InputError(f"{path}:{number}: a {kind} embedding in a file read as {only} embeddings")
            dim, first = dims.setdefault(kind, (len(feature), number))
            if len(feature) != dim:
                raise InputError(f"{path}:{number}: feature has {len(feature)} values, "
                                 f"line {first} has {dim}")
            rows[kind][0].append(item)
            rows[kind][1].append(feature)
    out = [Features(kind, ids, np.asarray(vectors, dtype=np.float32), str(path))
           for kind, (ids, vectors) in rows.items() if ids]
    if not out:
        raise InputError(f"{path}: no embeddings found (expected lines like {{\"image_id\": 1, \"feature\": [...]}})")
    return out


def _parse_line(line: str, where: str) -> tuple[FeatureKind, Id, list[float]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = [key for key in _KEYS if key in record]
    if len(keys) != 1:
        raise InputError(f"{where}: expected exactly one of 'image_id' or 'text_id', got keys {sorted(record)}")
    feature = record.get("feature")
    if (not isinstance(feature, list) or not feature
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in feature)):
        raise InputError(f"{where}: 'feature' must be a non-empty list of numbers")
    return _KEYS[keys[0]], record[keys[0]], feature
