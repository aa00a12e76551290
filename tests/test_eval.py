"""Evaluation: both dataset readers, Recall@K / MR on hand-worked cases, the feature cache, bad data, the CLI."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import image_bytes, make_image
from engine import InputError, LaclipConfig, Retriever
from engine.eval import (DatasetError, EvalSettings, best_ranks, evaluate, read_dataset, recalls,
                         retrieval_metrics)
from engine import dataset_features as features
from engine.eval.cli import main as eval_main
from engine.recall import KS
from engine.preprocess import TEXT_PIPELINE

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 8
# text 0 and 7 describe two images each; images 2 and 5 are each described by two texts; image 7 by none
TEXTS = [
    (0, "一只橘猫在窗台上晒太阳", [0, 1]), (1, "敦煌壁画中的飞天", [1]), (2, "蓝色丝绸上的牡丹花纹", [2]),
    (3, "山水之间的古寺", [2]), (4, "床前明月光，疑是地上霜", [3]), (5, "红色的灯笼挂在门口", [4]),
    (6, "青花瓷盘上的鱼", [5]), (7, "雪中的长城", [5, 6]),
]
SMALL = LaclipConfig(num_crops=2, tau=0.1, alpha=0.5)


def _png(i: int) -> bytes:
    return image_bytes(make_image(40 + 7 * i, 48 - 2 * i, seed=500 + i), "PNG")


def _texts_lines(texts=TEXTS) -> list[str]:
    return [json.dumps({"text_id": t, "text": s, "image_ids": ids}, ensure_ascii=False) for t, s, ids in texts]


def write_folder_dataset(root: Path, lines: list[str] | None = None, n_images: int = N_IMAGES) -> Path:
    """CulTi layout: images/<id>.png beside test_texts.jsonl."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        (root / "images" / f"{i}.png").write_bytes(_png(i))
    (root / "test_texts.jsonl").write_text("\n".join(lines or _texts_lines()) + "\n", encoding="utf-8")
    return root


