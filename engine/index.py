"""Embedding index: in-memory arrays, exact top-k, and crash-safe versioned save/load on disk.

On disk an index is a directory holding numbered snapshots `v000001/ v000002/ ...` and a file `CURRENT`
naming the live one. A save writes a whole new snapshot, fsyncs it, then replaces `CURRENT` atomically
(os.replace), so a crash at any point leaves either the old or the new snapshot live, never a torn one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np

from .errors import IndexFormatError, InputError
from .laclip import LaclipConfig

Id = Union[str, int]
FORMAT_VERSION = 1
_CURRENT = "CURRENT"
_ARRAYS = ("image_global", "image_crops", "image_pooled", "text_emb")


def check_ids(ids: Sequence[Any], existing: Iterable[Id] = ()) -> list[Id]:
    """Validate ids (str or int, unique, not already present); an InputError names the first bad one."""
    seen = set(existing)
    out: list[Id] = []
    for position, item in enumerate(ids):
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise InputError(f"id #{position} is {item!r} ({type(item).__name__}); ids must be str or int")
        if isinstance(item, str) and not item:
            raise InputError(f"id #{position} is an empty string")
        if item in seen:
            raise InputError(f"duplicate id {item!r} (position {position})")
        seen.add(item)
        out.append(item)
    return out


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each row of [Q, N] scores, best first, ties broken by the lower index."""
    q, n = scores.shape
    if not 1 <= k <= n:
        raise InputError(f"k must be in 1..{n} (the number of indexed items), got {k}")
    if k == n:
        order = np.argsort(-scores, axis=1, kind="stable")
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(scores, part, 1).min(axis=1, keepdims=True)
        order = np.empty((q, k), dtype=np.int64)
        for row in range(q):  # candidates: everything >= the k-th value, then a stable sort by score
            candidates = np.flatnonzero(scores[row] >= kth[row])
            ranked = candidates[np.argsort(-scores[row, candidates], kind="stable")]
            order[row] = ranked[:k]
    order = order[:, :k]
    return np.take_along_axis(scores, order, 1), order


@dataclass
class IndexManifest:
    """What an index was made with; loading checks it against the model in use."""

    model: str
    checkpoint_hash: str
    embed_dim: int
    laclip: LaclipConfig | None
    checkpoint_path: str | None = None
    context_length: int = 52
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "model": self.model,
            "checkpoint_hash": self.checkpoint_hash,
            "checkpoint_path": self.checkpoint_path,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "laclip": self.laclip.to_dict() if self.laclip else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "IndexManifest":
        laclip = LaclipConfig.from_dict(data["laclip"]) if data.get("laclip") else None
        return cls(data["model"], data["checkpoint_hash"], int(data["embed_dim"]), laclip,
                   data.get("checkpoint_path"), int(data["context_length"]), int(data["format_version"]))


