"""The index: immutable memory-mapped segments plus one atomically replaced commit (see engine.index.core).

One job per module: core (Index, the writer), reads (its read side), opening (open and validate a commit),
commit (the commit file, its lock and restore), gc (retired and abandoned files), compaction (CompactionPolicy and
merging), directory (on disk or in memory), segment / storage (segment files), snapshot, search, ann, rows,
manifest, thumbnails, topk, legacy (the previous format).

Public names: Index, IndexManifest, AnnConfig, CompactionPolicy, Snapshot, ImageRows, TextRows, SegmentRef,
write_segment (parallel writers; `Index.publish` commits), upgrade (previous format), and the id rule's Id and
check_ids (defined in engine.ids), topk_rows.
"""
from ..ids import Id, check_ids, id_key
from .commit import COMMIT, read_commit
from .compaction import CompactionPolicy
from .core import Index, write_segment
from .legacy import upgrade
from .manifest import FORMAT_VERSION, AnnConfig, IndexManifest
from .rows import ImageRows, TextRows
from .segment import SegmentRef
from .snapshot import Snapshot
from .topk import topk_rows

__all__ = [
    "COMMIT", "FORMAT_VERSION", "AnnConfig", "CompactionPolicy", "Id", "ImageRows", "Index", "IndexManifest",
    "SegmentRef", "Snapshot", "TextRows", "check_ids", "id_key", "read_commit", "topk_rows", "upgrade",
    "write_segment",
]
