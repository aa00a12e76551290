"""Shards of one index directory (engine.index.shards), without Ray: the merge of every shard's answer equals the
single index's search (ids, scores and tie order) for images and texts, every LACLIP mode, exact and ANN, with
deletes and many segments; shards map only their segments, follow commits, and refuse a commit they lack."""
from __future__ import annotations

import numpy as np
import pytest

from engine import LaclipConfig
from engine.errors import EngineError
from engine.index import AnnConfig, Index, IndexManifest
from engine.index.search import ImageScorer, TextScorer
from engine.index.shards import ShardQuery, ShardView, merge, plan, shard_of
from engine.laclip import ScoreConfig

D, K = 24, 3
MODES = {"plain": None, "pooled": ScoreConfig(0.2, 0.5, "image"), "query-aware": ScoreConfig(0.1, 0.3, "text")}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def build(root, ann: AnnConfig, segments: int = 7, rows: int = 53, seed: int = 0) -> Index:
    rng = np.random.default_rng(seed)
    index = Index.create(root, IndexManifest("tiny", "abc", D, LaclipConfig(num_crops=K), ann=ann))
    for s in range(segments):
        g = unit(rng.normal(size=(rows + s, D)))
        g[::9] = g[0]  # exact ties across segments: the merge must order them as one index does
        c = unit(rng.normal(size=(rows + s, K, D)))
        c[::9] = c[0]
        index.add_images([f"s{s}-{i}" for i in range(rows + s)], g, c)
        index.add_texts([f"t{s}-{i}" for i in range(rows // 2 + s)], unit(rng.normal(size=(rows // 2 + s, D))))
    index.delete_images([f"s{s}-{i}" for s in range(0, segments, 2) for i in range(0, rows, 5)])
    index.delete_texts([f"t1-{i}" for i in range(0, rows // 2, 3)])
    return index


def sharded(index: Index, views: list[ShardView], scorer, k: int, exact: bool) -> list:
    snap = index.snapshot()
    use_exact = plan(snap, scorer.kind, exact)
    answers = [v.answer(ShardQuery(scorer, k, use_exact, snap.generation)) for v in views]
    return merge(answers, len(scorer.candidates), k)


def assert_same(got: list, want: list) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.positions, w.positions)
        np.testing.assert_array_equal(g.rows, w.rows)
        np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("mode", list(MODES))
def test_merged_shards_equal_the_single_index_exactly(tmp_path, shards: int, mode: str) -> None:
    index = build(tmp_path / "idx", AnnConfig(kind="none"))
    views = [ShardView(tmp_path / "idx", s, shards) for s in range(shards)]
    rng = np.random.default_rng(5)
    score = MODES[mode]
    t = unit(rng.normal(size=(4, D)))
    t[0] = index.vector("images", "s0-1")[0]  # a query tied with many rows
    for k in (1, 10, 37):
        want = index.search_images(t, k, score=score)
        assert_same(sharded(index, views, ImageScorer(t, score), k, False), want)
    g, c = unit(rng.normal(size=(3, D))), unit(rng.normal(size=(3, K, D)))
    want = index.search_texts(g, c, 11, score=score)
    assert_same(sharded(index, views, TextScorer(g, c if score else None, score), 11, False), want)
    mapped = sorted(live.segment.name for v in views for live in v._states[v.generation].snapshot.segments)
    assert mapped == sorted(live.segment.name for live in index.snapshot().segments)  # disjoint, complete


def test_ann_shards_equal_the_single_index_and_short_answers_fall_back_the_same_way(tmp_path) -> None:
    pytest.importorskip("faiss")
    ann = AnnConfig(kind="hnsw", min_rows=40, exact_below=0, hnsw_m=8, ef_construction=20, ef_search=16, refine=2)
    index = build(tmp_path / "idx", ann, segments=5, rows=120)
    views = [ShardView(tmp_path / "idx", s, 2) for s in range(2)]
    t = unit(np.random.default_rng(9).normal(size=(6, D)))
    for score in MODES.values():
        for k in (5, 40):
            assert_same(sharded(index, views, ImageScorer(t, score), k, False), index.search_images(t, k, score=score))


def test_a_shard_follows_commits_and_refuses_a_commit_it_cannot_hold(tmp_path) -> None:
    index = build(tmp_path / "idx", AnnConfig(kind="none"), segments=3)
    view = ShardView(tmp_path / "idx", 0, 1)
    before = index.snapshot().generation
    index.add_images(["new"], unit(np.ones((1, D))), unit(np.ones((1, K, D))))
    after = index.snapshot().generation
    t = unit(np.ones((1, D)))
    answer = view.answer(ShardQuery(ImageScorer(t, None), 1, True, after))  # newer than the view: it refreshes
    assert answer.found is not None and answer.latest == after
    assert view.answer(ShardQuery(ImageScorer(t, None), 1, True, before)).found is not None  # kept
    stale = view.answer(ShardQuery(ImageScorer(t, None), 1, True, before - 1))
    assert stale.found is None and stale.latest == after
    with pytest.raises(EngineError, match="shard must be an int in 0..1"):
        ShardView(tmp_path / "idx", 2, 2)


def test_segments_are_assigned_by_name_stably() -> None:
    names = [f"seg-{i:04d}" for i in range(400)]
    counts = np.bincount([shard_of(n, 4) for n in names], minlength=4)
    assert counts.min() > 60 and [shard_of(n, 4) for n in names] == [shard_of(n, 4) for n in names]
