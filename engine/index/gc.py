"""Garbage collection of index files: what a commit retired (removed by the *next* commit, so a reader of the
previous one keeps working) and what crashed writes left behind."""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

from .commit import DELETES, SEGMENTS
from .segment import SEGMENT_SUFFIX

log = logging.getLogger(__name__)
STALE_SECONDS = 3600  # unpublished segments younger than this may be a parallel writer's (write_segment)


def remove_retired(root: Path, relative: list[str]) -> None:
    """Remove files a previous commit retired (paths relative to the index root); failures are only logged."""
    for rel in relative:
        try:
            (root / rel).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove retired index file %s: %s", rel, exc)


_TEMP = re.compile(r"^\.tmp-(\d+)@([^-]+)-")


def sweep_temporaries(root: Path) -> int:
    """Remove temporary files (engine.index.storage.temp_tag) whose writer is gone: a process of this host that no
    longer runs (at once), or any writer after STALE_SECONDS. Safe without the writer lock: a live writer's
    temporaries are never touched. Returns how many were removed."""
    host, now, removed = socket.gethostname().replace("-", "_"), time.time(), 0
    for folder in (root, root / SEGMENTS, root / DELETES):
        for path in folder.iterdir() if folder.is_dir() else ():
            if not (path.name.startswith(".tmp-") or ".tmp-" in path.name):
                continue
            match = _TEMP.match(path.name)  # older releases' temporaries carry no pid: judged by age alone
            try:
                gone = match is not None and match.group(2) == host and not _alive(int(match.group(1)))
                dead = gone or now - path.stat().st_mtime > STALE_SECONDS
                if dead:
                    path.unlink(missing_ok=True)
                    removed += 1
            except OSError as exc:
                log.warning("could not remove the leftover temporary %s: %s", path, exc)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep(root: Path, segments: set[str], delete_files: set[str], pending: set[str]) -> None:
    """Remove unreferenced delete files, stale temporaries and segments never published (older than an hour).
    `segments`: live segment names; `delete_files`: live delete file names; `pending`: retired, not yet removed."""
    sweep_temporaries(root)
    referenced = {f"{name}{SEGMENT_SUFFIX}" for name in segments}
    now = time.time()
    for path in (root / SEGMENTS).iterdir():
        if path.name.startswith(".") or not path.is_file():  # temporaries: sweep_temporaries
            continue
        stale = now - path.stat().st_mtime > STALE_SECONDS
        if path.name not in referenced and f"{SEGMENTS}/{path.name}" not in pending and stale:
            path.unlink(missing_ok=True)
    for path in (root / DELETES).iterdir():
        if path.name not in delete_files and f"{DELETES}/{path.name}" not in pending:
            path.unlink(missing_ok=True)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
