"""Near-duplicate images: groups of live images whose global vectors have cosine similarity >= a threshold.

Pairs come from a FAISS range search over the global vectors in blocks: exact (a flat inner-product index) below
`DuplicatesConfig.exact_below` rows, else an IVF index with fp16 codes (about 4 sqrt(n) lists) probing `nprobe` lists
per row (a pair whose rows fall in lists not probed can be missed). Every pair is re-checked with the stored vectors, and groups are the connected
components of the pairs (a chain a~b~c is one group even when a and c are further apart than the threshold).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import EngineError, InputError
from .ids import Id
from .index.ann import faiss_module
from .index.snapshot import Snapshot

DEFAULT_DUPLICATE_THRESHOLD = 0.95
_SEED = 1234
_RECHECK_MARGIN = 2e-3
_TRAIN_POINTS_PER_LIST = 40  # fp16 codes shift a similarity by well under this


@dataclass(frozen=True)
class DuplicatesConfig:
    """exact_below: rows under which the range search is exact; nprobe: IVF lists probed per row above it;
    block_rows: rows searched per FAISS call; max_pairs: the most pairs one search may hold (a threshold so low
    that more rows pair up is refused, estimated first from `probe_rows` random rows, then counted)."""

    exact_below: int = 50_000
    nprobe: int = 8
    block_rows: int = 4096
    max_pairs: int = 20_000_000
    probe_rows: int = 32


@dataclass(frozen=True)
class DuplicateGroups:
    """Groups (largest first), each a sorted array of live-row ordinals; `where` maps an ordinal to its
    (segment position, row)."""

    threshold: float
    groups: list[np.ndarray]
    where: np.ndarray  # [n, 2] (position, row) of each live image in index order
    images: int

    def members(self, snapshot: Snapshot, group: np.ndarray) -> list[Id]:
        return [snapshot.part_at("images", int(p)).id_at(int(r)) for p, r in self.where[group]]

    @cached_property
    def group_of(self) -> dict[tuple[int, int], int]:
        """(position, row) -> group number, for the rows in some group."""
        return {(int(p), int(r)): g for g, members in enumerate(self.groups) for p, r in self.where[members]}


def check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise InputError(f"threshold must be a number in (0, 1], got {threshold!r}")
    return float(threshold)


def find_duplicates(snapshot: Snapshot, threshold: float = DEFAULT_DUPLICATE_THRESHOLD,
                    config: DuplicatesConfig = DuplicatesConfig()) -> DuplicateGroups:
    """Groups of live images whose global vectors are within `threshold` cosine similarity of each other."""
    threshold = check_threshold(threshold)
    faiss = faiss_module()
    if faiss is None:
        raise EngineError("finding duplicates needs faiss (pip install faiss-cpu)")
    where = np.array([(position, int(row)) for position, live, _ in snapshot.parts("images")
                      for row in live.live_rows("images")], dtype=np.int64).reshape(-1, 2)
    n = len(where)
    if n < 2:
        return DuplicateGroups(threshold, [], where, n)
    index = _range_index(faiss, snapshot, where, config)
    if hasattr(index, "nprobe"):
        index.nprobe = config.nprobe
    radius = threshold - _RECHECK_MARGIN
    probe = np.random.default_rng(_SEED).choice(n, min(n, config.probe_rows), replace=False)
    lims, _, _ = index.range_search(_vectors(snapshot, where[np.sort(probe)]), radius)
    _check_pairs((int(lims[-1]) - len(probe)) / len(probe) * n / 2, threshold, config, "about ")
    pairs, held = [], 0
    for start in range(0, n, config.block_rows):
        block = _vectors(snapshot, where[start:start + config.block_rows])
        lims, _, found = index.range_search(block, radius)
        rows = np.repeat(np.arange(start, start + len(block)), np.diff(lims).astype(np.int64))
        keep = found > rows  # each pair once, never a row with itself
        a, b = rows[keep], found[keep].astype(np.int64)
        held += len(a)
        _check_pairs(held, threshold, config, "at least ")
        if len(a):
            exact = np.einsum("nd,nd->n", block[a - start], _vectors(snapshot, where[b]))
            pairs.append(np.stack([a[exact >= threshold], b[exact >= threshold]], axis=1))
    edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), np.int64)
    return DuplicateGroups(threshold, components(edges), where, n)


def _check_pairs(pairs: float, threshold: float, config: DuplicatesConfig, qualifier: str) -> None:
    if pairs > config.max_pairs:
        raise InputError(f"threshold {threshold} pairs up {qualifier}{pairs:,.0f} pairs of images, more than the "
                         f"{config.max_pairs:,} one search holds: raise the threshold")


def _range_index(faiss: Any, snapshot: Snapshot, where: np.ndarray, config: DuplicatesConfig) -> Any:
    """A FAISS inner-product index over every live global vector, labels = ordinals."""
    n, d = len(where), snapshot.manifest.embed_dim
    if n < config.exact_below:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // _TRAIN_POINTS_PER_LIST))
        rng = np.random.default_rng(_SEED)
        sample = _vectors(snapshot, where[np.sort(rng.choice(n, min(n, nlist * _TRAIN_POINTS_PER_LIST),
                                                             replace=False))])
        kmeans = faiss.Kmeans(d, nlist, niter=8, spherical=True, seed=_SEED, verbose=False)
        kmeans.train(sample)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(kmeans.centroids)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.train(sample)
    for start in range(0, n, config.block_rows):
        index.add(_vectors(snapshot, where[start:start + config.block_rows]))
    return index


def _vectors(snapshot: Snapshot, where: np.ndarray) -> np.ndarray:
    """float32 global vectors of (position, row) pairs, in the given order."""
    out = np.empty((len(where), snapshot.manifest.embed_dim), np.float32)
    for position in np.unique(where[:, 0]):
        chosen = np.flatnonzero(where[:, 0] == position)
        rows = where[chosen, 1]
        order = np.argsort(rows, kind="stable")  # gather from the memory map in row order
        out[chosen[order]] = snapshot.part_at("images", int(position)).vectors[rows[order]]
    return out


def components(edges: np.ndarray) -> list[np.ndarray]:
    """Connected components (of two or more nodes) of an undirected edge list [m, 2], largest first, then by
    their first member; each a sorted array."""
    if not len(edges):
        return []
    nodes, flat = np.unique(edges, return_inverse=True)
    a, b = flat.reshape(-1, 2).T
    label = np.arange(len(nodes))
    while True:  # min-label propagation along the edges, with pointer jumping
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    order = np.argsort(label, kind="stable")
    cuts = np.flatnonzero(np.diff(label[order])) + 1
    groups = [np.sort(nodes[g]) for g in np.split(order, cuts) if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def groups_json(found: DuplicateGroups, snapshot: Snapshot, limit: int | None = None) -> dict[str, Any]:
    """{"threshold", "groups": [{"size", "members": [id, ...]}], "images"}: the first `limit` groups."""
    chosen = found.groups if limit is None else found.groups[:limit]
    return {"threshold": found.threshold, "images": found.images,
            "groups": [{"size": int(len(g)), "members": found.members(snapshot, g)} for g in chosen]}


def groups_table(report: dict[str, Any]) -> str:
    """The JSON report as a table a person reads."""
    lines = [f"{len(report['groups'])} groups of near-duplicates (cosine >= {report['threshold']}) among "
             f"{report['images']} images", f"{'group':>5}  {'size':>4}  members"]
    for number, group in enumerate(report["groups"], 1):
        lines.append(f"{number:>5}  {group['size']:>4}  {', '.join(str(m) for m in group['members'])}")
    return "\n".join(lines)
