"""Importing embeddings computed elsewhere (engine.features_io): cn_clip jsonl and .npy + ids files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine import Retriever
from engine.errors import InputError
from engine.features_io import FeatureFile, import_features, read_features

DIM = 32  # the tiny model's embedding size


def _unit(rows: int, seed: int, *shape: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rows, *shape, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cn_clip_jsonl_with_both_kinds(tmp_path: Path) -> None:
    images, texts = _unit(3, 0), _unit(2, 1)
    path = _jsonl(tmp_path / "feats.jsonl", [{"image_id": i, "feature": v.tolist()} for i, v in enumerate(images)]
                  + [{"text_id": f"t{i}", "feature": v.tolist()} for i, v in enumerate(texts)])
    read = read_features(FeatureFile(str(path)))
    assert [(f.kind, f.ids) for f in read] == [("image", [0, 1, 2]), ("text", ["t0", "t1"])]
    np.testing.assert_array_equal(read[0].vectors, images)
    np.testing.assert_array_equal(read[1].vectors, texts)
    with pytest.raises(InputError, match="a text embedding in a file read as image"):
        read_features(FeatureFile(str(path), kind="image"))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"feats.jsonl:2: malformed JSON"),
    ('{"image_id": 1, "text_id": 2, "feature": [1.0]}', r":2: expected exactly one of"),
    ('{"image_id": 1, "feature": [1.0, "x"]}', r":2: 'feature' must be a non-empty list of numbers"),
    ('{"image_id": 1, "feature": [1.0, 2.0]}', r":2: feature has 2 values, line 1 has 32"),
    ('[1, 2]', r":2: expected a JSON object"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "feats.jsonl"
    path.write_text(json.dumps({"image_id": 0, "feature": _unit(1, 0)[0].tolist()}) + "\n" + line + "\n")
    with pytest.raises(InputError, match=message):
        read_features(FeatureFile(str(path)))


def test_npy_with_ids_file_and_laclip_crops(tmp_path: Path) -> None:
    vectors = _unit(3, 2, 3)  # [n, 1 + K, D] with K = 2
    np.save(tmp_path / "v.npy", vectors)
    (tmp_path / "ids.txt").write_text("7\nb/c\n9\n")
    [read] = read_features(FeatureFile(str(tmp_path / "v.npy"), str(tmp_path / "ids.txt"), "image"))
    assert read.ids == [7, "b/c", 9]
    np.testing.assert_array_equal(read.vectors, vectors)
    (tmp_path / "short.txt").write_text("1\n2\n")
    with pytest.raises(InputError, match="holds 2 ids but .* holds 3 rows"):
        read_features(FeatureFile(str(tmp_path / "v.npy"), str(tmp_path / "short.txt"), "image"))
    with pytest.raises(InputError, match=r"numeric \[n, D\] array"):
        read_features(FeatureFile(str(tmp_path / "v.npy"), str(tmp_path / "ids.txt"), "text"))
    with pytest.raises(InputError, match="needs an ids file"):
        read_features(FeatureFile(str(tmp_path / "v.npy"), None, "image"))
    with pytest.raises(InputError, match="image or text"):
        read_features(FeatureFile(str(tmp_path / "v.npy"), str(tmp_path / "ids.txt")))


def test_import_goes_through_the_retriever_checks_and_skips_present_ids(tiny_checkpoint: Path) -> None:
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=None)
    scaled = _unit(3, 3) * 2.0
    features = read_features_from(scaled, "image")
    with pytest.warns(UserWarning, match="re-normalis"):
        assert import_features(retriever, features) == (3, 0)
    assert import_features(retriever, features) == (0, 3)
    hits = retriever.search_image_embeddings(scaled[:1] / 2.0, k=1, exact=True)
    assert hits[0][0].id == "a0"
    bad = read_features_from(np.full((1, DIM), np.nan, np.float32), "text")
    with pytest.raises(InputError, match="NaN"):
        import_features(retriever, bad)


def read_features_from(vectors: np.ndarray, kind: str):
    from engine.features_io import Features

    return Features(kind, [f"a{i}" for i in range(len(vectors))], vectors, "<test>")
