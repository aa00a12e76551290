"""The commit protocol: one small file (`index.json`) names the live segments, their delete files and the files
the previous commit retired. A writer takes the index's file lock (one writer across processes), rebases onto the
newest commit, and replaces the file atomically (a generation check guards it), putting the previous file back
when the replace fails part-way. Files the caller wrote for a commit that then fails are discarded (`discard_on_failure`).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import IndexBusyError, IndexFormatError
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
    """Replace the commit by `data` (generation previous + 1); the caller holds the writer lock (`file_lock`).
    IndexFormatError when the commit on disk is not `previous_generation` (nothing is written)."""
    path = root / COMMIT
    previous = path.read_bytes() if previous_generation else None
    on_disk = read_commit(root)["generation"] if previous_generation else 0
    if on_disk != previous_generation:
        raise IndexFormatError(f"index {root.name}: the commit on disk is {on_disk}, this writer expected "
                               f"{previous_generation}")
    try:
        write_json_atomic(path, data)
    except BaseException:
        restore(path, previous)
        raise


def commit_generation(root: Path) -> int:
    """The generation of the commit on disk (reads the small commit file)."""
    return int(read_commit(root)["generation"])


@contextmanager
def file_lock(root: Path, timeout_s: float | None = None) -> Iterator[None]:
    """The index's writer lock, one writer at a time across processes and machines sharing the folder's locks
    (flock: a dead holder's lock is released by the kernel, so no stale lock outlives its process). The holder
    writes its pid and host into the LOCK file; a writer that waits past `timeout_s` gets IndexBusyError naming
    them."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open(root / LOCK, "a+", encoding="utf-8") as f:
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    f.seek(0)
                    holder = f.read().strip() or "another writer"
                    raise IndexBusyError(f"index {root.name} is being written by {holder} for more than "
                                         f"{timeout_s:g} s; try again") from None
                time.sleep(0.005)
        try:
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
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