def write_tsv_dataset(root: Path, lines: list[str] | None = None, rows: list[str] | None = None) -> Path:
    """cn_clip layout: test_imgs.tsv (id TAB base64) beside test_texts.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rows = rows or [f"{i}\t{base64.b64encode(_png(i)).decode()}" for i in range(N_IMAGES)]
    (root / "test_imgs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "test_texts.jsonl").write_text("\n".join(lines or _texts_lines()) + "\n", encoding="utf-8")
    return root


def settings(data: Path, cache: Path | None, **kw) -> EvalSettings:
    return EvalSettings(data=data, model="tiny", cache_dir=cache, laclip=kw.pop("laclip", SMALL), batch_size=3,
                        progress=False, **kw)


@pytest.fixture
def calls(monkeypatch):
    """Counts of texts and images sent to the encoder."""
    counts = {"texts": 0, "images": 0}
    enc_t, enc_i = Retriever.encode_texts, Retriever.encode_image_views

    def encode_texts(self, texts):
        counts["texts"] += len(texts)
        return enc_t(self, texts)

    def encode_image_views(self, images):
        counts["images"] += len(images)
        return enc_i(self, images)

    monkeypatch.setattr(Retriever, "encode_texts", encode_texts)
    monkeypatch.setattr(Retriever, "encode_image_views", encode_image_views)
    return counts


# ---- metrics ---------------------------------------------------------------------------------------------------

HAND_SCORES = np.array([[0.9, 0.5, 0.5, 0.1],    # text 0, truth {2}: tie 1/2 -> 1 first, so 2 ranks 2
                        [0.2, 0.8, 0.8, 0.3],    # text 1, truth {1, 3}: 1 ranks 0
                        [0.4, 0.4, 0.4, 0.4]])   # text 2, truth {3}: all tied -> index order, 3 ranks 3
HAND_TRUTH = [[2], [1, 3], [3]]


def test_best_ranks_hand_worked_with_ties_and_multiple_matches():
    assert best_ranks(HAND_SCORES, HAND_TRUTH).tolist() == [2, 0, 3]
    r = recalls(best_ranks(HAND_SCORES, HAND_TRUTH), ks=(1, 2, 3, 4))
    assert r == pytest.approx({"R@1": 100 / 3, "R@2": 100 / 3, "R@3": 200 / 3, "R@4": 100.0})


def test_retrieval_metrics_hand_worked_both_directions():
    # image->text queries are images 1, 2, 3 (image 0 has no text): columns [.5 .8 .4] truth {t1} -> rank 0;
    # [.5 .8 .4] truth {t0} -> rank 1; [.1 .3 .4] truth {t1, t2} -> rank 0
    m = retrieval_metrics(HAND_SCORES, HAND_TRUTH)
    assert m["text_to_image"] == pytest.approx({"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0})
    assert m["image_to_text"] == pytest.approx({"R@1": 200 / 3, "R@5": 100.0, "R@10": 100.0})
    assert m["MR"] == pytest.approx((100 / 3 + 200 + 200 / 3 + 200) / 6)


def test_best_ranks_match_a_stable_sort_on_heavily_tied_scores():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(50, 30)).astype(np.float32)  # many ties
    truth = [sorted(rng.choice(30, size=rng.integers(1, 4), replace=False).tolist()) for _ in range(50)]
    expected = []
    for row, items in zip(scores, truth):
        order = np.argsort(-row, kind="stable").tolist()  # ties keep index order
        expected.append(min(order.index(i) for i in items))
    assert best_ranks(scores, truth).tolist() == expected


@pytest.mark.parametrize("truth", [[[]], [[5]], [[-1]]])
def test_best_ranks_rejects_bad_truth(truth):
    with pytest.raises(InputError, match="relevant items"):
        best_ranks(np.zeros((1, 4)), truth)


# ---- readers ---------------------------------------------------------------------------------------------------

def test_folder_reader(tmp_path):
    ds = read_dataset(write_folder_dataset(tmp_path), "test")
    assert ds.layout == "folder" and not ds.problems
    assert [r.id for r in ds.images] == [str(i) for i in range(N_IMAGES)]
    expected = [(str(t), s, tuple(str(i) for i in ids)) for t, s, ids in TEXTS]
    assert [(r.id, r.text, r.image_ids) for r in ds.texts] == expected
    assert ds.images[3].source() == tmp_path / "images" / "3.png"


def test_tsv_reader_returns_the_encoded_bytes_and_accepts_urlsafe_base64(tmp_path):
    raw = [_png(i) for i in range(N_IMAGES)]
    encoders = (base64.b64encode, base64.urlsafe_b64encode)  # cn_clip writes the first, reads both
    rows = [f"{i}\t{encoders[i % 2](b).decode()}" for i, b in enumerate(raw)]
    ds = read_dataset(write_tsv_dataset(tmp_path, rows=rows), "test")
    assert ds.layout == "tsv" and not ds.problems
    assert [r.id for r in ds.images] == [str(i) for i in range(N_IMAGES)]
    assert [r.source() for r in ds.images] == raw
    assert ds.images[5].line == 6


def test_layout_errors(tmp_path):
    with pytest.raises(InputError, match="texts file not found"):
        read_dataset(tmp_path, "test")
    (tmp_path / "test_texts.jsonl").write_text(_texts_lines()[0] + "\n", encoding="utf-8")
    with pytest.raises(InputError, match="no images found"):
        read_dataset(tmp_path, "test")
    write_folder_dataset(tmp_path)
    write_tsv_dataset(tmp_path)
    with pytest.raises(InputError, match="--layout"):
        read_dataset(tmp_path, "test")
    assert read_dataset(tmp_path, "test", layout="tsv").layout == "tsv"


def _recall_from_rankings(rankings: list[list], truth: list[set]) -> dict[str, float]:
    ranks = np.array([min(r.index(i) for i in items) for r, items in zip(rankings, truth)])
    return {f"R@{k}": 100.0 * float(np.mean(ranks < k)) for k in KS}


def test_both_layouts_give_the_metrics_of_the_retriever_search_path(tmp_path):
    folder = evaluate(settings(write_folder_dataset(tmp_path / "folder"), None))
    tsv = evaluate(settings(write_tsv_dataset(tmp_path / "tsv"), None))
    assert folder.results == tsv.results
    assert folder.meta["texts"] == len(TEXTS) and folder.meta["images"] == N_IMAGES
    assert folder.meta["image_queries"] == 7  # image 7 has no text
    for mode, config in (("global", None), ("laclip", SMALL)):
        r = Retriever.from_checkpoint(None, model="tiny", laclip=config, progress=False)
        r.add_images([_png(i) for i in range(N_IMAGES)], ids=[str(i) for i in range(N_IMAGES)])
        r.add_texts([s for _, s, _ in TEXTS], ids=[str(t) for t, _, _ in TEXTS])
        t2i = r.search_images([s for _, s, _ in TEXTS], k=N_IMAGES)
        expected_t2i = _recall_from_rankings([[h.id for h in hits] for hits in t2i],
                                             [{str(i) for i in ids} for _, _, ids in TEXTS])
        described = sorted({i for _, _, ids in TEXTS for i in ids})
        i2t = r.search_texts([_png(i) for i in described], k=len(TEXTS))
        expected_i2t = _recall_from_rankings([[h.id for h in hits] for hits in i2t],
                                             [{str(t) for t, _, ids in TEXTS if i in ids} for i in described])
        assert folder.results[mode]["text_to_image"] == pytest.approx(expected_t2i)
        assert folder.results[mode]["image_to_text"] == pytest.approx(expected_i2t)


def test_text_weights_use_one_matrix_for_both_directions(tmp_path):
    report = evaluate(settings(write_folder_dataset(tmp_path), None, laclip=LaclipConfig(num_crops=2, weights="text")))
    m = report.results["laclip"]
    assert m["MR"] == pytest.approx(np.mean([*m["text_to_image"].values(), *m["image_to_text"].values()]))


def test_sweep_rows_and_alpha_one_equals_global(tmp_path):
    report = evaluate(settings(write_folder_dataset(tmp_path), tmp_path / "cache", sweep_crops=(1, 2),
                               sweep_alpha=(0.0, 1.0)))
    assert [(c.num_crops, c.alpha) for c, _ in report.sweep] == [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0)]
    for config, metrics in report.sweep:
        if config.alpha == 1.0:  # image-weighted pooling with alpha 1 is exactly the global score
            assert metrics == report.results["global"]
    assert len(report.to_json()["sweep"]) == 4


# ---- cache -----------------------------------------------------------------------------------------------------

def test_cache_reuses_features_across_scoring_settings(tmp_path, calls):
    data, cache = write_folder_dataset(tmp_path / "d"), tmp_path / "cache"
    first = evaluate(settings(data, cache))
    assert calls == {"texts": len(TEXTS), "images": N_IMAGES} and not first.meta["features_cached"]
    again = evaluate(settings(data, cache))
    assert again.results == first.results and again.meta["features_cached"]
    rescored = evaluate(settings(data, cache, laclip=LaclipConfig(num_crops=2, tau=0.03, alpha=0.2, weights="text")))
    assert calls == {"texts": len(TEXTS), "images": N_IMAGES}  # nothing re-encoded
    assert rescored.results["global"] == first.results["global"]
    evaluate(settings(data, cache, laclip=LaclipConfig(num_crops=3)))  # other K: new crops, same texts
    assert calls == {"texts": len(TEXTS), "images": 2 * N_IMAGES}


def test_cache_from_another_text_pipeline_is_not_reused(tmp_path, calls, monkeypatch):
    data, cache = write_folder_dataset(tmp_path / "d"), tmp_path / "cache"
    monkeypatch.setattr(features, "TEXT_PIPELINE", "raw-text-v0")  # a cache written by an older engine
    old = evaluate(settings(data, cache))
    monkeypatch.setattr(features, "TEXT_PIPELINE", TEXT_PIPELINE)
    new = evaluate(settings(data, cache))
    assert calls["texts"] == 2 * len(TEXTS) and calls["images"] == N_IMAGES  # texts re-encoded, images reused
    assert new.results == old.results and not new.meta["features_cached"]


def test_cache_notices_changed_files(tmp_path, calls):
    data, cache = write_folder_dataset(tmp_path / "d"), tmp_path / "cache"
    evaluate(settings(data, cache))
    (data / "images" / "4.png").write_bytes(_png(9))
    evaluate(settings(data, cache))
    assert calls["images"] == 2 * N_IMAGES and calls["texts"] == len(TEXTS)


# ---- bad data --------------------------------------------------------------------------------------------------

def _bad_case(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A dataset with one bad record and the 'file:line' its report must name."""
    lines = _texts_lines()
    if case == "missing_image":
        lines[2] = json.dumps({"text_id": 2, "text": "蓝色丝绸", "image_ids": [2, 99]}, ensure_ascii=False)
        return write_folder_dataset(tmp_path, lines), "test_texts.jsonl:3:"
    if case == "malformed_line":
        lines.insert(1, '{"text_id": 100, "text": "没有结尾"')
        return write_folder_dataset(tmp_path, lines), "test_texts.jsonl:2:"
    if case == "tokenless_text":
        lines[4] = json.dumps({"text_id": 4, "text": "\u200b\x00 \x07", "image_ids": [3]})
        return write_folder_dataset(tmp_path, lines), "test_texts.jsonl:5:"
    if case == "duplicate_text_id":
        lines.append(json.dumps({"text_id": 1, "text": "重复", "image_ids": [1]}, ensure_ascii=False))
        return write_folder_dataset(tmp_path, lines), "test_texts.jsonl:9:"
    if case == "undecodable_file":
        data = write_folder_dataset(tmp_path)
        (data / "images" / "6.png").write_bytes(b"not a png at all")
        return data, "6.png:"
    rows = [f"{i}\t{base64.b64encode(_png(i)).decode()}" for i in range(N_IMAGES)]
    if case == "undecodable_tsv":
        rows[6] = "6\t" + base64.b64encode(b"garbage bytes").decode()
    elif case == "bad_base64_tsv":
        rows[6] = "6\t@@@not-base64@@@"
    elif case == "duplicate_image_id_tsv":
        rows.append(f"3\t{base64.b64encode(_png(3)).decode()}")
        return write_tsv_dataset(tmp_path, rows=rows), "test_imgs.tsv:9:"
    return write_tsv_dataset(tmp_path, rows=rows), "test_imgs.tsv:7:"


