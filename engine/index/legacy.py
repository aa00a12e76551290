"""The previous on-disk format (CURRENT + one snapshot folder vNNNNNN) and its in-place upgrade.

That format is never opened as is (`Index.open` names the upgrade command). It predates the recorded text
pipeline, so its texts were tokenised without cn_clip's normalisation: they are not carried over unless
dropped on purpose (re-encode them instead).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..errors import IndexFormatError
from ..laclip import LaclipConfig
from .commit import COMMIT, DELETES, LEGACY_CURRENT, SEGMENTS
from .core import Index
from .manifest import IndexManifest
from .rows import ImageRows, check_image_rows
from .segment import PartSource, build_segment
from .snapshot import LiveSegment
from .storage import fsync_dir


def upgrade(directory: str | Path, drop_texts: bool = False) -> str:
    """Convert a previous-format index in place, crash-safely; returns a one-line summary.

    The new segment is written first and the new commit file is the switch: a crash before it leaves the old
    format live (a rerun starts over), a crash after it leaves the new one live (a rerun removes the leftovers).
    """
    root = Path(directory)
    if (root / COMMIT).is_file():
        if not (root / LEGACY_CURRENT).exists():
            return f"{root} is already in the current format; nothing to do"
        _remove_legacy(root)
        return f"{root}: finished an interrupted upgrade (removed the previous-format files)"
    snapshot, meta = _read_legacy(root)
    texts = len(meta.get("text_ids", []))
    if texts and not drop_texts:
        raise IndexFormatError(
            f"index {root} holds {texts} texts encoded with the previous raw-text pipeline: re-encode them after "
            "upgrading, or upgrade with drop_texts=True (`python -m engine upgrade DIR --drop-texts`) to keep only "
            "the images; nothing was changed")
    laclip = LaclipConfig.from_dict(meta["laclip"]) if meta.get("laclip") else None
    manifest = IndexManifest(meta["model"], meta["checkpoint_hash"], int(meta["embed_dim"]), laclip,
                             meta.get("checkpoint_path"), int(meta.get("context_length", 52)), dtype="float32")
    for leftover in (root / SEGMENTS, root / DELETES):  # unreferenced: no commit exists yet
        shutil.rmtree(leftover, ignore_errors=True)
        leftover.mkdir()
    index = Index(manifest, directory=root)
    ids = meta["image_ids"]
    segments = ()
    if ids:
        global_ = np.load(snapshot / "image_global.npy", mmap_mode="r")
        crops = np.load(snapshot / "image_crops.npy", mmap_mode="r") if laclip else None
        checked = check_image_rows(ImageRows(ids, global_, crops), manifest)
        segments = (LiveSegment.of(build_segment([PartSource.of(checked, manifest.dtype)], manifest,
                                                 directory=root / SEGMENTS)),)
    fsync_dir(root)
    with index._dir.writer_lock(index.lock_timeout_s):  # no commit to rebase onto yet
        index._commit(segments, {})
    _remove_legacy(root)
    dropped = f", dropped {texts} texts (re-encode them)" if texts else ""
    return f"upgraded {root}: {len(ids)} images{dropped} -> segmented format"


def _read_legacy(root: Path) -> tuple[Path, dict]:
    current = root / LEGACY_CURRENT
    if not current.is_file():
        raise IndexFormatError(f"{root} is not a previous-format index (no {LEGACY_CURRENT} file)")
    try:
        snapshot = root / json.loads(current.read_text(encoding="utf-8"))["snapshot"]
        meta = json.loads((snapshot / "manifest.json").read_text(encoding="utf-8"))
        missing = [key for key in ("image_ids", "model", "checkpoint_hash", "embed_dim") if key not in meta]
        if missing:
            raise KeyError(missing[0])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"previous-format index {root} is damaged ({exc.__class__.__name__}: {exc})") from exc
    return snapshot, meta


def _remove_legacy(root: Path) -> None:
    (root / LEGACY_CURRENT).unlink(missing_ok=True)
    for old in root.iterdir():
        if old.is_dir() and old.name.startswith("v") and old.name[1:].isdigit():
            shutil.rmtree(old, ignore_errors=True)
    fsync_dir(root)
