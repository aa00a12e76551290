"""Negative queries, crop evidence, region queries and best-crop (fragment) search, each against a brute-force numpy
computation of the documented formula on generated vectors (odd sizes, deletes, several segments, exact and
ANN), plus boxes recomputed from real images and collapse="duplicates"."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import LaclipConfig, Retriever
from engine.errors import InputError
from engine.index import AnnConfig
from engine.laclip import ScoreConfig, crop_boxes
from engine.preprocess import content_seed, load_image
from tests.conftest import image_bytes, make_image
from tests.test_filters import MODES, accepts, expected, payload_of, reference_images, unit

K = 3
SIZES = (41, 97, 1203)


@pytest.fixture(scope="module")
def retriever(tiny_checkpoint, tmp_path_factory):
    """A tiny-model LACLIP retriever on disk: three segments of generated vectors (the last with an IVF
    structure), deletes, payloads."""
    r = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(num_crops=K), progress=False,
                                  ann=AnnConfig(kind="ivf", min_rows=1000, exact_below=0))
    r.save(tmp_path_factory.mktemp("features") / "idx")
    d = r.encoder.embed_dim
    rng = np.random.default_rng(0)
    start = 0
    for size in SIZES:
        ids = list(range(start, start + size))
        r.add_image_embeddings(ids, unit(rng.normal(size=(size, d))), unit(rng.normal(size=(size, K, d))),
                               [payload_of(i) for i in ids])
        start += size
    r.delete_images([i for i in range(start) if i % 8 == 3])
    return r


def live(r: Retriever):
    ids = r.index.image_ids
    return ids, [r.image_payload(i) for i in ids], r.index.array("image_global"), r.index.array("image_crops")


def as_pairs(hits) -> list:
    return [(h.id, h.score) for h in hits]


def assert_same_hits(got: list, want: list) -> None:
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=2e-5)


@pytest.mark.parametrize("mode", list(MODES))
def test_negative_queries_equal_the_formula(retriever, mode: str) -> None:
    ids, payloads, g, c = live(retriever)
    d = retriever.encoder.embed_dim
    rng = np.random.default_rng(1)
    t, negative = unit(rng.normal(size=(2, d))), unit(rng.normal(size=(3, d)))
    score = MODES[mode] or ScoreConfig(alpha=1.0)
    w = 0.7
    scores = reference_images(t, g, c, score) - w * reference_images(negative, g, c, score).max(axis=0)[None]
    by_id = {i: n for n, i in enumerate(ids)}
    where = {"year": {"$gte": 700}}
    keep = np.array([accepts(where, p) for p in payloads])
    for exact in (True, False):
        hits = retriever.search_image_embeddings(t, 12, score=score, exact=exact, negative=negative,
                                                 negative_weight=w, where=where)
        for q, query_hits in enumerate(hits):
            if exact:
                assert_same_hits(as_pairs(query_hits), expected(scores[q:q + 1], ids, keep, 12)[0])
            for h in query_hits:  # ANN: candidates from the positive query, every score the combined formula
                assert keep[by_id[h.id]]
                assert h.score == pytest.approx(scores[q, by_id[h.id]], abs=2e-5)


def test_negative_texts_are_encoded_and_checked(retriever) -> None:
    hits = retriever.search_images("飞天", 5, negative=["壁画", "牡丹"], negative_weight=1.0, exact=True)
    t = retriever.encode_texts(["飞天"])
    n = retriever.encode_texts(["壁画", "牡丹"])
    want = retriever.search_image_embeddings(t, 5, negative=n, negative_weight=1.0, exact=True)[0]
    assert as_pairs(hits) == as_pairs(want)
    for bad, named in ((["x"] * 65, "negative"), ("", "negative"), (3, "list")):
        with pytest.raises(InputError, match=named):
            retriever.search_images("飞天", 5, negative=bad)
    with pytest.raises(InputError, match="negative_weight"):
        retriever.search_images("飞天", 5, negative="x", negative_weight=11)


@pytest.mark.parametrize("mode", list(MODES))
def test_explain_gives_each_crops_similarity_and_weight(retriever, mode: str) -> None:
    d = retriever.encoder.embed_dim
    t = unit(np.random.default_rng(2).normal(size=(1, d)))
    score = MODES[mode]
    hits = retriever.search_image_embeddings(t, 6, score=score or ScoreConfig(alpha=1.0), explain=True)[0]
    for h in hits:
        g, c = retriever.index.vector("images", h.id)
        sims = c @ t[0]
        if score is None:
            weights = np.full(K, 1 / K)
        else:
            logits = (c @ g if score.weights == "image" else sims) / score.tau
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
        ev = h.evidence
        np.testing.assert_allclose([x["similarity"] for x in ev["crops"]], sims, atol=1e-5)
        np.testing.assert_allclose([x["weight"] for x in ev["crops"]], weights, atol=1e-5)
        assert sum(x["weight"] for x in ev["crops"]) == pytest.approx(1.0, abs=1e-5)
        assert ev["best"] == int(np.argmax(weights * sims))
        assert ev["image_size"] is None and all(x["box"] is None for x in ev["crops"]) and "note" in ev
        if score is not None:  # the score is the formula over these very crops
            alpha = score.alpha
            assert h.score == pytest.approx(alpha * float(g @ t[0]) + (1 - alpha) * float(weights @ sims), abs=2e-5)


def test_best_crop_search_equals_the_max_over_crops(retriever) -> None:
    ids, payloads, g, c = live(retriever)
    rng = np.random.default_rng(3)
    q = unit(rng.normal(size=(2, retriever.encoder.embed_dim)))
    q[1] = c[10, 2]  # a fragment: one image's crop finds that image first
    scores = np.einsum("qd,nkd->qnk", q.astype(np.float64), c.astype(np.float64))
    where = {"$or": [{"album": "敦煌"}, {"n": ids[10]}]}
    keep = np.array([accepts(where, p) for p in payloads])
    hits = retriever.search_similar_embeddings(q, 9, against="crops", where=where, explain=True)
    for query, query_hits in enumerate(hits):
        assert_same_hits(as_pairs(query_hits), expected(scores[query].max(-1)[None], ids, keep, 9)[0])
        for h in query_hits:
            row = ids.index(h.id)
            assert h.evidence["best"] == int(np.argmax(scores[query, row]))
            assert [x["weight"] for x in h.evidence["crops"]] == [float(j == h.evidence["best"]) for j in range(K)]
    assert hits[1][0].id == ids[10] and hits[1][0].evidence["best"] == 2
    with pytest.raises(InputError, match="against"):
        retriever.search_similar_embeddings(q, 3, against="everything")


def test_similar_by_id_leaves_itself_out_with_every_option(retriever) -> None:
    ids, _, g, c = live(retriever)
    hits = retriever.search_similar(ids[5], 4, against="crops", explain=True)
    assert ids[5] not in [h.id for h in hits] and len(hits) == 4
    scores = (c @ g[5]).max(-1)
    order = [ids[i] for i in np.lexsort((np.arange(len(ids)), -scores)) if i != 5][:4]
    assert [h.id for h in hits] == order
    with pytest.raises(InputError, match="box"):
        retriever.search_similar(ids[5], 4, box=[0, 0, 5, 5])


@pytest.fixture(scope="module")
def images_retriever(tiny_checkpoint, tmp_path_factory):
    r = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(num_crops=4), progress=False)
    pictures = [image_bytes(make_image(w, h, seed=i)) for i, (w, h) in enumerate([(97, 61), (64, 128), (150, 150)])]
    pictures.append(pictures[0])  # an exact duplicate
    r.add_images(pictures, ids=["a", "b", "c", "a2"], payloads=[{"n": i} for i in range(4)])
    return r, pictures


def test_evidence_boxes_are_the_crops_that_were_encoded(images_retriever) -> None:
    r, pictures = images_retriever
    t = r.encode_texts(["飞天"])
    hits = r.search_image_embeddings(t, 4, explain=True)[0]
    for h in hits:
        decoded = load_image(pictures[["a", "b", "c", "a2"].index(h.id)])
        boxes = crop_boxes(decoded.width, decoded.height, r.laclip.crops, content_seed(decoded))
        assert h.evidence["image_size"] == [decoded.width, decoded.height]
        assert [tuple(x["box"]) for x in h.evidence["crops"]] == boxes
    plain = Retriever.from_checkpoint(None, model="tiny", progress=False)
    plain.add_image_embeddings(["x", "y"], unit(np.ones((2, plain.encoder.embed_dim))))
    assert all(h.evidence is None for h in plain.search_image_embeddings(t, 2, explain=True)[0])


def test_compaction_keeps_the_geometry_evidence_needs(tiny_checkpoint) -> None:
    r = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", laclip=LaclipConfig(num_crops=2), progress=False)
    pictures = [make_image(80 + 9 * i, 70, seed=40 + i) for i in range(3)]
    r.add_images(pictures[:2], ids=["p", "q"])
    r.add_image_embeddings(["v"], *(x[None] for x in r.index.vector("images", "p")))  # no geometry
    r.add_images(pictures[2:], ids=["s"])
    r.delete_images(["q"])
    t = r.encode_texts(["飞天"])
    before = {h.id: h.evidence for h in r.search_image_embeddings(t, 3, explain=True)[0]}
    r.compact()
    assert r.stats()["segments"] == 1
    after = {h.id: h.evidence for h in r.search_image_embeddings(t, 3, explain=True)[0]}
    assert after == before and after["s"]["image_size"] == [98, 70] and after["v"]["image_size"] is None


def test_a_region_query_encodes_only_the_box(images_retriever) -> None:
    r, pictures = images_retriever
    box = [10, 5, 70, 50]
    region = load_image(pictures[0]).crop(tuple(box))
    want = r.search_similar_embeddings(r.encode_images([region]), 3)[0]
    assert as_pairs(r.search_similar(pictures[0], 3, box=box)) == as_pairs(want)
    for bad in ([0, 0, 98, 10], [5, 5, 5, 9], [0, 0, 1], "0,0,1,1", [0, 0, True, 4]):
        with pytest.raises(InputError, match="box"):
            r.search_similar(pictures[0], 3, box=bad)


def test_collapse_keeps_the_best_hit_of_each_duplicate_group(images_retriever) -> None:
    r, _ = images_retriever
    r.duplicate_threshold = 0.9999  # the tiny random model puts every image near every other
    report = r.duplicates(0.9999)
    assert report["groups"] == [{"size": 2, "members": ["a", "a2"]}] and report["images"] == 4
    q = r.index.vector("images", "a")[0][None]
    plain = r.search_similar_embeddings(q, 4)[0]
    collapsed = r.search_similar_embeddings(q, 3, collapse="duplicates")[0]
    assert [h.id for h in collapsed] == [h.id for h in plain if h.id != "a2"][:3]
    with pytest.raises(InputError, match="collapse"):
        r.search_similar_embeddings(q, 3, collapse="groups")


# ---- over HTTP ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    from engine.serve.launcher import ServerProcess

    folder = tmp_path_factory.mktemp("http-gallery")
    for i in range(5):
        make_image(120 + 10 * i, 90, seed=300 + i).save(folder / f"g{i}.png")
    make_image(120, 90, seed=300).save(folder / "copy.png")  # a duplicate of g0
    root = Path(__file__).resolve().parents[1]
    srv = ServerProcess(["--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--gallery", str(folder),
                         "--crops", "4"], tmp_path_factory.mktemp("http-log") / "server.log",
                        env={"OMP_NUM_THREADS": "1", "CNCLIP_API_KEY": None}, cwd=root)
    srv.index_dir = folder / ".cnclip-index"
    with srv.serving():
        yield srv


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_http_search_options_answer_as_the_retriever_does(server, client, tiny_checkpoint) -> None:
    reference = Retriever.load(server.index_dir, checkpoint=tiny_checkpoint, progress=False)
    body = {"query": "飞天", "k": 3, "where": {"source": {"$in": ["g1.png", "g2.png", "g3.png", "g4.png"]}},
            "negative": ["牡丹"], "negative_weight": 0.8, "explain": True}
    got = client.post("/v1/search/images", json=body)
    assert got.status_code == 200, got.text
    want = reference.search_images("飞天", 3, where=body["where"], negative=["牡丹"], negative_weight=0.8,
                                   explain=True)
    hits = got.json()["hits"]
    assert [h["id"] for h in hits] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in hits], [h.score for h in want], atol=1e-5)
    for h, w in zip(hits, want):
        assert h["evidence"]["image_size"] == w.evidence["image_size"] and len(h["evidence"]["crops"]) == 4
        assert [c["box"] for c in h["evidence"]["crops"]] == [c["box"] for c in w.evidence["crops"]]
        assert sum(c["weight"] for c in h["evidence"]["crops"]) == pytest.approx(1.0, abs=1e-5)
    plain = client.post("/v1/search/images", json={"query": "飞天", "k": 2}).json()["hits"]
    assert all("evidence" not in h for h in plain)


def test_http_region_and_fragment_search_by_multipart(server, client, tiny_checkpoint) -> None:
    reference = Retriever.load(server.index_dir, checkpoint=tiny_checkpoint, progress=False)
    picture = image_bytes(make_image(120, 90, seed=302))
    form = {"k": "3", "box": "[10, 10, 70, 60]", "against": "crops", "explain": "true",
            "where": '{"source": {"$ne": "copy.png"}}'}
    got = client.post("/v1/search/similar", files={"image": ("q.png", picture)}, data=form)
    assert got.status_code == 200, got.text
    region = load_image(picture).crop((10, 10, 70, 60))
    want = reference.search_similar_embeddings(reference.encode_images([region]), 3, against="crops", explain=True,
                                               where={"source": {"$ne": "copy.png"}})[0]
    assert [h["id"] for h in got.json()["hits"]] == [h.id for h in want]
    assert [h["evidence"]["best"] for h in got.json()["hits"]] == [h.evidence["best"] for h in want]
    texts = client.post("/v1/search/texts", files={"image": ("q.png", picture)}, data={"box": "[0, 0, 5000, 5]"})
    assert texts.status_code == 422 and texts.json()["error"] == "InputError" and "box" in texts.json()["detail"]


def test_http_bad_options_are_422_input_errors_naming_them(client) -> None:
    for body, named in (({"query": "x", "k": 2, "where": {"source": {"$regex": "g"}}}, "$regex"),
                        ({"query": "x", "k": 2, "where": {"$and": {"a": 1}}}, "where.$and"),
                        ({"query": "x", "k": 2, "negative": ""}, "negative"),
                        ({"query": "x", "k": 2, "negative": "y", "negative_weight": 12}, "negative_weight")):
        got = client.post("/v1/search/images", json=body)
        assert got.status_code == 422 and got.json()["error"] == "InputError", got.text
        assert named in got.json()["detail"]
    got = client.post("/v1/search/similar", json={"id": "g0", "k": 2, "box": [0, 0, 4, 4]})
    assert got.status_code == 422 and "box" in got.json()["detail"]


def test_http_duplicates_and_payload_keys(client) -> None:
    got = client.get("/v1/index/duplicates", params={"threshold": 0.9999, "limit": 10})
    assert got.status_code == 200, got.text
    assert got.json() == {"threshold": 0.9999, "images": 6, "groups": [{"size": 2, "members": ["copy", "g0"]}]}
    assert client.get("/v1/index/duplicates", params={"threshold": 1.5}).status_code == 422
    keys = client.get("/v1/index/payload-keys", params={"kind": "images"}).json()["keys"]
    assert keys == [{"key": "source", "types": ["string"], "examples": keys[0]["examples"]}]
    assert len(keys[0]["examples"]) == 5