BAD_CASES = ["missing_image", "malformed_line", "tokenless_text", "duplicate_text_id", "undecodable_file",
             "undecodable_tsv", "bad_base64_tsv", "duplicate_image_id_tsv"]
# texts and images left after skipping: image 6 undecodable drops text 7 (images 5, 6) with it
LEFT = {"missing_image": (7, 8), "malformed_line": (8, 8), "tokenless_text": (7, 8), "duplicate_text_id": (8, 8),
        "undecodable_file": (7, 7), "undecodable_tsv": (7, 7), "bad_base64_tsv": (7, 7),
        "duplicate_image_id_tsv": (8, 8)}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_data_fails_naming_file_and_line(tmp_path, case):
    data, where = _bad_case(tmp_path, case)
    with pytest.raises(DatasetError) as info:
        evaluate(settings(data, tmp_path / "cache"))
    assert len(info.value.problems) == 1
    assert where in str(info.value.problems[0]) and where in str(info.value)


@pytest.mark.parametrize("case", BAD_CASES)
def test_skip_bad_skips_and_reports(tmp_path, case):
    data, where = _bad_case(tmp_path, case)
    report = evaluate(settings(data, tmp_path / "cache", skip_bad=True))
    assert any(where in str(p) for p in report.skipped)
    assert (report.meta["texts"], report.meta["images"]) == LEFT[case]
    assert len(report.skipped) == (2 if case.startswith(("undecodable", "bad_base64")) else 1)
    assert report.to_json()["meta"]["skipped"] == len(report.skipped)


