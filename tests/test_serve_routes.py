"""The routes of issues 11 and 15 on a real `python -m engine.serve` process: deletes (one and bulk), stats,
durable-by-default adds, per-request LACLIP settings, payloads in hits, image -> image search, thumbnails,
JSON-lines text uploads, upload ids from file names and the "3" == 3 rule, upload-naming errors, /v1/info and
/readyz, the page, and the pixel limit beyond Pillow's own guard. Answers are compared with a Retriever opened
on the index the server wrote."""
from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from conftest import SAMPLE_TEXTS, image_bytes, make_image
from engine import Retriever
from engine.laclip import ScoreConfig
from engine.serve.launcher import ServerProcess

pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]
API_KEY = "api-key-7"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_PIXELS = 100_000_000  # above Pillow's own default guard (about 89.5 Mpx)


def png(seed: int, w: int = 96, h: int = 80) -> bytes:
    return image_bytes(make_image(w, h, seed=seed), "PNG")


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gallery")
    for i in range(6):
        make_image(120 + 10 * i, 90, seed=300 + i).save(folder / f"g{i}.png")
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text_id": f"t{i}", "text": t}, ensure_ascii=False)
                                                + "\n" for i, t in enumerate(SAMPLE_TEXTS)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def server(gallery, tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("api") / "server.log"
    srv = ServerProcess(["--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--gallery", str(gallery),
                         "--texts", str(gallery / "texts.jsonl"), "--api-key", API_KEY,
                         "--max-pixels", str(MAX_PIXELS), "--max-body-mb", "4"], log,
                        env={"OMP_NUM_THREADS": "1", "CNCLIP_API_KEY": None}, cwd=REPO)
    srv.index_dir = gallery / ".cnclip-index"
    with srv.serving():
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        yield c


def reference(server, tiny_checkpoint) -> Retriever:
    """What the server has made durable, opened directly."""
    return Retriever.load(server.index_dir, checkpoint=tiny_checkpoint, progress=False)


def same_hits(got: list[dict], want) -> None:
    assert [h["id"] for h in got] == [h.id for h in want]
    np.testing.assert_allclose([h["score"] for h in got], [h.score for h in want], atol=1e-5)
    assert [h["payload"] for h in got] == [h.payload for h in want]


def test_startup_log_info_and_readyz(server, client):
    log = server.log.read_text()
    assert f"search page {server.url}/" in log and f"{server.url}/docs" in log
    assert f"index: {server.index_dir}" in log
    ready = client.get("/readyz").json()
    assert ready["backend"] == "torch" and ready["precision"] == "fp32" and ready["device"] == "cpu"
    info = httpx.get(f"{server.url}/v1/info").json()  # no key needed
    assert info["auth"] is True and info["model"] == "tiny" and info["laclip"]["num_crops"] == 4
    assert info["max_k"] >= 10 and info["images"] == 6


def test_page_and_static_assets(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in sorted(p.name for p in (REPO / "engine/serve/static").iterdir() if p.suffix in (".js", ".css")):
        assert httpx.get(f"{server.url}/static/{asset}").status_code == 200, asset
    assert httpx.get(f"{server.url}/static/../core.py").status_code == 404


def test_text_hits_carry_the_text_and_image_hits_the_source(server, client, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    hits = client.post("/v1/search/texts", files={"image": ("q.png", png(1), "image/png")},
                       data={"k": "3"}).json()["hits"]
    same_hits(hits, ref.search_texts(png(1), k=3))
    assert all(h["payload"]["text"] in SAMPLE_TEXTS for h in hits)
    found = client.post("/v1/search/images", json={"query": SAMPLE_TEXTS[0], "k": 6}).json()["hits"]
    assert {h["payload"]["source"] for h in found} == {f"g{i}.png" for i in range(6)}


def test_per_request_laclip_settings(server, client, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    for settings in ({"alpha": 1}, {"tau": 0.5, "weights": "text"}, {"alpha": 0.0}):
        got = client.post("/v1/search/images", json={"query": SAMPLE_TEXTS[2], "k": 5, "laclip": settings}).json()
        want = ref.search_images(SAMPLE_TEXTS[2], k=5, score=ScoreConfig(**{**ref.laclip.score.to_dict(),
                                                                            **settings}))
        same_hits(got["hits"], want)
        multipart = client.post("/v1/search/texts", files={"image": ("q.png", png(2), "image/png")},
                                data={"k": "4", "laclip": json.dumps(settings)}).json()["hits"]
        same_hits(multipart, ref.search_texts(png(2), k=4, score=ScoreConfig(**{**ref.laclip.score.to_dict(),
                                                                                 **settings})))
    bad = client.post("/v1/search/images", json={"query": "x", "laclip": {"alpha": 2}})
    assert bad.status_code == 422 and "alpha" in bad.json()["detail"]


def test_similar_by_id_and_by_image(server, client, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    by_id = client.post("/v1/search/similar", json={"id": "g2", "k": 3}).json()["hits"]
    same_hits(by_id, ref.search_similar("g2", k=3))
    assert "g2" not in [h["id"] for h in by_id]
    upload = client.post("/v1/search/similar", files={"image": ("q.png", png(3), "image/png")},
                         data={"k": "3"}).json()["hits"]
    same_hits(upload, ref.search_similar(png(3), k=3))
    missing = client.post("/v1/search/similar", json={"id": "nope", "k": 3})
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    neither = client.post("/v1/search/similar", json={"k": 3})
    assert neither.status_code == 422


def test_thumbnails(server, client):
    r = client.get("/v1/images/g1/thumbnail")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(r.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"):
        r = client.get(f"/v1/images/{bad}/thumbnail")
        assert r.status_code == 404 and r.json()["error"] == "NotFound", bad


def test_uploads_take_file_stems_and_3_is_the_same_id_as_quoted_3(server, client):
    r = client.post("/v1/index/images", files=[("images", ("photos/42.png", png(60), "image/png")),
                                               ("images", ("猫咪.jpg", image_bytes(make_image(80, 60, seed=61),
                                                                                  "JPEG"), "image/jpeg"))])
    assert r.status_code == 200, r.text
    assert r.json()["added"] == ["42", "猫咪"] and r.json()["persisted"] is True
    dup = client.post("/v1/index/images", json={"images": [base64.b64encode(png(62)).decode()],
                                                "ids": [42]})
    assert dup.status_code == 422 and "duplicate" in dup.json()["detail"]
    assert client.get("/v1/images/42/thumbnail").status_code == 200
    assert client.post("/v1/search/similar", json={"id": 42, "k": 1}).status_code == 200
    payload = client.post("/v1/search/images", json={"query": "猫", "k": 8}).json()["hits"]
    assert {h["payload"]["source"] for h in payload if h["id"] in ("42", "猫咪")} == {"42.png", "猫咪.jpg"}


def test_jsonl_text_upload_and_errors_naming_the_upload(server, client, tiny_checkpoint):
    lines = "".join(json.dumps({"text_id": f"j{i}", "text": f"上传的文字{i}"}, ensure_ascii=False) + "\n"
                    for i in range(3))
    r = client.post("/v1/index/texts", files={"file": ("more.jsonl", lines.encode(), "application/jsonl")})
    assert r.status_code == 200 and r.json()["added"] == ["j0", "j1", "j2"], r.text
    assert reference(server, tiny_checkpoint).text_payload("j1") == {"text": "上传的文字1"}
    bad = client.post("/v1/index/texts", files={"file": ("broken.jsonl", b'{"text": "ok"}\n{"text": \n',
                                                         "application/jsonl")})
    assert bad.status_code == 400 and "(broken.jsonl) line 2" in bad.json()["detail"]
    corrupt = client.post("/v1/index/images", files=[("images", ("fine.png", png(70), "image/png")),
                                                     ("images", ("broken.png", b"\x89PNG\r\n\x1a\nxx", "image/png"))])
    detail = corrupt.json()["detail"]
    assert corrupt.status_code == 400 and "broken.png" in detail and "images #1" in detail
    assert "object at 0x" not in detail and "bytes>" not in detail
    assert client.get("/v1/images/fine/thumbnail").status_code == 404  # all or nothing


def test_deletes_one_and_bulk_are_durable_and_all_or_nothing(server, client, tiny_checkpoint):
    added = client.post("/v1/index/texts", json={"texts": ["删掉我", "也删掉", "留下"], "ids": ["d1", "d2", 7]})
    assert added.status_code == 200, added.text
    before = client.get("/v1/index/stats").json()
    r = client.delete("/v1/index/texts/d1")
    assert r.status_code == 200 and r.json()["deleted"] == 1 and r.json()["persisted"] is True
    partial = client.post("/v1/index/texts/delete", json={"ids": ["d2", "unknown-id"]})
    assert partial.status_code == 404 and "unknown-id" in partial.json()["detail"]
    assert client.post("/v1/index/texts/delete", json={"ids": ["d2", "7"]}).json()["deleted"] == 2  # "7" is 7
    assert client.delete("/v1/index/texts/d1").status_code == 404
    stats = client.get("/v1/index/stats").json()
    assert stats["texts"] == before["texts"] - 3 and stats["persisted"] is True
    ref = reference(server, tiny_checkpoint)  # durable: a fresh open sees the deletes
    assert not any(ref.index.has_text(i) for i in ("d1", "d2", 7))
    hits = client.post("/v1/search/texts", files={"image": ("q.png", png(5), "image/png")},
                       data={"k": str(stats["texts"])}).json()["hits"]
    assert not {"d1", "d2", 7} & {h["id"] for h in hits}
    assert client.delete("/v1/index/images/g5").json()["deleted"] == 1
    assert client.get("/v1/images/g5/thumbnail").status_code == 404


def test_pixel_limit_is_the_users_in_both_directions(server, client):
    def gray_png(w: int, h: int) -> bytes:
        return image_bytes(Image.new("L", (w, h)), "PNG")

    above_pillow = gray_png(9500, 9500)  # 90.25 Mpx: over Pillow's default guard, under --max-pixels
    assert Image.MAX_IMAGE_PIXELS < 9500 * 9500 < MAX_PIXELS
    r = client.post("/v1/encode/image", files={"image": ("big.png", above_pillow, "image/png")})
    assert r.status_code == 200, r.text
    over = client.post("/v1/encode/image", files={"image": ("huge.png", gray_png(10_050, 10_000), "image/png")})
    assert over.status_code == 400 and "huge.png" in over.json()["detail"]
    assert str(MAX_PIXELS) in over.json()["detail"]


def test_export_runtime_missing_names_the_extra(monkeypatch, tmp_path):
    from engine.serve.__main__ import build_parser, check_export_runtime, config_from_args

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    parser = build_parser()
    args = parser.parse_args(["--export", str(tmp_path)])  # no --model: the export's manifest names it
    assert config_from_args(parser, args).model is None
    assert 'pip install --no-build-isolation -e ".[onnx]"' in check_export_runtime(args)


def test_default_index_directory(monkeypatch, tmp_path):
    from engine.serve.__main__ import build_parser, config_from_args

    parser = build_parser()
    monkeypatch.setenv("CNCLIP_INDEX_DIR", str(tmp_path / "default"))
    assert config_from_args(parser, parser.parse_args(["--model", "tiny"])).index_dir == tmp_path / "default"
    assert config_from_args(parser, parser.parse_args(["--model", "tiny", "--in-memory"])).index_dir is None
