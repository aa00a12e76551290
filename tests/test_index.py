"""Segmented index: top-k, segments, deletes, re-add, compaction, payloads, import checks, damage, old format."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from engine import IndexFormatError, InputError, LaclipConfig
from engine.index import (COMMIT, AnnConfig, CompactionPolicy, ImageRows, Index, IndexManifest, TextRows,
                          topk_rows, upgrade, write_segment)
from engine.laclip import ScoreConfig
from engine.scoring import pool

D, K = 8, 2
CONFIG = LaclipConfig(num_crops=K, tau=0.2, alpha=0.4)


def _manifest(laclip: LaclipConfig | None = CONFIG, **kw) -> IndexManifest:
    return IndexManifest("tiny", "abc", D, laclip, **kw)


def _unit(*shape: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute(t: np.ndarray, g: np.ndarray, c: np.ndarray | None, score: ScoreConfig | None) -> np.ndarray:
    if score is None:
        return t @ g.T
    sims = np.einsum("qd,nkd->qnk", t, c)
    logits = (np.einsum("nkd,nd->nk", c, g)[None] if score.weights == "image" else sims) / score.tau
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return score.alpha * (t @ g.T) + (1 - score.alpha) * (w * sims).sum(-1)


def _ids(found, snap, kind="images"):
    return [[snap.part_at(kind, int(p)).id_at(int(r)) for p, r in zip(f.positions, f.rows)] for f in found]


def test_topk_matches_a_stable_full_sort():
    scores = np.round(np.random.default_rng(0).standard_normal((5, 300)), 1)  # many exact ties
    for k in (1, 7, 300):
        values, indices = topk_rows(scores, k)
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        assert np.array_equal(indices, expected)
        assert np.array_equal(values, np.take_along_axis(scores, expected, 1))


@pytest.mark.parametrize("k", [0, 6, -1])
def test_topk_rejects_k_out_of_range(k):
    with pytest.raises(InputError, match="k must be in 1..5"):
        topk_rows(np.zeros((1, 5)), k)


@pytest.mark.parametrize("score", [None, ScoreConfig(0.2, 0.4, "image"), ScoreConfig(0.05, 0.3, "text")])
def test_search_over_segments_matches_brute_force(tmp_path, score):
    index = Index.create(tmp_path / "idx", _manifest())
    g, c = _unit(40, D, seed=1), _unit(40, K, D, seed=2)
    for start in range(0, 40, 9):  # several segments
        index.add_images(list(range(start, min(40, start + 9))), g[start:start + 9], c[start:start + 9])
    t = _unit(3, D, seed=3)
    found = index.search_images(t, 40, score=score)
    truth = _brute(t, g, c, score)
    for f, row, ids in zip(found, truth, _ids(found, index.snapshot())):
        assert ids == list(np.argsort(-row, kind="stable"))
        assert np.allclose(f.scores, np.sort(row)[::-1], atol=1e-5)


def test_add_writes_one_segment_and_leaves_the_others_untouched(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest())
    index.add_images(["a"], _unit(1, D), _unit(1, K, D))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "idx" / "segments").iterdir()}
    index.add_images(["b", "c"], _unit(2, D, seed=1), _unit(2, K, D, seed=1))
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "idx" / "segments").iterdir()}
    assert len(after) == 2 and all(after[name] == mtime for name, mtime in before.items())
    reopened = Index.open(tmp_path / "idx")
    assert reopened.image_ids == ["a", "b", "c"] and reopened.stats()["segments"] == 2
    assert np.allclose(reopened.array("image_global"), index.array("image_global"))


def test_open_maps_rows_instead_of_reading_them(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None))
    index.add_texts(list(range(100)), _unit(100, D))
    part = Index.open(tmp_path / "idx").snapshot().segments[0].segment.parts["texts"]
    assert isinstance(part.vectors.base, np.memmap) or isinstance(part.vectors, np.memmap)


def test_deletes_hide_rows_survive_reopen_and_ids_can_come_back(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest())
    g, c = _unit(6, D), _unit(6, K, D, seed=1)
    index.add_images(["a", "b", "c", 3, 4, 5], g, c)
    assert index.delete_images(["b", "3"]) == 2  # "3" finds the int id 3
    for reopened in (index, Index.open(tmp_path / "idx")):
        assert reopened.image_ids == ["a", "c", 4, 5] and not reopened.has_image(3)
        found = reopened.search_images(g[[1]], 4, score=None)
        assert "b" not in _ids(found, reopened.snapshot())[0]
    index.add_images(["b"], _unit(1, D, seed=9), _unit(1, K, D, seed=9))
    assert index.image_ids == ["a", "c", 4, 5, "b"]
    assert Index.open(tmp_path / "idx").image_ids == ["a", "c", 4, 5, "b"]


def test_unknown_or_repeated_id_to_delete_changes_nothing(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None))
    index.add_texts(["x", "y"], _unit(2, D))
    commit = (tmp_path / "idx" / COMMIT).read_bytes()
    with pytest.raises(InputError, match="id #1: unknown text id 'nope'"):
        index.delete_texts(["x", "nope"])
    with pytest.raises(InputError, match="given twice"):
        index.delete_texts(["x", "x"])
    with pytest.raises(InputError, match="id #0"):
        index.delete_texts([1.5])
    assert index.text_ids == ["x", "y"] and (tmp_path / "idx" / COMMIT).read_bytes() == commit


def test_compaction_merges_drops_deleted_and_keeps_results(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest())
    g, c = _unit(30, D, seed=4), _unit(30, K, D, seed=5)
    for start in range(0, 30, 5):
        index.add_images(list(range(start, start + 5)), g[start:start + 5], c[start:start + 5],
                         [{"n": i} for i in range(start, start + 5)])
    index.add_texts(["t"], _unit(1, D))
    index.delete_images([0, 7, 29])
    t = _unit(2, D, seed=6)
    old = index.snapshot()
    before = index.search_images(t, 10, score=CONFIG.score)
    index.compact()
    assert index.stats()["segments"] == 1 and index.stats()["deleted_images"] == 0
    after = index.search_images(t, 10, score=CONFIG.score)
    assert _ids(before, old) == _ids(after, index.snapshot())
    assert np.allclose([f.scores for f in before], [f.scores for f in after])
    # a search holding the pre-compaction snapshot still works after its files were retired and removed
    index.add_images(["new"], _unit(1, D, seed=7), _unit(1, K, D, seed=7))
    index.add_images(["new2"], _unit(1, D, seed=8), _unit(1, K, D, seed=8))
    assert _ids(index.search_images(t, 10, score=CONFIG.score, snapshot=old), old) == _ids(before, old)
    reopened = Index.open(tmp_path / "idx")
    assert reopened.payload("images", 12) == {"n": 12} and reopened.text_ids == ["t"]
    assert len(list((tmp_path / "idx" / "segments").iterdir())) == reopened.stats()["segments"]


def test_compaction_runs_automatically_past_the_policy(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None), policy=CompactionPolicy(small_rows=100, max_small=3))
    for i in range(5):
        index.add_texts([i], _unit(1, D, seed=i))
    assert index.stats()["segments"] <= 3 and index.text_ids == [0, 1, 2, 3, 4]
    index.delete_texts([0, 1, 2])  # more than 30% of a segment deleted: rewritten without them
    assert index.stats()["deleted_texts"] == 0 and Index.open(tmp_path / "idx").text_ids == [3, 4]


def test_payloads_round_trip_and_bad_ones_are_named(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None))
    index.add_texts(["a", "b"], _unit(2, D), [{"text": "飞天", "tags": [1, 2]}, None])
    assert Index.open(tmp_path / "idx").payload("texts", "a") == {"text": "飞天", "tags": [1, 2]}
    assert index.payload("texts", "b") is None
    for payloads, message in [([{"x": object()}], "payload #0 is not JSON-serialisable"),
                              ([{"x": float("nan")}], "payload #0"), (["str"], "payload #0 must be a dict"),
                              ([{"x": "y" * 70000}], "payload #0 is 7"), ({"a": 1}, "list of dicts")]:
        with pytest.raises(InputError, match=message):
            index.add_texts(["c"], _unit(1, D), payloads)
    with pytest.raises(InputError, match="unknown text id 'zz'"):
        index.payload("texts", "zz")
    assert index.text_ids == ["a", "b"]


def test_imported_vectors_are_checked_and_renormalised(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest())
    good_g, good_c = _unit(2, D), _unit(2, K, D)
    bad = good_g.copy()
    bad[1, 3] = np.nan
    cases = [(dict(global_=_unit(2, D + 1), crops=good_c), r"expected shape \[2, 8\]"),
             (dict(global_=bad, crops=good_c), "row #1 holds a NaN"),
             (dict(global_=np.zeros((2, D), np.float32), crops=good_c), "row #0 is a zero vector"),
             (dict(global_=good_g, crops=None), "needs crop embeddings"),
             (dict(global_=good_g, crops=_unit(2, K + 1, D)), r"crop embeddings: expected shape \[2, 2, 8\]")]
    for arrays, message in cases:
        with pytest.raises(InputError, match=message):
            index.add_images(["a", "b"], **arrays)
    assert index.image_ids == [] and index.stats()["segments"] == 0
    with pytest.warns(UserWarning, match="re-normalising"):
        index.add_images(["a", "b"], good_g * 3, good_c)
    assert np.allclose(np.linalg.norm(index.array("image_global"), axis=1), 1, atol=1e-6)


def test_fp16_storage_ranks_like_fp32(tmp_path):
    g, c, t = _unit(300, D, seed=1), _unit(300, K, D, seed=2), _unit(5, D, seed=3)
    results = {}
    for dtype in ("float32", "float16"):
        index = Index.create(tmp_path / dtype, _manifest(dtype=dtype))
        index.add_images(list(range(300)), g, c)
        found = index.search_images(t, 10, score=CONFIG.score)
        results[dtype] = found
        assert index.snapshot().segments[0].segment.parts["images"].vectors.dtype == np.dtype(dtype)
    overlap = np.mean([len(set(a.rows) & set(b.rows)) / 10 for a, b in zip(results["float32"], results["float16"])])
    assert overlap >= 0.9
    assert np.allclose([f.scores for f in results["float32"]], [f.scores for f in results["float16"]], atol=3e-3)


def test_pooled_vectors_follow_the_query_settings():
    index = Index(_manifest())
    g, c = _unit(20, D), _unit(20, K, D, seed=1)
    index.add_images(list(range(20)), g, c)
    t = _unit(1, D, seed=2)
    for score in (ScoreConfig(0.2, 0.4, "image"), ScoreConfig(1.0, 0.0, "image"), ScoreConfig(0.2, 0.4, "image")):
        found = index.search_images(t, 20, score=score)[0]
        assert np.allclose(found.scores, np.sort(t @ pool(g, c, score).T)[0][::-1], atol=1e-5)


def test_plain_only_index_refuses_laclip_scoring():
    index = Index(_manifest(None))
    index.add_images([1], _unit(1, D))
    assert index.search_images(_unit(1, D), 1, score=ScoreConfig(alpha=1.0))[0].rows.tolist() == [0]
    with pytest.raises(InputError, match="no LACLIP crops"):
        index.search_images(_unit(1, D), 1, score=ScoreConfig())


def test_save_binds_and_a_second_save_writes_nothing(tmp_path):
    index = Index(_manifest(None))
    index.add_texts(["a", "b"], _unit(2, D))
    index.delete_texts(["a"])
    index.save(tmp_path / "idx")
    assert Index.open(tmp_path / "idx").text_ids == ["b"] and index.directory == tmp_path / "idx"
    commit = (tmp_path / "idx" / COMMIT).read_bytes()
    index.save(tmp_path / "idx")
    assert (tmp_path / "idx" / COMMIT).read_bytes() == commit
    index.add_texts(["c"], _unit(1, D, seed=1))  # bound: written through
    assert Index.open(tmp_path / "idx").text_ids == ["b", "c"]
    with pytest.raises(IndexFormatError, match="already holds an index"):
        Index(_manifest(None)).save(tmp_path / "idx")


def test_parallel_segments_publish_atomically(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None))
    index.add_texts(["old"], _unit(1, D))
    refs = [write_segment(tmp_path / "idx", texts=TextRows([f"w{i}", f"x{i}"], _unit(2, D, seed=i)))
            for i in range(3)]
    assert index.text_ids == ["old"] and not index.has_text("w0")
    index.publish(refs)
    assert Index.open(tmp_path / "idx").text_ids == ["old", "w0", "x0", "w1", "x1", "w2", "x2"]
    clash = [write_segment(tmp_path / "idx", texts=TextRows(["new"], _unit(1, D))),
             write_segment(tmp_path / "idx", texts=TextRows(["w1"], _unit(1, D)))]
    with pytest.raises(InputError, match="text id 'w1'"):
        index.publish(clash)
    assert not index.has_text("new")
    other = Index.create(tmp_path / "other", IndexManifest("tiny", "other-checkpoint", D, None))
    foreign = write_segment(tmp_path / "other", texts=TextRows(["f"], _unit(1, D)))
    os.replace(tmp_path / "other" / "segments" / f"{foreign.name}.seg", tmp_path / "idx" / "segments" / f"{foreign.name}.seg")
    with pytest.raises(IndexFormatError, match="written for another index"):
        index.publish([foreign])
    assert other.text_ids == []


def test_damaged_files_are_named(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None))
    index.add_texts(["a"], _unit(1, D))
    segment = next((tmp_path / "idx" / "segments").iterdir())
    data = segment.read_bytes()
    segment.write_bytes(data[:len(data) - 40])
    with pytest.raises(IndexFormatError, match=f"{segment.name}.*truncated"):
        Index.open(tmp_path / "idx")
    segment.write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match=segment.name):
        Index.open(tmp_path / "idx")
    flipped = bytearray(data)
    flipped[-50] ^= 0xFF
    segment.write_bytes(bytes(flipped))
    with pytest.raises(IndexFormatError, match="checksum"):
        Index.open(tmp_path / "idx").verify()
    (tmp_path / "idx" / COMMIT).write_text("{not json")
    with pytest.raises(IndexFormatError, match=f"{COMMIT}: damaged commit"):
        Index.open(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="is not an index"):
        Index.open(tmp_path / "nothing")


def test_texts_from_another_text_pipeline_are_refused(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest(None))
    index.add_texts(["a"], _unit(1, D))
    data = json.loads((tmp_path / "idx" / COMMIT).read_text())
    for recorded in ("raw-text-v0", None):
        data["manifest"]["text_pipeline"] = recorded
        (tmp_path / "idx" / COMMIT).write_text(json.dumps(data))
        with pytest.raises(IndexFormatError, match="re-encode its texts"):
            Index.open(tmp_path / "idx")
    index.delete_texts(["a"])  # an index without texts opens and records the current pipeline
    images_only = Index.create(tmp_path / "img", _manifest(None))
    images_only.add_images([1], _unit(1, D))
    data = json.loads((tmp_path / "img" / COMMIT).read_text())
    data["manifest"]["text_pipeline"] = None
    (tmp_path / "img" / COMMIT).write_text(json.dumps(data))
    assert Index.open(tmp_path / "img").image_ids == [1]


def _write_previous_format(root, texts: bool):
    """An index exactly as the previous release wrote it: CURRENT + v000001/ with manifest.json and .npy files."""
    snapshot = root / "v000001"
    snapshot.mkdir(parents=True)
    g, c = _unit(3, D), _unit(3, K, D, seed=1)
    arrays = {"image_global": g, "image_crops": c, "image_pooled": pool(g, c, CONFIG),
              "text_emb": _unit(2 if texts else 0, D, seed=2)}
    for name, array in arrays.items():
        np.save(snapshot / f"{name}.npy", array)
    meta = {"format_version": 1, "model": "tiny", "checkpoint_hash": "abc", "checkpoint_path": None, "embed_dim": D,
            "context_length": 52, "laclip": CONFIG.to_dict(), "image_ids": ["a", 7, "c"],
            "text_ids": [0, 1] if texts else []}
    (snapshot / "manifest.json").write_text(json.dumps(meta))
    (root / "CURRENT").write_text(json.dumps({"snapshot": "v000001"}))
    return g


def test_previous_format_is_refused_then_upgraded(tmp_path):
    root = tmp_path / "old"
    g = _write_previous_format(root, texts=True)
    with pytest.raises(IndexFormatError, match=f"python -m engine upgrade {root}"):
        Index.open(root)
    with pytest.raises(IndexFormatError, match="2 texts encoded with the previous raw-text pipeline.*re-encode"):
        upgrade(root)
    assert (root / "CURRENT").exists() and not (root / COMMIT).exists()
    assert "dropped 2 texts" in upgrade(root, drop_texts=True)
    index = Index.open(root)
    assert index.image_ids == ["a", 7, "c"] and index.text_ids == [] and index.manifest.laclip == CONFIG
    assert np.allclose(index.array("image_global"), g)
    assert sorted(p.name for p in root.iterdir()) == ["LOCK", "deletes", COMMIT, "segments"]
    assert "nothing to do" in upgrade(root)


def test_upgrade_interrupted_after_the_switch_finishes(tmp_path, monkeypatch):
    root = tmp_path / "old"
    _write_previous_format(root, texts=False)
    import engine.index.legacy as legacy
    monkeypatch.setattr(legacy, "_remove_legacy", lambda root: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        upgrade(root)
    monkeypatch.undo()
    assert Index.open(root).image_ids == ["a", 7, "c"]  # the new commit is live
    assert "finished an interrupted upgrade" in upgrade(root)
    assert not (root / "CURRENT").exists()


def test_searches_run_while_a_writer_adds(tmp_path):
    index = Index.create(tmp_path / "idx", _manifest())
    index.add_images(list(range(50)), _unit(50, D), _unit(50, K, D, seed=1))
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        t = _unit(2, D, seed=5)
        while not stop.is_set():
            try:
                snap = index.snapshot()
                found = index.search_images(t, 10, score=CONFIG.score, snapshot=snap)
                assert all(len(f.rows) == 10 for f in found)
            except BaseException as exc:  # reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for thread in threads:
        thread.start()
    for i in range(15):
        index.add_images([f"n{i}"], _unit(1, D, seed=100 + i), _unit(1, K, D, seed=200 + i))
        if i % 5 == 4:
            index.delete_images([f"n{i}"])
    index.compact()
    stop.set()
    for thread in threads:
        thread.join()
    assert not errors and len(index.image_ids) == 62


def test_in_memory_index_accepts_both_kinds_in_one_add():
    index = Index(_manifest())
    ids = index.add(images=ImageRows(["i"], _unit(1, D), _unit(1, K, D)), texts=TextRows(["t"], _unit(1, D)))
    assert ids == ["i", "t"] and index.has_image("i") and index.has_text("t") and index.directory is None


def test_ann_settings_are_validated():
    with pytest.raises(InputError, match="ann kind"):
        AnnConfig(kind="lsh")
    with pytest.raises(InputError, match="nprobe"):
        AnnConfig(nprobe=0)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("score", [None, ScoreConfig(0.2, 0.4, "image"), ScoreConfig(0.05, 0.3, "text")])
def test_cuda_scoring_matches_the_host(tmp_path, score):
    cpu = Index.create(tmp_path / "idx", _manifest(dtype="float16"))
    cpu.add_images(list(range(500)), _unit(500, D, seed=1), _unit(500, K, D, seed=2))
    cpu.delete_images([3, 4])
    gpu = Index.open(tmp_path / "idx", device="cuda")
    t = _unit(4, D, seed=3)
    for a, b in zip(cpu.search_images(t, 10, score=score), gpu.search_images(t, 10, score=score)):
        assert np.allclose(a.scores, b.scores, atol=2e-3)
    assert gpu.stats()["device"] == "cuda"


def test_in_memory_and_on_disk_indexes_build_the_same_ann_structures(tmp_path):
    """One directory object decides where files go; whether a segment gets ANN does not depend on it."""
    pytest.importorskip("faiss")
    manifest = _manifest(None, ann=AnnConfig(kind="hnsw", min_rows=50, exact_below=0))
    g = _unit(120, D, seed=3)
    memory, disk = Index(manifest), Index.create(tmp_path / "idx", manifest)
    for index in (memory, disk):
        index.add_images(list(range(120)), g)
    assert memory.stats()["ann"] == disk.stats()["ann"]
    assert memory.stats()["ann"]["images"]["segments_with_ann"] == 1
    assert memory.stats()["bytes_on_disk"] == 0 and memory.directory is None
    t = _unit(3, D, seed=4)
    found = [index.search_images(t, 5, score=None) for index in (memory, disk)]
    for a, b in zip(*found):
        assert list(a.rows) == list(b.rows)
