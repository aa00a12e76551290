"""Shards of one index directory: each maps a disjoint part of a commit's segments, scores queries over it and
answers candidates in the commit's own coordinates, so one exact merge gives what a single index would.

A segment belongs to shard `crc32(name) % shards` (segments are immutable and named once, so the assignment
never moves). The ingress searches commit g of the whole index; a shard answers for exactly that g (it keeps
its last few commits, and refreshes when g is newer than its own), or says it cannot, and the ingress retries
instead of merging answers from two commits. ANN against exact is decided once, for the whole index, by the
ingress, and so is the exact fallback of a short ANN answer: both depend on totals no shard sees.
"""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from .commit import commit_generation
from .opening import open_state
from .search import Found, Placement, Scorer, best_of, search
from .snapshot import Snapshot

KEEP_GENERATIONS = 8  # commits a shard keeps answering after a newer one: the ingress lags by at most ~1 s


def shard_of(segment_name: str, shards: int) -> int:
    """The shard a segment belongs to: stable across processes and machines (crc32 of its name)."""
    return zlib.crc32(segment_name.encode("utf-8")) % shards


@dataclass(frozen=True)
class ShardQuery:
    """One scatter: the scorer (queries and scoring settings), k, exact or ANN for the whole index, and the
    commit generation the ingress searches."""

    scorer: Scorer
    k: int
    exact: bool
    generation: int


@dataclass(frozen=True)
class ShardAnswer:
    """Per query, the shard's top-k with positions in the commit's segment order; `found` None when the shard
    does not hold commit `generation` (it holds `latest`)."""

    shard: int
    generation: int
    latest: int
    found: list[Found] | None


@dataclass(frozen=True)
class ShardState:
    snapshot: Snapshot
    positions: np.ndarray  # position in the commit of each of the shard's segments


class ShardView:
    """One shard of the index at `directory`: only its segments are opened (memory-mapped), commits are followed
    on demand, and the last KEEP_GENERATIONS commits stay answerable."""

    def __init__(self, directory: str | Path, shard: int, shards: int, device: str = "cpu") -> None:
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise InputError(f"shards must be an int >= 1, got {shards!r}")
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < shards:
            raise InputError(f"shard must be an int in 0..{shards - 1}, got {shard!r}")
        self.root = Path(directory)
        self.shard, self.shards = shard, shards
        self.place = Placement(device)
        self._lock = threading.Lock()
        self._states: OrderedDict[int, ShardState] = OrderedDict()
        self.refresh()

    def _mine(self, name: str) -> bool:
        return shard_of(name, self.shards) == self.shard

    @property
    def generation(self) -> int:
        return next(reversed(self._states))

    def refresh(self) -> int:
        """Open the newest commit when it is not held yet (segments already mapped are reused); its generation."""
        with self._lock:
            generation = commit_generation(self.root)
            if generation in self._states:
                return generation
            reuse = {live.segment.name: live.segment for state in self._states.values()
                     for live in state.snapshot.segments}
            opened = open_state(self.root, reuse, keep=self._mine)
            state = ShardState(opened.snapshot, np.asarray(opened.positions, np.int64))
            self._states[opened.snapshot.generation] = state
            while len(self._states) > KEEP_GENERATIONS:
                self._states.popitem(last=False)
            return opened.snapshot.generation

    def rows(self) -> dict[str, int]:
        """Live rows this shard holds at its newest commit, and its segment count (for stats and planning)."""
        snap = self._states[self.generation].snapshot
        return {"images": snap.live("images"), "texts": snap.live("texts"), "segments": len(snap.segments)}

    def answer(self, query: ShardQuery) -> ShardAnswer:
        """This shard's top-k per query at commit `query.generation`, or found=None when it cannot hold it."""
        state = self._states.get(query.generation)
        if state is None and query.generation > self.generation:
            self.refresh()
            state = self._states.get(query.generation)
        if state is None:
            return ShardAnswer(self.shard, query.generation, self.generation, None)
        snap = state.snapshot
        # the ingress chose ANN or exact for the whole index: no shard-size threshold, no shard-local fallback
        ann = replace(snap.manifest.ann, exact_below=0)
        found = search(snap, query.scorer, query.k, exact=query.exact, ann=ann, place=self.place,
                       fallback_exact=False)
        in_commit = [Found(f.scores, state.positions[f.positions], f.rows) for f in found]
        return ShardAnswer(self.shard, query.generation, self.generation, in_commit)


def plan(snapshot: Snapshot, kind: str, exact: bool) -> bool:
    """Exact (True) or ANN for a search of the whole index, by the single index's rule."""
    ann = snapshot.manifest.ann
    return exact or ann.kind == "none" or snapshot.live(kind) < ann.exact_below


def merge(answers: list[ShardAnswer], queries: int, k: int) -> list[Found]:
    """The exact top-k per query over every shard's answer, in the single index's order."""
    merged = []
    for q in range(queries):
        parts = [a.found[q] for a in answers if a.found is not None]
        merged.append(best_of(np.concatenate([f.scores for f in parts]), np.concatenate([f.positions for f in parts]),
                              np.concatenate([f.rows for f in parts]), k))
    return merged
