"""Fidelity to cn_clip's own evaluation pipeline, with cn_clip's code as the judge (imported, never copied).

Texts: cn_clip's `_preprocess_text` + `EvalTxtDataset` tokens + CLIP `encode_text` (as `extract_features.py`
runs them) against the engine's `Tokenizer` and `engine.eval` features. Images: cn_clip's `build_lmdb_dataset`
+ `EvalImgDataset` (urlsafe base64, resize, then RGB) against `engine.eval`'s TSV reader and transform.
Rankings: `engine.eval --predictions` files scored by cn_clip's `evaluation.py` / `evaluation_tr.py`.
"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cn_clip.clip import tokenize
from cn_clip.clip.model import CLIP
from cn_clip.eval import evaluation, evaluation_tr
from cn_clip.eval.data import EvalImgDataset, EvalTxtDataset
from cn_clip.eval.data import _preprocess_text as eval_preprocess_text
from cn_clip.training.data import _preprocess_text as train_preprocess_text
from PIL import Image

from conftest import image_bytes, make_image
from engine import LaclipConfig, Retriever
from engine.eval import EvalSettings, evaluate, read_dataset
from engine.dataset_features import FeatureCache, image_features, text_features
from engine.recall import retrieval_metrics
from engine.eval.predictions import image_to_text_path, json_id, rank, unscorable_by_cn_clip, write_predictions
from engine.models import get_spec
from engine.preprocess import Tokenizer, normalize_text

ROOT = Path(__file__).resolve().parents[1]
MIN_COSINE = 0.99999

# ---- generated texts -------------------------------------------------------------------------------------------

EDGES = [
    "“敦煌壁画”中的飞天", "他说：“你好”。", "‘单引号’里的字", "‘Single’ and ’odd‘ quotes",
    "CLIP Model ON A Cat", "ＡＢＣ全角Ｌａｔｉｎ ｃｌｉｐ", "臺灣的國語與書畫", "龍門石窟 飛龍在天",
    "猫 cat ねこ 고양이 Кошка قط", "😀一只🐱在晒太阳👍🏽🇨🇳", "   前后都有空格   ", "\t\u3000全角空格\u3000\n",
    "İSTANBUL ΟΔΟΣ ÉCOLE Straße", "长" * 80, "“" + "引号很长的句子" * 12 + "”", '混合"直引号"和“弯引号”',
]
POOLS = ["猫狗山水花鸟月光红蓝白的在上中里人", "臺灣國語龍門書畫飛與風", "ABCXYZ Hello WORLD", "ＡＢＣｘｙｚ",
         "“”‘’\"'", "😀🐱👍🇨🇳", "ねこ고양이КошкаقطÉÖ", "0123456789，。！？ "]


def generated_texts(n: int = 40, seed: int = 7) -> list[str]:
    """The edge cases above plus random mixes of the pools (lengths 1..90, some past the context)."""
    rng = np.random.default_rng(seed)
    texts = list(EDGES)
    for _ in range(n):
        chars = []
        for _ in range(int(rng.integers(1, 90))):
            pool = POOLS[int(rng.integers(len(POOLS)))]
            chars.append(pool[int(rng.integers(len(pool)))])
        texts.append("猫" + "".join(chars) if rng.random() < 0.5 else "".join(chars) + "山")
    return texts


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


@pytest.fixture(scope="module")
def cn_model(tiny_checkpoint) -> CLIP:
    """cn_clip's own CLIP loaded as `extract_features.py --precision fp32` does (no engine code involved)."""
    model = CLIP(**get_spec("tiny").config())
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k[len("module."):]: v for k, v in state.items() if "bert.pooler" not in k})
    return model.float().eval()


def cn_features(model: CLIP, batch: torch.Tensor, text: bool) -> np.ndarray:
    """`extract_features.py`: model(None, texts) / model(images, None), then divided by its norm."""
    with torch.no_grad():
        features = model(None, batch) if text else model(batch, None)
        features /= features.norm(dim=-1, keepdim=True)
    return features.numpy()


