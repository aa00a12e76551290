"""Snapshots: the immutable view a search reads (segments in order plus their deleted rows at one commit)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..ids import Id
from .manifest import IndexManifest
from .segment import KINDS, Part, Segment


@dataclass(frozen=True)
class LiveSegment:
    """A segment with the rows deleted from it as of one commit (sorted row numbers per kind), as a boolean mask
    and as the packed live bitmap FAISS filters candidates with."""

    segment: Segment
    deleted: dict[str, np.ndarray] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict, compare=False)
    live_bits: dict[str, np.ndarray] = field(default_factory=dict, compare=False)

    @classmethod
    def of(cls, segment: Segment, deleted: dict[str, np.ndarray] | None = None) -> "LiveSegment":
        deleted = {kind: rows for kind, rows in (deleted or {}).items() if len(rows)}
        masks, bits = {}, {}
        for kind, rows in deleted.items():
            mask = np.zeros(segment.rows(kind), dtype=bool)
            mask[rows] = True
            masks[kind] = mask
            bits[kind] = np.packbits(~mask, bitorder="little")
        return cls(segment, deleted, masks, bits)

    def live(self, kind: str) -> int:
        return self.segment.rows(kind) - len(self.deleted.get(kind, ()))

    def is_deleted(self, kind: str, row: int) -> bool:
        mask = self.masks.get(kind)
        return bool(mask[row]) if mask is not None else False

    def live_rows(self, kind: str) -> np.ndarray:
        mask = self.masks.get(kind)
        rows = np.arange(self.segment.rows(kind))
        return rows[~mask] if mask is not None else rows


@dataclass(frozen=True)
class Snapshot:
    """Everything one search needs, never changed after it is made (writers build a new one)."""

    generation: int
    manifest: IndexManifest
    segments: tuple[LiveSegment, ...]

    def parts(self, kind: str) -> list[tuple[int, LiveSegment, Part]]:
        """(position, live segment, part) for every segment holding rows of `kind`."""
        return [(i, live, live.segment.parts[kind]) for i, live in enumerate(self.segments)
                if kind in live.segment.parts and live.segment.parts[kind].rows]

    def live(self, kind: str) -> int:
        return sum(live.live(kind) for live in self.segments)

    def deleted(self, kind: str) -> int:
        return sum(len(live.deleted.get(kind, ())) for live in self.segments)

    def max_int_id(self, kind: str) -> int:
        """The largest int id ever stored for `kind` in these segments (-1 if none): default ids count on from it."""
        return max((part.max_int_id() for _, _, part in self.parts(kind)), default=-1)

    def locate(self, kind: str, key: str) -> tuple[int, int] | None:
        """(segment position, row) of the live row with id key `key`, or None."""
        for position, live, part in self.parts(kind):
            row = part.find(key)
            if row >= 0 and not live.is_deleted(kind, row):
                return position, row
        return None

    def contains(self, kind: str, key: str) -> bool:
        return self.locate(kind, key) is not None

    def part_at(self, kind: str, position: int) -> Part:
        return self.segments[position].segment.parts[kind]

    def ids(self, kind: str) -> list[Id]:
        """Every live id of `kind` in index order (reads all ids: meant for small indexes and tools)."""
        return [part.id_at(int(r)) for _, live, part in self.parts(kind) for r in live.live_rows(kind)]

    def array(self, name: str) -> np.ndarray:
        """Live rows of image_global / image_crops / text_emb as one float32 array (materialises them)."""
        kind, column = {"image_global": ("images", "vectors"), "image_crops": ("images", "crops"),
                        "text_emb": ("texts", "vectors")}[name]
        pieces = [np.asarray(getattr(part, column)[live.live_rows(kind)], np.float32)
                  for _, live, part in self.parts(kind)]
        d, k = self.manifest.embed_dim, self.manifest.num_crops
        empty = np.zeros((0, k, d) if column == "crops" else (0, d), np.float32)
        return np.concatenate(pieces) if pieces else empty

    def stats(self) -> dict[str, Any]:
        per_kind = {kind: {"rows": self.live(kind), "deleted": self.deleted(kind)} for kind in KINDS}
        ann = {}
        for kind in KINDS:
            built = [part for _, _, part in self.parts(kind) if part.ann is not None]
            ann[kind] = {"segments_with_ann": len(built), "kind": built[0].ann.kind if built else None,
                         "rows_with_ann": sum(part.rows for part in built)}
        return {"generation": self.generation, "images": per_kind["images"]["rows"],
                "texts": per_kind["texts"]["rows"], "deleted_images": per_kind["images"]["deleted"],
                "deleted_texts": per_kind["texts"]["deleted"], "segments": len(self.segments), "ann": ann,
                "dtype": self.manifest.dtype}
