"""engine.serve.core in process. The server ingests through the Retriever's own stages, so the same inputs store
the same ids, payloads, vectors and thumbnails through HTTP's core as through the Python API. A write that fails
at any step (segment write, fsync, rename of the commit) answers a JSON 500, leaves the served index and the
directory exactly as they were, and the next write works: the server publishes nothing until the index layer's
durable write succeeded (real ServerCore, tiny model, in an in-process uvicorn)."""
from __future__ import annotations

import asyncio
import os
import time

import httpx
import numpy as np
import pytest

from conftest import SAMPLE_TEXTS, image_bytes, make_image
from engine import LaclipConfig, Retriever
from engine.index import Index
from engine.index import segment as segment_module
from engine.serve.app import create_app
from engine.serve.core import ServeConfig, ServerCore, index_gallery
from engine.serve.inputs import Upload
from engine.serve.metrics import ServerMetrics
from engine.sources import list_source

from test_serve_guards import ThreadServer

pytest.importorskip("fastapi")

LACLIP = LaclipConfig(num_crops=3)
TEXTS = ["一只猫", "敦煌壁画", "山水之间"]
TEXT_PAYLOADS = [{"text": "user text", "album": "a"}, None, {"tag": 3}]
IMAGE_PAYLOADS = [{"album": "x", "source": "mine.png"}, None, {"n": 2}]


def _stored(retriever: Retriever) -> dict:
    index = retriever.index
    return {
        "image_ids": index.image_ids, "text_ids": index.text_ids,
        "image_payloads": [index.payload("images", i) for i in index.image_ids],
        "text_payloads": [index.payload("texts", i) for i in index.text_ids],
        "thumbnails": [index.thumbnail(i) for i in index.image_ids],
        "image_global": index.array("image_global"), "image_crops": index.array("image_crops"),
        "text_emb": index.array("text_emb"),
    }


def _assert_same(server: dict, api: dict) -> None:
    for key in ("image_ids", "text_ids", "image_payloads", "text_payloads", "thumbnails"):
        assert server[key] == api[key], key
    for key in ("image_global", "image_crops", "text_emb"):
        np.testing.assert_allclose(server[key], api[key], rtol=0, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    paths = []
    for i, (w, h) in enumerate([(120, 90), (64, 200), (300, 300)]):
        path = folder / f"img{i}.png"
        path.write_bytes(image_bytes(make_image(w, h, seed=300 + i)))
        paths.append(path)
    return paths


def _through_server(checkpoint, work) -> dict:
    async def run() -> dict:
        core = ServerCore(ServeConfig(model="tiny", checkpoint=str(checkpoint), laclip=LACLIP))
        await core.start()
        try:
            await work(core)
            return _stored(core.retriever)
        finally:
            await core.close()

    return asyncio.run(run())


def test_server_and_retriever_store_the_same_rows(tiny_checkpoint, files):
    """Named uploads (ids = stems, payload "source") and unnamed ones (counters, no payload), texts with and
    without payloads (the indexed text wins "text")."""
    datas = [p.read_bytes() for p in files]

    async def work(core: ServerCore) -> None:
        named = [Upload(d, f"images #{i} ({p.name})", p.name) for i, (d, p) in enumerate(zip(datas, files))]
        await core.add_images(named, None, IMAGE_PAYLOADS)
        await core.add_images([Upload(d, f"image #{i}") for i, d in enumerate(datas)], None, None)
        await core.add_texts(TEXTS, None, TEXT_PAYLOADS)
        await core.add_texts(TEXTS, ["a", "b", "c"], None)

    server = _through_server(tiny_checkpoint, work)
    api = Retriever.from_checkpoint(tiny_checkpoint, "tiny", laclip=LACLIP, progress=False)
    api.add_images(files, payloads=IMAGE_PAYLOADS)
    api.add_images(datas)
    api.add_texts(TEXTS, payloads=TEXT_PAYLOADS)
    api.add_texts(TEXTS, ["a", "b", "c"])
    stored = _stored(api)
    _assert_same(server, stored)
    assert stored["image_ids"] == ["img0", "img1", "img2", 0, 1, 2]
    assert stored["image_payloads"] == [{"album": "x", "source": "mine.png"}, {"source": "img1.png"},
                                        {"source": "img2.png", "n": 2}, None, None, None]
    assert stored["text_payloads"][:3] == [{"text": "一只猫", "album": "a"}, {"text": "敦煌壁画"},
                                           {"tag": 3, "text": "山水之间"}]
    assert all(t is not None for t in stored["thumbnails"])


def test_gallery_follows_the_folder_id_rule_of_the_indexer(tiny_checkpoint, tmp_path):
    """--gallery lists a folder as `python -m engine index --images` does: recursive, hidden skipped, the same
    ids and "source" payloads."""
    for rel in ("2.png", "10.png", "cats/1.png", "cats/old/1.png", ".hidden/9.png", ".x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(image_bytes(make_image(40, 30, seed=len(rel))))
    retriever = Retriever.from_checkpoint(tiny_checkpoint, "tiny", progress=False)
    index_gallery(retriever, tmp_path, None)
    refs = list_source(tmp_path).images
    assert retriever.index.image_ids == [r.id for r in refs] == ["2", "10", "cats/1", "cats/old/1"]
    assert [retriever.image_payload(r.id) for r in refs] == [r.payload for r in refs]


# ---- failed writes change nothing --------------------------------------------------------------------------------


class Fault(OSError):
    """The injected failure."""


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_checkpoint):
    index_dir = tmp_path_factory.mktemp("faults") / "index"
    core = ServerCore(ServeConfig(model="tiny", checkpoint=str(tiny_checkpoint), index_dir=index_dir))
    with ThreadServer(create_app(core, ServerMetrics())) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as client:
            while client.get("/readyz").status_code != 200:
                time.sleep(0.1)
            assert client.post("/v1/index/texts", json={"texts": SAMPLE_TEXTS[:4], "ids": ["a", "b", "c", "d"]}
                               ).status_code == 200
            yield client, index_dir


def state(client: httpx.Client, index_dir) -> tuple:
    """What the server serves and what a fresh open of the directory holds."""
    served = client.get("/readyz").json()
    on_disk = Index.open(index_dir)
    return served["texts"], sorted(map(str, on_disk.text_ids)), served["images"]


STEPS = {
    "segment-write": (segment_module, "write_container"),
    "fsync": (os, "fsync"),
    "rename": (os, "replace"),
}


@pytest.mark.parametrize("step", list(STEPS))
def test_failed_write_changes_nothing_and_the_next_write_works(served, monkeypatch, step):
    client, index_dir = served
    before = state(client, index_dir)
    owner, name = STEPS[step]
    real = getattr(owner, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        raise Fault(f"injected {step} failure")

    monkeypatch.setattr(owner, name, failing)
    r = client.post("/v1/index/texts", json={"texts": ["不会写入"], "ids": [f"fail-{step}"]})
    monkeypatch.setattr(owner, name, real)
    assert calls["n"] >= 1, f"{step} was never reached"
    assert r.status_code == 500 and r.json()["error"] == "IndexWriteError", r.text
    assert "nothing was changed" in r.json()["detail"]
    assert state(client, index_dir) == before
    ok = client.post("/v1/index/texts", json={"texts": ["会写入"], "ids": [f"ok-{step}"]})
    assert ok.status_code == 200, ok.text
    assert f"ok-{step}" in state(client, index_dir)[1]
    retry = client.post("/v1/index/texts", json={"texts": ["不会写入"], "ids": [f"fail-{step}"]})
    assert retry.status_code == 200, retry.text  # the failed id was never half-added
