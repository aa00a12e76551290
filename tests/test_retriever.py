"""End to end: a tiny cn_clip checkpoint through from_checkpoint, index, search both ways vs brute-force numpy."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import SAMPLE_TEXTS, image_bytes, make_image
from engine import ImageDecodeError, IndexFormatError, InputError, LaclipConfig, Retriever
from engine.gallery import list_images
from engine.index import Index, IndexManifest
from engine.models import build_random_model, get_spec, save_checkpoint

MODES = {
    "global": None,
    "laclip-image": LaclipConfig(num_crops=3, tau=0.05, alpha=0.3),
    "laclip-text": LaclipConfig(num_crops=3, tau=0.05, alpha=0.3, weights="text"),
    "laclip-grid": LaclipConfig(num_crops=4, crop_mode="grid", alpha=0.0),
}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def brute_force(t: np.ndarray, g: np.ndarray, c: np.ndarray | None, config: LaclipConfig | None) -> np.ndarray:
    """[Q, N] scores straight from the formula in float64 numpy, independent of engine code."""
    t, g = t.astype(np.float64), g.astype(np.float64)
    if config is None:
        return t @ g.T
    c = c.astype(np.float64)
    sims = np.einsum("qd,nkd->qnk", t, c)
    if config.weights == "image":
        w = _softmax(np.einsum("nkd,nd->nk", c, g) / config.tau)[None]
    else:
        w = _softmax(sims / config.tau)
    return config.alpha * (t @ g.T) + (1 - config.alpha) * (w * sims).sum(-1)


def expected_order(scores: np.ndarray, ids: list) -> list[list]:
    return [[ids[i] for i in np.argsort(-row, kind="stable")] for row in scores]


@pytest.fixture(scope="module", params=list(MODES))
def built(request, tiny_checkpoint, image_dir):
    config = MODES[request.param]
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=config, batch_size=5, progress=False)
    retriever.add_images(list_images(image_dir))
    retriever.add_texts(SAMPLE_TEXTS, ids=[f"t{i}" for i in range(len(SAMPLE_TEXTS))])
    return retriever, config


def test_text_to_image_matches_brute_force(built):
    retriever, config = built
    queries = SAMPLE_TEXTS[:4]
    t = retriever.encode_texts(queries)
    idx = retriever.index
    crops = idx.array("image_crops") if config else None
    scores = brute_force(t, idx.array("image_global"), crops, config)
    hits = retriever.search_images(queries, k=12)
    for row, query_hits, order in zip(scores, hits, expected_order(scores, idx.image_ids)):
        assert [h.id for h in query_hits] == order
        assert np.allclose([h.score for h in query_hits], np.sort(row)[::-1], atol=1e-5)
    single = retriever.search_images(queries[0], k=3)  # a bare str gives that query's hits
    assert [h.id for h in single] == [h.id for h in hits[0][:3]]
    assert np.allclose([h.score for h in single], [h.score for h in hits[0][:3]], atol=1e-5)


def test_image_to_text_matches_brute_force(built, image_dir):
    retriever, config = built
    images = list_images(image_dir)[:3]
    emb = retriever.encode_image_views(images)
    t = retriever.index.array("text_emb")
    scores = brute_force(t, emb.global_, emb.crops, config).T  # [images, texts]
    hits = retriever.search_texts(images, k=len(SAMPLE_TEXTS))
    for row, image_hits, order in zip(scores, hits, expected_order(scores, retriever.index.text_ids)):
        assert [h.id for h in image_hits] == order
        assert np.allclose([h.score for h in image_hits], np.sort(row)[::-1], atol=1e-5)


def test_image_ids_default_to_file_stems(built, image_dir):
    retriever, _ = built
    assert retriever.index.image_ids == [p.stem for p in list_images(image_dir)]


def test_save_load_round_trip(built, tmp_path, tiny_checkpoint):
    retriever, config = built
    retriever.save(tmp_path / "idx")
    loaded = Retriever.load(tmp_path / "idx", progress=False)
    assert loaded.laclip == config
    assert loaded.search_images(SAMPLE_TEXTS[:2], k=5) == retriever.search_images(SAMPLE_TEXTS[:2], k=5)
    assert loaded.index.text_ids == retriever.index.text_ids


def test_index_from_another_checkpoint_is_refused(built, tmp_path):
    retriever, _ = built
    retriever.save(tmp_path / "idx")
    other = save_checkpoint(build_random_model(get_spec("tiny"), seed=99), tmp_path / "other.pt")
    with pytest.raises(IndexFormatError, match="checkpoint hash"):
        Retriever.load(tmp_path / "idx", checkpoint=other)
    with pytest.raises(IndexFormatError, match="checkpoint hash"):
        Retriever.from_checkpoint(None, model="tiny").attach(retriever.index)
    foreign = Index(IndexManifest("RN50", retriever.identity.checkpoint_hash, 32, retriever.laclip))
    with pytest.raises(IndexFormatError, match="built with model 'RN50'"):
        retriever.attach(foreign)


def test_rescoring_with_new_tau_alpha_keeps_crops(tiny_checkpoint, image_dir):
    config = LaclipConfig(num_crops=2, tau=0.1, alpha=0.5)
    first = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=config, progress=False)
    first.add_images(list_images(image_dir)[:5])
    rescored = Retriever.from_checkpoint(tiny_checkpoint, model="tiny",
                                         laclip=LaclipConfig(num_crops=2, tau=1.0, alpha=0.0), progress=False)
    rescored.attach(first.index)
    t = rescored.encode_texts(SAMPLE_TEXTS[:1])
    scores = brute_force(t, first.index.array("image_global"), first.index.array("image_crops"), rescored.laclip)
    assert np.allclose([h.score for h in rescored.search_images(SAMPLE_TEXTS[0], k=5)], np.sort(scores[0])[::-1],
                       atol=1e-5)
    with pytest.raises(IndexFormatError, match="LACLIP crops"):
        Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(num_crops=3)).attach(first.index)


@pytest.fixture(scope="module")
def small(tiny_checkpoint):
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", progress=False)
    retriever.add_images([make_image(50, 60, seed=i) for i in range(3)], ids=["a", "b", "c"])
    retriever.add_texts(SAMPLE_TEXTS[:3])
    return retriever


@pytest.mark.parametrize("k", [0, 4, -1, 2.5, True])
def test_k_out_of_range(small, k):
    with pytest.raises(InputError, match="k must be"):
        small.search_images("猫", k=k)


def test_bad_queries_and_adds_leave_the_index_unchanged(small):
    before = (list(small.index.image_ids), list(small.index.text_ids))
    with pytest.raises(InputError, match="empty"):
        small.search_images("", k=1)
    with pytest.raises(InputError, match="single str"):
        small.add_texts("猫")
    with pytest.raises(InputError, match="duplicate id 'a'"):
        small.add_images([make_image(10, 10)], ids=["a"])
    with pytest.raises(ImageDecodeError, match="bytes"):
        small.add_images([image_bytes(make_image(10, 10)), b"garbage"])
    with pytest.raises(ImageDecodeError):
        small.search_texts(b"", k=1)
    assert (small.index.image_ids, small.index.text_ids) == before
    assert small.index.text_ids == [0, 1, 2]


def test_empty_index_search_is_an_error(tiny_checkpoint):
    with pytest.raises(InputError, match="no images"):
        Retriever.from_checkpoint(tiny_checkpoint, model="tiny").search_images("猫")


def test_command_line_index_and_search(tiny_checkpoint, image_dir, tmp_path):
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text_id": i, "text": t}, ensure_ascii=False) + "\n"
                             for i, t in enumerate(SAMPLE_TEXTS)), encoding="utf-8")
    run = [sys.executable, "-m", "engine"]
    subprocess.run(run + ["index", "--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--images",
                          str(image_dir), "--texts", str(texts), "--out", str(tmp_path / "idx"), "--crops", "2"],
                   check=True, capture_output=True, text=True)
    out = subprocess.run(run + ["search", "--index", str(tmp_path / "idx"), "--text", SAMPLE_TEXTS[1], "-k", "3",
                                "--json"], check=True, capture_output=True, text=True).stdout
    retriever = Retriever.load(tmp_path / "idx")
    expected = [{"id": h.id, "score": pytest.approx(h.score, abs=1e-6), "payload": h.payload}
                for h in retriever.search_images(SAMPLE_TEXTS[1], k=3)]
    assert json.loads(out) == expected
    image_query = str(list_images(image_dir)[0])
    out = subprocess.run(run + ["search", "--index", str(tmp_path / "idx"), "--image", image_query, "-k", "2",
                                "--json"], check=True, capture_output=True, text=True).stdout
    assert [h["id"] for h in json.loads(out)] == [h.id for h in retriever.search_texts(image_query, k=2)]
    bad = subprocess.run(run + ["search", "--index", str(tmp_path / "nope"), "--text", "猫"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "not an index" in bad.stderr


@pytest.mark.skipif(not __import__("engine.ops").ops.extension_available(), reason="LACLIP extension not built")
def test_kernel_and_pooled_gemm_paths_rank_alike():
    """Image-conditioned LACLIP serves from the pooled GEMM; the fused kernel must give the same rankings."""
    import torch

    from engine import ops, scoring
    from engine.index import topk_rows
    rng = np.random.default_rng(0)
    t, g, c = (rng.standard_normal(s).astype(np.float32) for s in ((16, 64), (2000, 64), (2000, 4, 64)))
    t, g, c = (x / np.linalg.norm(x, axis=-1, keepdims=True) for x in (t, g, c))
    config = LaclipConfig(num_crops=4, tau=0.07, alpha=0.2)
    gemm_values, gemm_indices = topk_rows(scoring.score_images(t, g, c, scoring.pool(g, c, config), config), 50)
    kernel_values, kernel_indices = ops.laclip_topk(torch.from_numpy(t), torch.from_numpy(g), torch.from_numpy(c),
                                                    k=50, alpha=config.alpha, tau=config.tau, weights="image")
    assert np.array_equal(kernel_indices.numpy(), gemm_indices)
    assert np.allclose(kernel_values.numpy(), gemm_values, atol=1e-5)


@pytest.fixture(scope="module")
def laclip_bound(tiny_checkpoint, image_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bound") / "idx"
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=MODES["laclip-text"], progress=False)
    retriever.add_images(list_images(image_dir)[:6], payloads=[{"album": "a"}] + [None] * 5)
    retriever.add_texts(SAMPLE_TEXTS, payloads=[{"lang": "zh"}] + [None] * (len(SAMPLE_TEXTS) - 1))
    retriever.save(root)
    return retriever, root


def test_hits_carry_payloads_and_images_keep_thumbnails(laclip_bound, image_dir):
    from PIL import Image

    retriever, _ = laclip_bound
    first = list_images(image_dir)[0]
    assert retriever.image_payload(first.stem) == {"source": first.name, "album": "a"}
    assert retriever.text_payload(0) == {"text": SAMPLE_TEXTS[0], "lang": "zh"}
    hits = retriever.search_texts(first, k=3)
    assert all(h.payload["text"] == SAMPLE_TEXTS[h.id] for h in hits)
    thumb = Image.open(__import__("io").BytesIO(retriever.thumbnail(first.stem)))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    with pytest.raises(InputError, match="unknown image id 'nope'"):
        retriever.thumbnail("nope")


def test_per_call_scoring_equals_a_retriever_with_those_settings(laclip_bound, tiny_checkpoint):
    from engine.laclip import ScoreConfig

    retriever, _ = laclip_bound
    other = ScoreConfig(tau=1.0, alpha=0.0, weights="image")
    twin = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", progress=False,
                                     laclip=LaclipConfig.from_parts(retriever.laclip.crops, other))
    twin.attach(retriever.index)
    assert retriever.search_images("飞天", k=5, score=other) == twin.search_images("飞天", k=5)
    plain = retriever.search_images("飞天", k=5, score=ScoreConfig(alpha=1.0))
    t = retriever.encode_texts(["飞天"])
    assert np.allclose([h.score for h in plain], np.sort(t @ retriever.index.array("image_global").T)[0][::-1][:5],
                       atol=1e-5)
    retriever.attach(retriever.index)  # the shared index gets the retriever's own defaults back


def test_embedding_stages_equal_the_one_call_search(laclip_bound, image_dir):
    retriever, _ = laclip_bound
    t = retriever.encode_texts(["飞天", "牡丹"])
    assert retriever.search_image_embeddings(t, k=4) == retriever.search_images(["飞天", "牡丹"], k=4)
    emb = retriever.encode_image_views(list_images(image_dir)[:2])
    assert retriever.search_text_embeddings(emb.global_, emb.crops, k=3) == \
        retriever.search_texts(list_images(image_dir)[:2], k=3)
    assert retriever.search_images("飞天", k=4, exact=True) == retriever.search_images("飞天", k=4)
    with pytest.raises(InputError, match=r"expected shape \[Q >= 1, 32\]"):
        retriever.search_image_embeddings(np.zeros((1, 31), np.float32))


def test_search_similar_by_id_leaves_the_image_out(laclip_bound, image_dir):
    retriever, _ = laclip_bound
    stem = list_images(image_dir)[2].stem
    hits = retriever.search_similar(stem, k=5)
    assert len(hits) == 5 and stem not in [h.id for h in hits]
    g = retriever.index.array("image_global")
    ids = retriever.index.image_ids
    own = g[ids.index(stem)]
    expected = [ids[i] for i in np.argsort(-(g @ own), kind="stable") if ids[i] != stem][:5]
    assert [h.id for h in hits] == expected
    by_image = retriever.search_similar(list_images(image_dir)[2], k=1)
    assert by_image[0].id == stem and by_image[0].score == pytest.approx(1.0, abs=1e-4)


def test_bound_retriever_writes_through_and_deletes(laclip_bound, tmp_path, tiny_checkpoint):
    import shutil

    _, root = laclip_bound
    shutil.copytree(root, tmp_path / "idx")
    retriever = Retriever.load(tmp_path / "idx", progress=False)
    assert retriever.directory == tmp_path / "idx"
    retriever.add_texts(["新的一句话"], ids=["new"])
    assert retriever.delete_images([retriever.index.image_ids[0]]) == 1
    with pytest.raises(InputError, match="unknown image id 'ghost'"):
        retriever.delete_images(["ghost"])
    reopened = Retriever.load(tmp_path / "idx", progress=False)
    assert reopened.index.text_ids == retriever.index.text_ids and "new" in reopened.index.text_ids
    assert reopened.index.image_ids == retriever.index.image_ids and len(reopened.index.image_ids) == 5
    stats = reopened.stats()
    assert stats["images"] == 5 and stats["bytes_on_disk"] > 0 and stats["directory"] == str(tmp_path / "idx")
    reopened.compact()
    assert reopened.stats()["segments"] == 1 and Retriever.load(tmp_path / "idx").index.text_ids[-1] == "new"


def test_imported_embeddings_are_searchable(tiny_checkpoint):
    retriever = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", progress=False)
    g = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    with pytest.warns(UserWarning, match="re-normalising"):
        retriever.add_image_embeddings(["a", "b", "c", "d"], g, payloads=[{"n": 1}, None, None, None])
    hits = retriever.search_image_embeddings(g[:1] / np.linalg.norm(g[0]), k=1)
    assert hits[0][0].id == "a" and hits[0][0].payload == {"n": 1}
    with pytest.raises(InputError, match="row #0 holds a NaN"):
        retriever.add_text_embeddings(["x"], np.full((1, 32), np.nan, np.float32))
