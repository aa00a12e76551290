"""Payload filters (engine.index.filters): every filtered search equals a brute-force numpy computation over the
rows a plain-Python reading of the filter accepts (odd sizes, deletes, several segments, exact and ANN, images
and texts, every LACLIP mode), bad filters are InputErrors naming the bad part, and sharded answers carry them."""
from __future__ import annotations

import numpy as np
import pytest

from engine import LaclipConfig
from engine.errors import InputError
from engine.index import AnnConfig, Index, IndexManifest
from engine.index.filters import Filter, payload_keys
from engine.index.search import ImageScorer
from engine.index.shards import ShardQuery, ShardView, merge, plan
from engine.laclip import ScoreConfig

D, K = 16, 3
SIZES = (37, 101, 53, 1203)  # the last segment is large enough for an ANN structure
MODES = {"plain": None, "pooled": ScoreConfig(0.2, 0.5, "image"), "query-aware": ScoreConfig(0.1, 0.3, "text")}
ALBUMS = ["敦煌", "故宫", "云冈", None]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def payload_of(i: int) -> dict | None:
    """Assorted payloads: strings, ints, floats, booleans, lists, nulls, missing keys, and no payload at all."""
    if i % 17 == 0:
        return None
    p: dict = {"year": 600 + (i * 37) % 900, "album": ALBUMS[i % 4], "n": i}
    if i % 3:
        p["dynasty"] = ["唐", "宋", "明"][i % 3]
    if i % 5 == 0:
        p["tags"] = ["fragment", "rubbing"] if i % 2 else ["rubbing"]
    if i % 7 == 0:
        p["year"] = str(p["year"])  # a string where most rows hold a number: no numeric comparison matches it
    if i % 11 == 0:
        p["score"] = (i % 13) / 4
        p["flag"] = bool(i % 2)
    return p