@dataclass
class Index:
    """Image rows (global, crops, pooled) and text rows with their ids; arrays grow by appended chunks."""

    manifest: IndexManifest
    image_ids: list[Id] = field(default_factory=list)
    text_ids: list[Id] = field(default_factory=list)
    _chunks: dict[str, list[np.ndarray]] = field(default_factory=lambda: {name: [] for name in _ARRAYS})

    def array(self, name: str) -> np.ndarray:
        """The stored rows of `name` as one contiguous float32 array (empty with the right shape if none)."""
        chunks = self._chunks[name]
        if len(chunks) > 1:
            chunks[:] = [np.concatenate(chunks)]
        if chunks:
            return chunks[0]
        return np.zeros(self._empty_shape(name), dtype=np.float32)

    def _empty_shape(self, name: str) -> tuple[int, ...]:
        d = self.manifest.embed_dim
        k = self.manifest.laclip.num_crops if self.manifest.laclip else 0
        return (0, k, d) if name == "image_crops" else (0, d)

    @property
    def has_crops(self) -> bool:
        return self.manifest.laclip is not None

    def add_images(self, ids: Sequence[Id], g: np.ndarray, c: np.ndarray | None, p: np.ndarray | None) -> None:
        ids = check_ids(ids, self.image_ids)
        if len(ids) != len(g):
            raise InputError(f"{len(ids)} ids for {len(g)} images")
        self._chunks["image_global"].append(np.ascontiguousarray(g, dtype=np.float32))
        if self.has_crops:
            if c is None or p is None:
                raise InputError("a LACLIP index needs crop and pooled embeddings for every image")
            self._chunks["image_crops"].append(np.ascontiguousarray(c, dtype=np.float32))
            self._chunks["image_pooled"].append(np.ascontiguousarray(p, dtype=np.float32))
        self.image_ids.extend(ids)

    def add_texts(self, ids: Sequence[Id], t: np.ndarray) -> None:
        ids = check_ids(ids, self.text_ids)
        if len(ids) != len(t):
            raise InputError(f"{len(ids)} ids for {len(t)} texts")
        self._chunks["text_emb"].append(np.ascontiguousarray(t, dtype=np.float32))
        self.text_ids.extend(ids)

    def save(self, directory: str | Path) -> Path:
        """Write a new snapshot and switch CURRENT to it atomically; older snapshots are then removed."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        number = 1 + max([_snapshot_number(p.name) for p in root.glob("v*")] + [0])
        snapshot = root / f"v{number:06d}"
        tmp = root / f".tmp-{snapshot.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for name in _ARRAYS:
            _write_npy(tmp / f"{name}.npy", self.array(name))
        _write_json(tmp / "manifest.json", {**self.manifest.to_json(), "image_ids": self.image_ids,
                                            "text_ids": self.text_ids})
        _fsync_dir(tmp)
        os.replace(tmp, snapshot)
        _fsync_dir(root)
        _write_json(root / f".{_CURRENT}.tmp", {"snapshot": snapshot.name})
        os.replace(root / f".{_CURRENT}.tmp", root / _CURRENT)
        _fsync_dir(root)
        for old in root.iterdir():  # superseded snapshots and temporaries left by a crashed save
            if old.name != snapshot.name and (_snapshot_number(old.name) or old.name.startswith(".tmp-")):
                shutil.rmtree(old, ignore_errors=True)
        return root

    @classmethod
    def load(cls, directory: str | Path) -> "Index":
        """Read the live snapshot; an IndexFormatError names what is missing or inconsistent."""
        root = Path(directory)
        snapshot = root / _read_current(root)
        try:
            with open(snapshot / "manifest.json", encoding="utf-8") as f:
                meta = json.load(f)
            manifest = IndexManifest.from_json(meta)
            arrays = {name: np.load(snapshot / f"{name}.npy", allow_pickle=False) for name in _ARRAYS}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexFormatError(f"index {root} is damaged: {exc.__class__.__name__}: {exc}") from exc
        if manifest.format_version != FORMAT_VERSION:
            raise IndexFormatError(f"index {root} has format {manifest.format_version}, expected {FORMAT_VERSION}")
        index = cls(manifest)
        n_img, n_txt = len(meta["image_ids"]), len(meta["text_ids"])
        expected = {name: index._empty_shape(name)[1:] for name in _ARRAYS}
        rows = {"image_global": n_img, "image_crops": n_img if index.has_crops else 0,
                "image_pooled": n_img if index.has_crops else 0, "text_emb": n_txt}
        for name, arr in arrays.items():
            if arr.shape != (rows[name], *expected[name]):
                raise IndexFormatError(
                    f"index {root}: {name}.npy has shape {arr.shape}, expected {(rows[name], *expected[name])}")
        index.image_ids = check_ids(meta["image_ids"])
        index.text_ids = check_ids(meta["text_ids"])
        for name, arr in arrays.items():
            if len(arr):
                index._chunks[name].append(arr.astype(np.float32, copy=False))
        return index


def _snapshot_number(name: str) -> int:
    """N for a snapshot folder named vNNNNNN, else 0."""
    return int(name[1:]) if name.startswith("v") and name[1:].isdigit() else 0


def _read_current(root: Path) -> str:
    path = root / _CURRENT
    if not path.is_file():
        raise IndexFormatError(f"{root} is not an index (no {_CURRENT} file)")
    try:
        with open(path, encoding="utf-8") as f:
            name = json.load(f)["snapshot"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"index {root}: unreadable {_CURRENT} file ({exc})") from exc
    if not (root / name).is_dir():
        raise IndexFormatError(f"index {root}: {_CURRENT} names missing snapshot {name!r}")
    return name


def _write_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
