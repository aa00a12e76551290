"""`python -m engine index|search|upgrade`: the index command's sources, progress, bad images, --features."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image
from engine.cli import main
from engine.index import COMMIT, Index

TEXTS = [{"text_id": 1, "text": "一只猫"}, {"text_id": 2, "text": "山水之间的古寺"}]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        make_image(40 + 9 * i, 50, seed=i).save(root / "imgs" / ("sub" if i % 2 else "") / f"{i}.png")
    (root / "texts.jsonl").write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in TEXTS))
    return root


def _index_args(folder: Path, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return ["index", "--model", "tiny", "--checkpoint", str(checkpoint), "--images", str(folder / "imgs"),
            "--texts", str(folder / "texts.jsonl"), "--out", str(out), "--crops", "0", *extra]


def test_index_shows_progress_then_search_returns_payloads(folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "index"
    assert main(_index_args(folder, out, tiny_checkpoint, "--batch-size", "2", "--progress-every", "2")) == 0
    captured = capsys.readouterr()
    assert "added 5 images (0 already indexed, 0 bad skipped) and 2 texts" in captured.out
    lines = captured.err.splitlines()
    assert lines[0] == "indexing 5 images"
    assert [line.split(" ")[0] for line in lines[1:3]] == ["2/5", "4/5"] and "images/s" in lines[1]
    assert lines[-1].startswith("indexed 5 images in ") and lines[-1].endswith("images/s)")
    assert main(["search", "--index", str(out), "--text", "一只猫", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert sorted(h["id"] for h in hits) == ["0", "2", "4", "sub/1", "sub/3"]
    assert {h["id"]: h["payload"]["source"] for h in hits}["sub/3"] == "sub/3.png"
    assert main(["search", "--index", str(out), "--image", str(folder / "imgs" / "0.png"), "-k", "2"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].split() == ["rank", "score", "id", "text"] and len(shown) == 3   # a header, then the hits
    assert "一只猫" in "".join(shown) and "山水之间的古寺" in "".join(shown)
    assert main(["search", "--index", str(out), "--text", "一只猫", "-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["rank", "score", "id", "source"]
    assert main(_index_args(folder, out, tiny_checkpoint)) == 0  # a rerun resumes: nothing new
    resumed = capsys.readouterr().out
    assert "added 0 images (5 already indexed, 0 bad skipped) and 0 texts (2 already indexed)" in resumed


def test_a_texts_only_index_reports_no_image_segments(folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    args = ["index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--texts", str(folder / "texts.jsonl"),
            "--out", str(tmp_path / "texts-only"), "--crops", "0"]
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "and 2 texts (0 already indexed) ->" in said and "segments" not in said


def test_bad_image_fails_naming_it_and_skip_bad_reports_it(folder: Path, tiny_checkpoint: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    make_image(30, 30).save(images / "ok.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    args = ["index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--images", str(images),
            "--out", str(tmp_path / "index"), "--crops", "0", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1 bad record (rerun with --skip-bad" in err and f"{images / 'broken.jpg'}: image 'broken'" in err
    assert Index.open(tmp_path / "index").image_ids == []
    assert main(args + ["--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert f"skipped: {images / 'broken.jpg'}" in captured.err
    assert "added 1 images (0 already indexed, 1 bad" in captured.out


def test_features_import_cn_clip_jsonl(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    features = tmp_path / "feats.jsonl"
    features.write_text("".join(json.dumps({key: i, "feature": rng.standard_normal(32).tolist()}) + "\n"
                                for key in ("image_id", "text_id") for i in range(3)))
    args = ["index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--features", str(features),
            "--out", str(tmp_path / "index"), "--crops", "0"]
    with pytest.warns(UserWarning, match="re-normalis"):
        assert main(args) == 0
    assert "imported 6 embeddings (0 already indexed)" in capsys.readouterr().out
    index = Index.open(tmp_path / "index")
    assert index.image_ids == [0, 1, 2] and index.text_ids == [0, 1, 2]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image_id": 1, "feature": "nope"}\n')
    assert main(args[:-4] + ["--features", str(bad), "--out", str(tmp_path / "index"), "--crops", "0"]) == 2
    assert f"{bad}:1: 'feature' must be" in capsys.readouterr().err


def test_upgrade_converts_a_previous_format_index(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "old"
    snapshot = root / "v000001"
    snapshot.mkdir(parents=True)
    vectors = np.eye(2, 32, dtype=np.float32)
    for name, array in {"image_global": vectors, "image_crops": vectors[:, None], "image_pooled": vectors,
                        "text_emb": np.zeros((0, 32), np.float32)}.items():
        np.save(snapshot / f"{name}.npy", array)
    laclip = {"num_crops": 1, "crop_mode": "random", "crop_area": [0.25, 0.6], "crop_aspect": [0.75, 1.333],
              "tau": 0.1, "alpha": 0.5, "weights": "image", "seed": 0}
    (snapshot / "manifest.json").write_text(json.dumps({
        "format_version": 1, "model": "tiny", "checkpoint_hash": "abc", "checkpoint_path": None, "embed_dim": 32,
        "context_length": 52, "laclip": laclip, "image_ids": ["a", "b"], "text_ids": []}))
    (root / "CURRENT").write_text(json.dumps({"snapshot": "v000001"}))
    assert main(["upgrade", str(root)]) == 0
    assert capsys.readouterr().out.strip()
    assert (root / COMMIT).is_file() and Index.open(root).image_ids == ["a", "b"]


def test_module_entry_point_and_errors(capsys: pytest.CaptureFixture) -> None:
    run = [sys.executable, "-m", "engine", "index", "--out", "x", "--model", "tiny"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "nothing to index: give --images, --texts and/or --features" in done.stderr
    assert main(run[3:] + ["--texts", "t.jsonl", "--ray"]) == 2
    assert "--ray distributes image encoding: give --images" in capsys.readouterr().err