def build(root, ann: AnnConfig, seed: int = 0) -> tuple[Index, list]:
    """A LACLIP index of four segments (odd sizes) with payloads and deletes; returns it and (id, payload) per row."""
    rng = np.random.default_rng(seed)
    index = Index.create(root, IndexManifest("tiny", "abc", D, LaclipConfig(num_crops=K), ann=ann))
    start = 0
    for size in SIZES:
        ids = list(range(start, start + size))
        index.add_images(ids, unit(rng.normal(size=(size, D))), unit(rng.normal(size=(size, K, D))),
                         [payload_of(i) for i in ids])
        index.add_texts([f"t{i}" for i in ids[: size // 2]], unit(rng.normal(size=(size // 2, D))),
                        [payload_of(i) for i in ids[: size // 2]])
        start += size
    index.delete_images([i for i in range(start) if i % 9 == 4])
    index.delete_texts([f"t{i}" for i in range(0, start, 13) if index.has_text(f"t{i}")])
    return index, start


# ---- a plain-Python reading of the documented semantics (independent of the vectorised evaluation) -------------

def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def equal(v, want) -> bool:
    if isinstance(v, list):
        return any(equal(x, want) for x in v)
    if isinstance(v, bool) or isinstance(want, bool):
        return isinstance(v, bool) and isinstance(want, bool) and v == want
    if is_number(want):
        return is_number(v) and v == want
    return type(v) is type(want) and v == want


def accepts(where: dict, payload: dict | None) -> bool:
    payload = payload or {}
    for key, cond in where.items():
        if key == "$and":
            ok = all(accepts(w, payload) for w in cond)
        elif key == "$or":
            ok = any(accepts(w, payload) for w in cond)
        else:
            ops = cond if isinstance(cond, dict) else {"$eq": cond}
            ok = all(field_accepts(payload, key, op, value) for op, value in ops.items())
        if not ok:
            return False
    return True


def field_accepts(payload: dict, key: str, op: str, value) -> bool:
    present = key in payload
    v = payload.get(key)
    if op == "$exists":
        return present == value
    if op in ("$eq", "$ne"):
        hit = present and equal(v, value)
        return hit if op == "$eq" else not hit
    if op in ("$in", "$nin"):
        hit = present and any(equal(v, x) for x in value)
        return hit if op == "$in" else not hit
    if not present or not ((is_number(v) and is_number(value)) or (isinstance(v, str) and isinstance(value, str))):
        return False
    return {"$gt": v > value, "$gte": v >= value, "$lt": v < value, "$lte": v <= value}[op]


FILTERS = [
    {"album": "敦煌"},
    {"year": {"$gte": 900, "$lt": 1200}},
    {"year": {"$gt": "1000"}},  # string order over the rows whose year is a string
    {"album": {"$in": ["故宫", "云冈"]}, "dynasty": {"$ne": "唐"}},
    {"$or": [{"tags": "fragment"}, {"flag": True}, {"score": {"$lte": 1.25}}]},
    {"album": None},
    {"dynasty": {"$exists": False}},
    {"album": {"$nin": ["敦煌", None]}, "$and": [{"n": {"$gt": 20}}, {"$or": [{"n": {"$lt": 400}},
                                                                              {"year": {"$exists": True}}]}]},
    {"n": {"$in": [3, 5, 41, 600, 1380]}},  # very selective: a handful of rows
    {"n": -1},  # matches nothing
]


def reference_images(t: np.ndarray, g: np.ndarray, c: np.ndarray, score: ScoreConfig | None) -> np.ndarray:
    """[Q, N] the README's formula in numpy, float64."""
    t, g, c = (x.astype(np.float64) for x in (t, g, c))
    if score is None or score.alpha == 1:
        return t @ g.T
    sims = np.einsum("qd,nkd->qnk", t, c)
    if score.weights == "image":
        logits = np.einsum("nkd,nd->nk", c, g)[None] / score.tau
    else:
        logits = sims / score.tau
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return score.alpha * (t @ g.T) + (1 - score.alpha) * (w * sims).sum(-1)


def live_rows(index: Index, kind: str) -> tuple[list, list]:
    ids = index.image_ids if kind == "images" else index.text_ids
    return ids, [index.payload(kind, i) for i in ids]


def expected(scores: np.ndarray, ids: list, keep: np.ndarray, k: int) -> list[list]:
    """Top-k ids among the kept rows per query (index order breaks ties)."""
    out = []
    for row in scores:
        order = [i for i in np.lexsort((np.arange(len(row)), -row)) if keep[i]]
        out.append([(ids[i], row[i]) for i in order[:k]])
    return out


def hits_of(index: Index, found, kind: str) -> list[list]:
    snap = index.snapshot()
    return [[(snap.part_at(kind, int(p)).id_at(int(r)), float(s)) for s, p, r in zip(f.scores, f.positions, f.rows)]
            for f in found]


def assert_hits(got: list[list], want: list[list]) -> None:
    for g, w in zip(got, want, strict=True):
        assert [i for i, _ in g] == [i for i, _ in w]
        np.testing.assert_allclose([s for _, s in g], [s for _, s in w], atol=2e-5)


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory):
    return build(tmp_path_factory.mktemp("exact") / "idx", AnnConfig(kind="none"))


@pytest.mark.parametrize("mode", list(MODES))
def test_filtered_exact_search_equals_brute_force(exact_index, mode: str) -> None:
    index, _ = exact_index
    score = MODES[mode]
    ids, payloads = live_rows(index, "images")
    g, c = index.array("image_global"), index.array("image_crops")
    t = unit(np.random.default_rng(1).normal(size=(3, D)))
    scores = reference_images(t, g, c, score)
    for where in FILTERS:
        keep = np.array([accepts(where, p) for p in payloads])
        for k in (1, 7, 300):
            got = hits_of(index, index.search_images(t, k, score=score, exact=True, where=where), "images")
            assert_hits(got, expected(scores, ids, keep, k))
            assert all(len(h) == min(k, int(keep.sum())) for h in got)  # fewer than k when fewer match


def test_filtered_text_search_equals_brute_force(exact_index) -> None:
    index, _ = exact_index
    ids, payloads = live_rows(index, "texts")
    emb = index.array("text_emb")
    g = unit(np.random.default_rng(2).normal(size=(2, D)))
    scores = g.astype(np.float64) @ emb.T.astype(np.float64)
    for where in FILTERS:
        keep = np.array([accepts(where, p) for p in payloads])
        got = hits_of(index, index.search_texts(g, None, 9, score=None, where=where), "texts")
        assert_hits(got, expected(scores, ids, keep, 9))


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_filtered_ann_search_is_exactly_scored_and_finds_the_filtered_top_k(tmp_path, kind: str) -> None:
    ann = AnnConfig(kind=kind, min_rows=1000, exact_below=0, hnsw_m=16)
    index, _ = build(tmp_path / "idx", ann)
    assert index.stats()["ann"]["images"]["segments_with_ann"] == 1
    ids, payloads = live_rows(index, "images")
    g, c = index.array("image_global"), index.array("image_crops")
    t = unit(np.random.default_rng(3).normal(size=(8, D)))
    score = None  # candidates and scores from the same vectors: what recall measures is the filtered ANN
    scores = reference_images(t, g, c, score)
    by_id = {i: n for n, i in enumerate(ids)}
    recalls = []
    for where in FILTERS:
        keep = np.array([accepts(where, p) for p in payloads])
        want = expected(scores, ids, keep, 10)
        got = hits_of(index, index.search_images(t, 10, score=score, where=where), "images")
        for q, (g_hits, w_hits) in enumerate(zip(got, want)):
            assert len(g_hits) == len(w_hits)
            for item, value in g_hits:  # every hit matches and carries its exact score
                assert keep[by_id[item]]
                assert value == pytest.approx(scores[q, by_id[item]], abs=2e-5)
            recalls.append(len({i for i, _ in g_hits} & {i for i, _ in w_hits}) / max(1, len(w_hits)))
    assert np.mean(recalls) >= 0.85  # unfiltered on the same data: 0.975 (ivf); the filtered top-10 lies deeper


def test_a_selective_filter_scores_its_rows_exactly_under_ann(tmp_path) -> None:
    index, _ = build(tmp_path / "idx", AnnConfig(kind="ivf", min_rows=1000, exact_below=0, nprobe=1, refine=1))
    ids, payloads = live_rows(index, "images")
    where = {"n": {"$in": [3, 5, 41, 600, 1380]}}
    keep = np.array([accepts(where, p) for p in payloads])
    t = unit(np.random.default_rng(4).normal(size=(2, D)))
    scores = reference_images(t, index.array("image_global"), index.array("image_crops"), None)
    assert_hits(hits_of(index, index.search_images(t, 3, score=None, where=where), "images"),
                expected(scores, ids, keep, 3))


def test_filters_travel_to_shards(exact_index, tmp_path) -> None:
    index, _ = exact_index
    views = [ShardView(index.directory, s, 2) for s in range(2)]
    snap = index.snapshot()
    t = unit(np.random.default_rng(6).normal(size=(2, D)))
    where = Filter.parse(FILTERS[3])
    scorer = ImageScorer(t, None, where=where)
    answers = [v.answer(ShardQuery(scorer, 6, plan(snap, "images", False), snap.generation)) for v in views]
    got = merge(answers, 2, 6)
    want = index.search_images(t, 6, score=None, where=FILTERS[3])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.positions, b.positions)


@pytest.mark.parametrize("where, named", [
    ({"album": {"$regex": "敦"}}, "$regex"),
    ({"$not": {"album": "x"}}, "$not"),
    ({"year": {"$gt": [1, 2]}}, "where.year.$gt"),
    ({"year": {"$gt": True}}, "where.year.$gt"),
    ({"album": {"$in": "敦煌"}}, "where.album.$in"),
    ({"album": {"$in": [{"a": 1}]}}, "where.album.$in[0]"),
    ({"flag": {"$exists": 1}}, "where.flag.$exists"),
    ({"album": {"name": "x"}}, "where.album"),
    ({"album": [1, 2]}, "where.album"),
    ({"$or": []}, "where.$or"),
    ({"$and": [{"a": 1}, 3]}, "where.$and[1]"),
    ([{"a": 1}], "where"),
    ({"year": {"$lt": float("nan")}}, "where.year.$lt"),
])
def test_bad_filters_are_input_errors_naming_the_bad_part(exact_index, where, named: str) -> None:
    index, _ = exact_index
    t = unit(np.ones((1, D)))
    with pytest.raises(InputError, match=named.replace("$", r"\$").replace("[", r"\[").replace(".", r"\.")):
        index.search_images(t, 3, score=None, where=where)


def test_filters_nested_deeper_than_eight_levels_are_refused() -> None:
    where: dict = {"a": 1}
    for _ in range(7):
        where = {"$or": [where]}
    Filter.parse(where)  # 8 levels
    with pytest.raises(InputError, match="deeper than 8"):
        Filter.parse({"$and": [where]})


def test_payload_keys_lists_types_and_examples(exact_index) -> None:
    index, _ = exact_index
    keys = {entry["key"]: entry for entry in payload_keys(index.snapshot(), "images")}
    assert set(keys) == {"year", "album", "n", "dynasty", "tags", "score", "flag"}
    assert keys["year"]["types"] == ["number", "string"] or keys["year"]["types"] == ["string", "number"]
    assert keys["album"]["types"] == ["string", "null"]
    assert keys["tags"]["types"] == ["array"] and keys["tags"]["examples"] == []
    assert all(len(e["examples"]) <= 5 for e in keys.values())
