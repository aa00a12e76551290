"""A write that fails at any step (segment write, fsync, rename of the commit) answers a JSON 500, leaves the
served index and the directory exactly as they were, and the next write works: the server publishes nothing
until the index layer's durable write succeeded. Real ServerCore (tiny model) in an in-process uvicorn."""
from __future__ import annotations

import os
import time

import httpx
import pytest

from conftest import SAMPLE_TEXTS
from engine.index import Index
from engine.index import segment as segment_module
from engine.serve.app import create_app
from engine.serve.core import ServeConfig, ServerCore
from engine.serve.metrics import ServerMetrics

from test_hardening import ThreadServer

pytest.importorskip("fastapi")


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
