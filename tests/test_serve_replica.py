"""A read-only replica (`python -m engine.serve --read-only`) on an index another process writes: it answers
writes 403 without touching the index, and shows the writer's commits within 2 s (issue 23, items 1 and 3)."""
from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from conftest import SAMPLE_TEXTS, image_bytes, make_image
from engine import Retriever
from engine.serve.launcher import ServerProcess

pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[1]


def test_a_read_only_replica_refuses_writes_and_follows_the_writer(tiny_checkpoint, tmp_path):
    writer = Retriever.from_checkpoint(tiny_checkpoint, model="tiny", progress=False)
    writer.add_images([make_image(90, 70, seed=1), make_image(80, 60, seed=2)], ["i1", "i2"])
    writer.add_texts(SAMPLE_TEXTS[:2], ["t1", "t2"])
    writer.save(tmp_path / "idx")
    srv = ServerProcess(["--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--index", str(tmp_path / "idx"),
                         "--read-only"], tmp_path / "replica.log", env={"OMP_NUM_THREADS": "1"}, cwd=REPO)
    with srv.serving():
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            refused = client.post("/v1/index/texts", json={"texts": ["不会写入"], "ids": ["no"]})
            assert refused.status_code == 403 and refused.json()["error"] == "ReadOnlyIndexError"
            assert "read-only" in refused.json()["detail"]
            assert client.delete("/v1/index/images/i1").status_code == 403
            before = client.get("/v1/index/stats").json()
            assert before["texts"] == 2 and before["images"] == 2

            writer.add_texts([SAMPLE_TEXTS[2]], ["t3"])  # another process commits
            writer.delete_images(["i2"])
            committed = time.monotonic()
            while True:
                stats = client.get("/v1/index/stats").json()
                if stats["texts"] == 3 and stats["images"] == 1:
                    break
                assert time.monotonic() - committed < 2.0, f"the replica still shows {stats} after 2 s"
                time.sleep(0.05)
            found = client.post("/v1/search/texts", files={"image": ("q.png", image_bytes(make_image(90, 70, seed=1),
                                                                                      "PNG"), "image/png")},
                                data={"k": "3"}).json()["hits"]
            assert sorted(hit["id"] for hit in found) == ["t1", "t2", "t3"]  # the writer's new text is searchable
    reopened = Retriever.load(tmp_path / "idx", checkpoint=tiny_checkpoint)
    assert reopened.index.has_text("t3") and not reopened.index.has_image("i2") and not reopened.index.has_text("no")
