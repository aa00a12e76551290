"""Where an index keeps its files: a folder on disk, or nowhere (in memory). The index asks its directory, never
"is there a directory?": the in-memory one writes nothing, keeps segments in memory and commits by doing
nothing, so every write runs the same code in both."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Union

import numpy as np

from ..errors import IndexFormatError
from . import gc
from .commit import (COMMIT, DELETES, LEGACY_CURRENT, SEGMENTS, commit_generation, discard_on_failure, file_lock,
                     write_commit)
from .storage import deletes_file_name, fsync_dir, write_array


class MemoryDirectory:
    """No files: segments stay in memory, deletes live only in the snapshot, commits publish in memory alone."""

    path: Path | None = None
    segments: Path | None = None  # build_segment keeps a segment in memory when given no folder

    def write_deletes(self, segment: str, kind: str, rows: np.ndarray) -> str | None:
        return None

    def delete_paths(self, names: list[str]) -> list[Path]:
        return []

    def writer_lock(self, timeout_s: float | None) -> contextlib.AbstractContextManager:
        """No other process can write an index in memory."""
        return contextlib.nullcontext()

    def generation(self) -> int | None:
        """No commit on disk to follow."""
        return None

    def commit(self, data: dict[str, Any], previous_generation: int, retired: list[str]) -> None:
        """Nothing to make durable."""

    def sweep(self, segments: set[str], delete_files: set[str], pending: set[str]) -> None:
        """Nothing to collect."""

    def bytes_on_disk(self) -> int:
        return 0

    def holds(self, target: Path) -> bool:
        return False


class DiskDirectory:
    """An index folder: `index.json` (the commit), `segments/`, `deletes/`, `LOCK`."""

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root)
        self.segments = self.path / SEGMENTS

    @classmethod
    def create(cls, root: str | Path) -> "DiskDirectory":
        """The folders of a new index (`root` must not hold an index yet)."""
        root = Path(root)
        if (root / COMMIT).exists() or (root / LEGACY_CURRENT).exists():
            raise IndexFormatError(f"{root} already holds an index; open it instead (Index.open / Retriever.load)")
        for sub in (root, root / SEGMENTS, root / DELETES):
            sub.mkdir(parents=True, exist_ok=True)
        fsync_dir(root.parent if root.parent != root else root)
        return cls(root)

    def write_deletes(self, segment: str, kind: str, rows: np.ndarray) -> str | None:
        """A new delete file (sorted row numbers) for one segment's `kind`, fsynced; its name, which carries the
        rows' CRC-32 (engine.index.opening checks it)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        name = deletes_file_name(segment, kind, rows)
        with discard_on_failure([self.path / DELETES / name]):
            write_array(self.path / DELETES / name, rows)
            fsync_dir(self.path / DELETES)
        return name

    def delete_paths(self, names: list[str]) -> list[Path]:
        return [self.path / DELETES / name for name in names]

    def writer_lock(self, timeout_s: float | None) -> contextlib.AbstractContextManager:
        """The index's cross-process writer lock (engine.index.commit.file_lock)."""
        return file_lock(self.path, timeout_s)

    def generation(self) -> int | None:
        """The generation of the commit on disk."""
        return commit_generation(self.path)

    def commit(self, data: dict[str, Any], previous_generation: int, retired: list[str]) -> None:
        """Replace the commit (engine.index.commit; the caller holds the writer lock), then remove what the
        previous commit retired."""
        write_commit(self.path, data, previous_generation)
        gc.remove_retired(self.path, retired)
        gc.sweep_temporaries(self.path)  # what killed writers left behind

    def sweep(self, segments: set[str], delete_files: set[str], pending: set[str]) -> None:
        gc.sweep(self.path, segments, delete_files, pending)

    def bytes_on_disk(self) -> int:
        return gc.disk_bytes(self.path)

    def holds(self, target: Path) -> bool:
        """Whether `target` is this folder."""
        try:
            return self.path.resolve() == Path(target).resolve()
        except OSError:
            return False


Directory = Union[MemoryDirectory, DiskDirectory]


def directory_at(path: str | Path | None) -> Directory:
    """The directory for `path` (None: in memory)."""
    return MemoryDirectory() if path is None else DiskDirectory(path)