def test_all_problems_are_listed_before_any_encoding(tmp_path, calls):
    lines = _texts_lines()
    lines.insert(0, "not json")
    data = write_folder_dataset(tmp_path, lines)
    (data / "images" / "6.png").write_bytes(b"")
    with pytest.raises(DatasetError) as info:
        evaluate(settings(data, tmp_path / "cache"))
    assert sorted(p.kind for p in info.value.problems) == ["malformed", "undecodable"]
    assert calls == {"texts": 0, "images": 0}


def test_duplicate_image_stem_in_folder(tmp_path):
    data = write_folder_dataset(tmp_path)
    (data / "images" / "3.jpg").write_bytes(image_bytes(make_image(30, 30, seed=1), "JPEG"))
    problems = read_dataset(data, "test").problems
    assert [p.kind for p in problems] == ["duplicate"] and "3.jpg" in str(problems[0])


# ---- command line ----------------------------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.eval", "--model", "tiny", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_documented_json(tmp_path, tiny_checkpoint):
    data, out = write_tsv_dataset(tmp_path / "d"), tmp_path / "out.json"
    proc = _cli("--checkpoint", str(tiny_checkpoint), "--data", str(data), "--split", "test", "--crops", "2",
                "--sweep-tau", "0.05,0.1", "--cache-dir", str(tmp_path / "cache"), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    for mode in ("global", "laclip"):
        assert set(result[mode]) == {"text_to_image", "image_to_text", "MR"}
        six = [result[mode][d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in KS]
        assert all(0 <= x <= 100 for x in six)
        assert result[mode]["MR"] == pytest.approx(np.mean(six))
        assert f"{mode:8}" in proc.stdout
    assert [(row["tau"], row["crops"]) for row in result["sweep"]] == [(0.05, 2), (0.1, 2)]
    assert result["meta"]["texts"] == len(TEXTS) and result["meta"]["skipped"] == 0


def test_cli_bad_data_exit_code_and_skip_count(tmp_path):
    data, where = _bad_case(tmp_path, "malformed_line")
    proc = _cli("--data", str(data), "--no-cache")
    assert proc.returncode == 2 and where in proc.stderr
    proc = _cli("--data", str(data), "--no-cache", "--skip-bad", "--crops", "0")
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 bad record:" in proc.stderr and where in proc.stderr
    assert "global" in proc.stdout and "laclip" not in proc.stdout


def test_cli_names_an_empty_image_once(tmp_path):
    data = write_folder_dataset(tmp_path)
    empty = data / "images" / "6.png"
    empty.write_bytes(b"")
    proc = _cli("--data", str(data), "--no-cache", "--crops", "0")
    assert proc.returncode == 2
    assert "error: 1 bad record (rerun with --skip-bad" in proc.stderr
    assert f"{empty}: image '6' cannot be decoded: empty file" in proc.stderr and proc.stderr.count(str(empty)) == 1


def test_cli_predictions_write_the_global_rankings_without_laclip(tmp_path, capsys):
    data, preds = write_folder_dataset(tmp_path / "d"), tmp_path / "preds.jsonl"
    assert eval_main(["--model", "tiny", "--data", str(data), "--no-cache", "--crops", "0",
                      "--predictions", str(preds)]) == 0
    out, err = capsys.readouterr()
    assert "wrote global rankings" in out
    assert "needs 10 predictions per query" in err  # 8 texts and 8 images: cn_clip's scorer would refuse
    t2i = [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]
    i2t = [json.loads(line) for line in (tmp_path / "preds.tr.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["text_id"] for line in t2i] == [t for t, _, _ in TEXTS]
    assert [line["image_id"] for line in i2t] == list(range(N_IMAGES))  # every image, as cn_clip writes them
    assert all(sorted(line["image_ids"]) == list(range(N_IMAGES)) for line in t2i)
    assert all(sorted(line["text_ids"]) == [t for t, _, _ in TEXTS] for line in i2t)


def test_predictions_mode_must_be_known_and_laclip_needs_crops(tmp_path, capsys):
    with pytest.raises(InputError, match="'best'"):
        EvalSettings(data=tmp_path, rank_mode="best")
    assert eval_main(["--model", "tiny", "--data", str(write_folder_dataset(tmp_path / "d")), "--no-cache",
                      "--crops", "0", "--predictions", str(tmp_path / "p.jsonl"), "--predictions-mode", "laclip"]) == 2
    assert "needs LACLIP" in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()
