"""The index: immutable memory-mapped segments plus one atomically replaced commit (see engine.index.core).

Public names: Index, IndexManifest, AnnConfig, CompactionPolicy, Snapshot, ImageRows, TextRows, SegmentRef,
write_segment (parallel writers; `Index.publish` commits), upgrade (previous format), and the id rule's Id and
check_ids (defined in engine.ids), topk_rows.
"""
from ..ids import Id, check_ids, id_key
from .core import COMMIT, CompactionPolicy, Index, read_commit, write_segment
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
