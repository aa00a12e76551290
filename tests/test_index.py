"""Index: exact top-k with documented tie-breaking, id rules, atomic versioned save/load, damage detection."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from engine import IndexFormatError, InputError, LaclipConfig
from engine.index import Index, IndexManifest, check_ids, topk_rows


def _index(laclip: LaclipConfig | None = LaclipConfig(num_crops=2)) -> Index:
    return Index(IndexManifest("tiny", "abc", 4, laclip))


def _rows(n: int, *shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def test_topk_matches_a_stable_full_sort():
    scores = np.round(_rows(5, 300), 1)  # many exact ties
    for k in (1, 7, 300):
        values, indices = topk_rows(scores, k)
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        assert np.array_equal(indices, expected)
        assert np.array_equal(values, np.take_along_axis(scores, expected, 1))


def test_topk_ties_go_to_the_lower_index():
    values, indices = topk_rows(np.array([[0.5, 0.9, 0.5, 0.9, 0.5]]), 3)
    assert indices.tolist() == [[1, 3, 0]]


@pytest.mark.parametrize("k", [0, 6, -1])
def test_topk_rejects_k_out_of_range(k):
    with pytest.raises(InputError, match="k must be in 1..5"):
        topk_rows(np.zeros((1, 5)), k)


@pytest.mark.parametrize("ids, message", [
    (["a", "a"], "duplicate id 'a'"), ([1, 1.5], "1.5"), ([True], "True"), ([""], "empty"), ([None], "None"),
])
def test_bad_ids_are_named(ids, message):
    with pytest.raises(InputError, match=message):
        check_ids(ids)


def test_id_already_indexed_is_rejected():
    index = _index(None)
    index.add_texts(["x", 3], _rows(2, 4))
    with pytest.raises(InputError, match="duplicate id 3"):
        index.add_texts([3], _rows(1, 4))
    assert index.text_ids == ["x", 3]


def test_save_load_round_trip_keeps_arrays_ids_and_types(tmp_path):
    index = _index()
    index.add_images(["a", 7], _rows(2, 4), _rows(2, 2, 4, seed=1), _rows(2, 4, seed=2))
    index.add_images(["b"], _rows(1, 4, seed=3), _rows(1, 2, 4, seed=4), _rows(1, 4, seed=5))
    index.add_texts([1, "二"], _rows(2, 4, seed=6))
    index.save(tmp_path / "idx")
    loaded = Index.load(tmp_path / "idx")
    assert loaded.image_ids == ["a", 7, "b"] and loaded.text_ids == [1, "二"]
    for name in ("image_global", "image_crops", "image_pooled", "text_emb"):
        assert np.array_equal(loaded.array(name), index.array(name))
    assert loaded.manifest.to_json() == index.manifest.to_json()


def test_repeated_saves_keep_one_snapshot(tmp_path):
    index = _index(None)
    for i in range(3):
        index.add_texts([i], _rows(1, 4, seed=i))
        index.save(tmp_path / "idx")
    entries = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert entries == ["CURRENT", "v000003"]
    assert Index.load(tmp_path / "idx").text_ids == [0, 1, 2]


def test_crash_before_the_switch_leaves_the_old_state(tmp_path, monkeypatch):
    index = _index(None)
    index.add_texts(["old"], _rows(1, 4))
    index.save(tmp_path / "idx")
    index.add_texts(["new"], _rows(1, 4, seed=1))
    real_replace = os.replace

    def crash_on_switch(src, dst):
        if str(dst).endswith("CURRENT"):
            raise KeyboardInterrupt("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_switch)
    with pytest.raises(KeyboardInterrupt):
        index.save(tmp_path / "idx")
    monkeypatch.undo()
    assert Index.load(tmp_path / "idx").text_ids == ["old"]
    index.save(tmp_path / "idx")  # the next save cleans up the orphaned snapshot
    assert Index.load(tmp_path / "idx").text_ids == ["old", "new"]
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["CURRENT", "v000003"]


def test_not_an_index(tmp_path):
    with pytest.raises(IndexFormatError, match="no CURRENT"):
        Index.load(tmp_path)


def test_damaged_index_is_reported(tmp_path):
    index = _index(None)
    index.add_texts(["a", "b"], _rows(2, 4))
    index.save(tmp_path / "idx")
    snapshot = tmp_path / "idx" / json.loads((tmp_path / "idx" / "CURRENT").read_text())["snapshot"]
    np.save(snapshot / "text_emb.npy", _rows(3, 4))
    with pytest.raises(IndexFormatError, match=r"text_emb.npy has shape \(3, 4\)"):
        Index.load(tmp_path / "idx")
    (snapshot / "text_emb.npy").write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match="damaged"):
        Index.load(tmp_path / "idx")
    (tmp_path / "idx" / "CURRENT").write_text('{"snapshot": "v999999"}')
    with pytest.raises(IndexFormatError, match="v999999"):
        Index.load(tmp_path / "idx")