@pytest.fixture(scope="module")
def retriever(tiny_checkpoint) -> Retriever:
    return Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=None, progress=False, batch_size=16)


# ---- text normalisation and tokens -----------------------------------------------------------------------------

def test_normalize_text_is_cn_clips_preprocess_text():
    for text in generated_texts(200, seed=1):
        assert normalize_text(text) == eval_preprocess_text(text) == train_preprocess_text(text)


def _write_texts(path: Path, texts: list[str]) -> Path:
    lines = [json.dumps({"text_id": i, "text": t, "image_ids": [0]}, ensure_ascii=False) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("context_length", [52, 24])
def test_tokens_equal_cn_clips_eval_dataset(tmp_path, context_length):
    texts = generated_texts()
    dataset = EvalTxtDataset(str(_write_texts(tmp_path / "t.jsonl", texts)), max_txt_length=context_length)
    reference = torch.stack([dataset[i][1] for i in range(len(dataset))])
    assert torch.equal(Tokenizer(context_length)(texts).ids, reference)


def test_text_embeddings_equal_cn_clips_eval_pipeline(retriever, cn_model):
    texts = generated_texts()
    reference = cn_features(cn_model, tokenize([eval_preprocess_text(t) for t in texts]), text=True)
    assert _cosines(retriever.encode_texts(texts), reference).min() >= MIN_COSINE


def test_the_normalisation_is_what_makes_curly_quotes_agree(retriever, cn_model):
    """Without normalize_text the curly-quote texts would tokenize (and embed) differently: the tests have teeth."""
    quoted = [t for t in generated_texts() if "“" in t or "”" in t]
    assert len(quoted) >= 4
    raw = tokenize(quoted)
    assert not torch.equal(raw, Tokenizer()(quoted).ids)
    reference = cn_features(cn_model, tokenize([eval_preprocess_text(t) for t in quoted]), text=True)
    assert _cosines(cn_features(cn_model, raw, text=True), reference).min() < MIN_COSINE


# ---- the whole eval feature pipeline: engine.eval vs cn_clip's LMDB datasets -----------------------------------

def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": cn_clip never applies EXIF orientation, so neither may we
    buf = io.BytesIO()
    make_image(120, 60, seed=41).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def _gif() -> bytes:
    frames = [make_image(50, 70, seed=s).convert("P") for s in (42, 43)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def gallery() -> dict[int, bytes]:
    """Image id -> encoded bytes: odd sizes and every mode cn_clip converts, EXIF orientation, a 2-frame GIF."""
    images = {3: _exif_rotated_jpeg(), 10: _gif(), 25: image_bytes(make_image(300, 41, "CMYK", seed=44), "JPEG")}
    modes = ["RGB", "RGBA", "LA", "P", "L", "I;16", "RGB", "RGBA", "L", "RGB", "P", "RGB", "RGB"]
    for n, mode in enumerate(modes):
        images[100 + 7 * n] = image_bytes(make_image(40 + 13 * n, 90 - 3 * n, mode, seed=60 + n), "PNG")
    return images


def write_cn_clip_dataset(root: Path, n_texts: int = 20, seed: int = 3) -> tuple[Path, dict[int, list[int]]]:
    """cn_clip's layout (test_imgs.tsv with standard base64, test_texts.jsonl) with integer ids; the last image
    is described by no text. Returns the folder and each text id's image ids."""
    root.mkdir(parents=True, exist_ok=True)
    images = gallery()
    rows = [f"{i}\t{base64.b64encode(data).decode()}" for i, data in images.items()]
    (root / "test_imgs.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    rng = np.random.default_rng(seed)
    ids, texts = list(images)[:-1], generated_texts(n_texts, seed=seed)[-n_texts:]
    truth = {}
    lines = []
    for n, text in enumerate(texts):
        chosen = sorted(int(i) for i in rng.choice(ids, size=1 + n % 2, replace=False))
        truth[1000 + 3 * n] = chosen
        lines.append(json.dumps({"text_id": 1000 + 3 * n, "text": text, "image_ids": chosen}, ensure_ascii=False))
    (root / "test_texts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, truth


def _run_cn_clip_script(module: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_eval_features_equal_cn_clips_lmdb_eval_pipeline(tmp_path, retriever, cn_model):
    data, _ = write_cn_clip_dataset(tmp_path / "d")
    _run_cn_clip_script("cn_clip.preprocess.build_lmdb_dataset", "--data_dir", str(data), "--splits", "test")
    images = EvalImgDataset(str(data / "lmdb" / "test" / "imgs"), resolution=retriever.encoder.input_resolution)
    cn_images = [images[i] for i in range(len(images))]
    cn_image_feats = dict(zip([str(i) for i, _ in cn_images],
                              cn_features(cn_model, torch.stack([p for _, p in cn_images]), text=False)))
    texts = EvalTxtDataset(str(data / "test_texts.jsonl"), max_txt_length=retriever.tokenizer.context_length)
    cn_texts = [texts[i] for i in range(len(texts))]
    cn_text_feats = dict(zip([str(i) for i, _ in cn_texts],
                             cn_features(cn_model, torch.stack([t for _, t in cn_texts]), text=True)))

    dataset = read_dataset(data, "test", "tsv")
    ours_images = image_features(retriever, dataset, FeatureCache(None), progress=False)
    ours_texts = text_features(retriever, dataset, FeatureCache(None), progress=False)
    assert not ours_images.problems and sorted(ours_images.ids) == sorted(cn_image_feats)
    assert ours_texts.ids == list(cn_text_feats)
    reference = np.stack([cn_image_feats[i] for i in ours_images.ids])
    assert _cosines(ours_images.global_, reference).min() >= MIN_COSINE
    assert _cosines(ours_texts.emb, np.stack(list(cn_text_feats.values()))).min() >= MIN_COSINE


# ---- cn_clip's scorer on engine.eval's prediction files --------------------------------------------------------

def cn_clip_recalls(texts_jsonl: Path, predictions: Path) -> dict[str, dict[str, float]]:
    """cn_clip's evaluation.py and evaluation_tr.py on the two prediction files (the tr golden file made by
    cn_clip's transform_ir_annotation_to_tr.py)."""
    golden_tr = texts_jsonl.with_name(texts_jsonl.name.replace(".jsonl", ".tr.jsonl"))
    if not golden_tr.exists():
        _run_cn_clip_script("cn_clip.eval.transform_ir_annotation_to_tr", "--input", str(texts_jsonl))
    out = {}
    for direction, scorer, golden, path in (
            ("text_to_image", evaluation, texts_jsonl, predictions),
            ("image_to_text", evaluation_tr, golden_tr, image_to_text_path(predictions))):
        _, r1, r5, r10 = scorer.compute_score(str(golden), str(path))
        out[direction] = {"R@1": r1, "R@5": r5, "R@10": r10}
    return out


def _assert_same_recalls(engine_metrics: dict, cn_clip: dict) -> None:
    for direction in ("text_to_image", "image_to_text"):
        assert engine_metrics[direction] == pytest.approx(cn_clip[direction], abs=1e-9), direction


def test_cli_predictions_scored_by_cn_clip_equal_engine_recalls(tmp_path, tiny_checkpoint):
    data, _ = write_cn_clip_dataset(tmp_path / "d")
    out, preds = tmp_path / "out.json", tmp_path / "p" / "preds.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.eval", "--model", "tiny", "--checkpoint", str(tiny_checkpoint),
         "--data", str(data), "--crops", "2", "--no-cache", "--json", str(out), "--predictions", str(preds)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "note:" not in proc.stderr  # integer ids and >= 10 per side: cn_clip's scorer accepts the files
    assert preds.exists() and (tmp_path / "p" / "preds.tr.jsonl").exists()
    laclip = json.loads(out.read_text(encoding="utf-8"))["laclip"]
    recalls = [laclip[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
    assert min(recalls) < 100  # a comparison with room to disagree
    _assert_same_recalls(laclip, cn_clip_recalls(data / "test_texts.jsonl", preds))


def test_global_rankings_scored_by_cn_clip_equal_engine_recalls(tmp_path, tiny_checkpoint):
    data, truth = write_cn_clip_dataset(tmp_path / "d", n_texts=24, seed=9)
    report = evaluate(EvalSettings(data=data, model="tiny", checkpoint=str(tiny_checkpoint), cache_dir=None,
                                   laclip=LaclipConfig(num_crops=2), rank_mode="global", progress=False))
    rankings = report.rankings
    assert rankings is not None and unscorable_by_cn_clip(rankings) is None
    t2i, _ = write_predictions(rankings, tmp_path / "global.jsonl")
    first = json.loads(t2i.read_text(encoding="utf-8").splitlines()[0])
    assert first["text_id"] == min(truth) and len(first["image_ids"]) == 10
    assert all(isinstance(i, int) for i in first["image_ids"])
    _assert_same_recalls(report.results["global"], cn_clip_recalls(data / "test_texts.jsonl", t2i))


def test_tie_rule_agrees_with_cn_clips_scorer_on_heavily_tied_scores(tmp_path):
    """Integer scores (many ties): the written top-10 follow best_ranks' rule, so both scorers agree."""
    rng = np.random.default_rng(11)
    n_texts, n_images = 15, 12
    scores = rng.integers(0, 3, size=(n_texts, n_images)).astype(np.float32)
    truth = [sorted(rng.choice(n_images - 1, size=int(rng.integers(1, 3)), replace=False).tolist())
             for _ in range(n_texts)]
    text_ids, image_ids = [str(50 + t) for t in range(n_texts)], [str(7 * i) for i in range(n_images)]
    golden = tmp_path / "test_texts.jsonl"
    golden.write_text("".join(json.dumps({"text_id": int(text_ids[t]), "text": "x",
                                          "image_ids": [int(image_ids[i]) for i in items]}) + "\n"
                              for t, items in enumerate(truth)), encoding="utf-8")
    t2i, _ = write_predictions(rank(scores, text_ids, image_ids), tmp_path / "preds.jsonl")
    _assert_same_recalls(retrieval_metrics(scores, truth), cn_clip_recalls(golden, t2i))


def test_rankings_are_a_stable_descending_sort():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 4, size=(9, 13)).astype(np.float32)
    rankings = rank(scores, [str(i) for i in range(9)], [str(i) for i in range(13)])
    assert rankings.text_to_image.tolist() == np.argsort(-scores, axis=1, kind="stable")[:, :10].tolist()
    assert rankings.image_to_text.tolist() == np.argsort(-scores.T, axis=1, kind="stable")[:, :9].tolist()


@pytest.mark.parametrize("value, expected", [("7", 7), ("-3", -3), ("0", 0), ("007", "007"), (" 1", " 1"),
                                             ("1_000", "1_000"), ("a1", "a1"), ("١", "١"), ("-0", "-0")])
def test_json_id_writes_only_canonical_integers_as_numbers(value, expected):
    assert json_id(value) == expected and type(json_id(value)) is type(expected)


def test_prediction_paths_and_unscorable_reasons(tmp_path):
    assert image_to_text_path(tmp_path / "preds.jsonl") == tmp_path / "preds.tr.jsonl"
    assert image_to_text_path(tmp_path / "preds") == tmp_path / "preds.tr.jsonl"
    scores = np.eye(12, dtype=np.float32)
    ids = [str(i) for i in range(12)]
    assert unscorable_by_cn_clip(rank(scores, ids, ids)) is None
    assert "integer ids" in unscorable_by_cn_clip(rank(scores, ids[:-1] + ["cat"], ids))
    assert "10 predictions" in unscorable_by_cn_clip(rank(scores[:, :5], ids, ids[:5]))
