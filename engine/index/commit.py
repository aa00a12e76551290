"""The commit protocol: one small file (`index.json`) names the live segments, their delete files and the files
the previous commit retired. A commit replaces it atomically under the index's file lock, refuses when another
process committed since this one read it (generation check), and puts the previous file back when the replace
fails part-way. Files the caller wrote for a commit that then fails are discarded (`discard_on_failure`).
"""
from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import IndexFormatError
from .storage import write_bytes_atomic, write_json_atomic

COMMIT = "index.json"
SEGMENTS = "segments"
DELETES = "deletes"
LOCK = "LOCK"
FORMAT_NAME = "cnclip-index"
LEGACY_CURRENT = "CURRENT"


def read_commit(root: Path) -> dict[str, Any]:
    """The commit file's content; IndexFormatError for a missing, damaged or previous-format index."""
    path = root / COMMIT
    if not path.is_file():
        if (root / LEGACY_CURRENT).is_file():
            raise IndexFormatError(
                f"index {root} is in the previous format (CURRENT + snapshot folder); convert it with "
                f"`python -m engine upgrade {root}` (engine.index.upgrade)")
        raise IndexFormatError(f"{root} is not an index (no {COMMIT} file)")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != FORMAT_NAME or not isinstance(data.get("segments"), list):
            raise ValueError("not a cnclip index commit")
        int(data["generation"])
        return data
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path}: damaged commit file ({exc.__class__.__name__}: {exc})") from exc


def write_commit(root: Path, data: dict[str, Any], previous_generation: int) -> None:
    """Replace the commit by `data` (generation previous + 1) under the file lock; IndexFormatError when the
    commit on disk is not `previous_generation` (another process committed; nothing is written)."""
    path = root / COMMIT
    with file_lock(root):
        previous = path.read_bytes() if previous_generation else None
        on_disk = read_commit(root)["generation"] if previous_generation else 0
        if on_disk != previous_generation:
            raise IndexFormatError(f"index {root} was changed by another process (commit {on_disk}, this "
                                   f"process has {previous_generation}); reopen it")
        try:
            write_json_atomic(path, data)
        except BaseException:
            restore(path, previous)
            raise


@contextmanager
def file_lock(root: Path) -> Iterator[None]:
    """The index's writer lock (one commit at a time across processes)."""
    with open(root / LOCK, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def restore(path: Path, previous: bytes | None) -> None:
    """After a failed commit, make sure the previous commit is the one on disk (the rename may have happened
    before the failure); if even that fails, the on-disk state is uncertain and the index must be reopened."""
    try:
        if previous is None:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != previous:
            write_bytes_atomic(path, previous)
    except BaseException as exc:
        raise IndexFormatError(f"{path}: a commit failed and the previous one could not be restored ({exc}); "
                               "reopen the index to see which state is on disk") from exc


@contextmanager
def discard_on_failure(paths: Any) -> Iterator[None]:
    """Remove files written for a write that then failed (`paths`: a list, or a callable giving one)."""
    try:
        yield
    except BaseException:
        for path in (paths() if callable(paths) else paths):
            if path is not None:
                Path(path).unlink(missing_ok=True)
        raise
