"""`python -m engine.serve` as a real process on loopback: every endpoint, every bad input, concurrency against
the Retriever's direct answers, overload (429, never a 5xx other than 503), SIGKILL mid-add and SIGTERM."""
from __future__ import annotations

import base64
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SAMPLE_TEXTS, image_bytes, make_image
from engine import LaclipConfig, Retriever
from engine.index import Index
from engine.serve.launcher import ServerProcess

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY_MB = 1.0
MAX_PIXELS = 4_000_000
GRACEFUL = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown


class Server(ServerProcess):
    """A test server: one OMP thread, no inherited API key, started from the repository root."""

    def __init__(self, args: list[str], log: Path) -> None:
        super().__init__(args, log, env={"OMP_NUM_THREADS": "1", "CNCLIP_API_KEY": None}, cwd=REPO)


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text_id": f"t{i}", "text": t}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(SAMPLE_TEXTS)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, image_dir, texts_file):
    index_dir = tmp_path_factory.mktemp("serve") / "index"
    srv = Server(["--model", "tiny", "--checkpoint", str(tiny_checkpoint), "--gallery", str(image_dir),
                  "--texts", str(texts_file), "--index", str(index_dir), "--api-key", API_KEY,
                  "--max-body-mb", str(MAX_BODY_MB), "--max-pixels", str(MAX_PIXELS),
                  "--max-batch-size", "16", "--max-delay-ms", "20"], index_dir.parent / "server.log")
    srv.index_dir = index_dir
    with srv.serving():
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def reference(server, tiny_checkpoint) -> Retriever:
    """The Retriever's direct view of what the server has persisted."""
    return Retriever.load(server.index_dir, checkpoint=tiny_checkpoint, progress=False)


def as_pairs(hits: list[dict]) -> tuple[list, np.ndarray]:
    return [h["id"] for h in hits], np.array([h["score"] for h in hits])


def assert_same_hits(got: list[dict], want) -> None:
    ids, scores = as_pairs(got)
    assert ids == [h.id for h in want]
    np.testing.assert_allclose(scores, [h.score for h in want], rtol=0, atol=1e-5)


def png(seed: int, w: int = 120, h: int = 90) -> bytes:
    return image_bytes(make_image(w, h, seed=seed), "PNG")


def metric_values(text: str, name: str) -> dict[str, float]:
    """{labels: value} for every sample of `name` in a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


# ---- endpoints ----------------------------------------------------------------------------------------------------

def test_health_ready_docs_metrics(server, client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"] == "tiny" and ready["images"] >= 12 and ready["texts"] >= 8
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/search/images", "/v1/search/texts", "/v1/encode/text", "/v1/encode/image",
                 "/v1/index/images", "/v1/index/texts", "/healthz", "/readyz", "/metrics"):
        assert path in paths
    assert "multipart/form-data" in paths["/v1/search/texts"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    metrics = client.get("/metrics").text
    assert "\ncnclip_ready 1.0\n" in metrics
    assert metric_values(metrics, "cnclip_queue_depth").keys() == {'tower="text"', 'tower="image"'}


def test_api_key_required_on_v1(server):
    body = {"query": "飞天", "k": 1}
    assert httpx.post(f"{server.url}/v1/search/images", json=body).status_code == 401
    wrong = httpx.post(f"{server.url}/v1/search/images", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_search_images_matches_retriever(server, client, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    one = client.post("/v1/search/images", json={"query": SAMPLE_TEXTS[1], "k": 5}).json()
    assert one["truncated"] is False
    assert_same_hits(one["hits"], ref.search_images(SAMPLE_TEXTS[1], k=5))
    long_text = "敦煌壁画" * 40
    many = client.post("/v1/search/images", json={"query": [SAMPLE_TEXTS[0], long_text], "k": 3}).json()
    assert many["truncated"] == [False, True]
    for got, want in zip(many["hits"], ref.search_images([SAMPLE_TEXTS[0], long_text], k=3)):
        assert_same_hits(got, want)


def test_search_texts_upload_and_base64(server, client, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    data = png(7)
    want = ref.search_texts(data, k=4)
    upload = client.post("/v1/search/texts", files={"image": ("q.png", data, "image/png")}, data={"k": "4"})
    assert upload.status_code == 200, upload.text
    assert_same_hits(upload.json()["hits"], want)
    b64 = client.post("/v1/search/texts", json={"image": base64.b64encode(data).decode(), "k": 4})
    assert_same_hits(b64.json()["hits"], want)
    data_url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert_same_hits(client.post("/v1/search/texts", json={"image": data_url, "k": 4}).json()["hits"], want)


def test_encode_endpoints_match_retriever(server, client, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    texts = SAMPLE_TEXTS[:3]
    got = client.post("/v1/encode/text", json={"text": texts}).json()
    assert got["dim"] == 32 and got["truncated"] == [False] * 3
    np.testing.assert_allclose(got["embeddings"], ref.encode_texts(texts), atol=1e-5)
    single = client.post("/v1/encode/text", json={"text": texts[0]}).json()
    np.testing.assert_allclose(single["embeddings"], ref.encode_texts(texts[:1]), atol=1e-5)
    data = png(3, 333, 500)
    views = ref.encode_image_views([data])
    img = client.post("/v1/encode/image", files={"image": ("x.png", data, "image/png")}).json()
    np.testing.assert_allclose(img["embedding"], views.global_[0], atol=1e-5)
    np.testing.assert_allclose(img["crops"], views.crops[0], atol=1e-5)


def test_index_adds_are_searchable_and_persisted(server, client, tiny_checkpoint):
    before = client.get("/readyz").json()
    r = client.post("/v1/index/texts", json={"texts": ["西湖边的柳树", "黄山云海"], "ids": ["new-t1", "new-t2"]})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == ["new-t1", "new-t2"] and r.json()["persisted"] is True
    up = client.post("/v1/index/images", files=[("images", ("a.png", png(50), "image/png")),
                                                ("images", ("b.png", png(51), "image/png"))],
                     data={"ids": ["new-a", "new-b"]})
    assert up.status_code == 200, up.text
    js = client.post("/v1/index/images", json={"images": [base64.b64encode(png(52)).decode()], "ids": ["new-c"]})
    assert js.json()["added"] == ["new-c"]
    after = client.get("/readyz").json()
    assert (after["images"], after["texts"]) == (before["images"] + 3, before["texts"] + 2)
    on_disk = Index.load(server.index_dir)
    assert {"new-a", "new-b", "new-c"} <= set(on_disk.image_ids) and {"new-t1", "new-t2"} <= set(on_disk.text_ids)
    ref = reference(server, tiny_checkpoint)  # the persisted index answers exactly as the server does
    hits = client.post("/v1/search/texts", files={"image": ("q.png", png(50), "image/png")},
                       data={"k": str(after["texts"])}).json()["hits"]
    assert_same_hits(hits, ref.search_texts(png(50), k=after["texts"]))
    got = client.post("/v1/search/images", json={"query": "黄山", "k": after["images"]}).json()["hits"]
    assert {"new-a", "new-b", "new-c"} <= {h["id"] for h in got}


# ---- bad input: status code, a message naming the problem, and a live server after ----------------------------

def _bomb() -> bytes:
    from PIL import Image

    return image_bytes(Image.new("L", (2100, 2100)), "PNG")  # 4.4 Mpx > --max-pixels, a few KB on the wire


BAD_REQUESTS = {
    "body-over-limit": ("/v1/search/images", {"content": b'{"query": "' + b"a" * (int(MAX_BODY_MB * 2**20) + 10)
                                                          + b'", "k": 1}',
                                              "headers": {"content-type": "application/json"}}, 413, "limit"),
    "streamed-body-over-limit": ("/v1/index/texts", {"content": iter([b"x" * 2**18] * 6),
                                                     "headers": {"content-type": "application/json"}}, 413, "limit"),
    "pixel-bomb": ("/v1/search/texts", {"files": {"image": ("bomb.png", _bomb(), "image/png")}}, 400,
                   "decompression bomb"),
    "undecodable": ("/v1/search/texts", {"files": {"image": ("x.png", b"\x89PNG\r\n\x1a\n garbage", "image/png")}},
                    400, "image"),
    "zero-byte": ("/v1/search/texts", {"files": {"image": ("empty.png", b"", "image/png")}}, 400, "empty"),
    "wrong-type": ("/v1/encode/image", {"files": {"image": ("doc.pdf", b"%PDF-1.4\n%fake pdf\n", "application/pdf")}},
                   400, "not a readable image"),
    "truncated-png": ("/v1/search/texts", {"json": {"image": base64.b64encode(png(9)[:200]).decode(), "k": 1}},
                      400, "image"),
    "bad-base64": ("/v1/search/texts", {"json": {"image": "%%%not base64%%%", "k": 1}}, 400, "base64"),
    "bad-index-image": ("/v1/index/images", {"json": {"images": [base64.b64encode(b"nope").decode()]}}, 400,
                        "image #0"),
    "empty-query": ("/v1/search/images", {"json": {"query": "", "k": 1}}, 422, "at least 1 character"),
    "blank-query": ("/v1/search/images", {"json": {"query": "  \t ", "k": 1}}, 422, "empty"),
    "empty-query-list": ("/v1/search/images", {"json": {"query": [], "k": 1}}, 422, "no texts"),
    "number-query": ("/v1/search/images", {"json": {"query": 5, "k": 1}}, 422, "string"),
    "list-with-number": ("/v1/search/images", {"json": {"query": ["ok", 3], "k": 1}}, 422, "string"),
    "missing-query": ("/v1/search/images", {"json": {"k": 1}}, 422, "field required"),
    "empty-encode-text": ("/v1/encode/text", {"json": {"text": ""}}, 422, "at least 1 character"),
    "k-zero": ("/v1/search/images", {"json": {"query": "猫", "k": 0}}, 422, "greater than or equal to 1"),
    "k-over-limit": ("/v1/search/images", {"json": {"query": "猫", "k": 10**6}}, 422, "less than or equal to 1000"),
    "k-over-index": ("/v1/search/images", {"json": {"query": "猫", "k": 999}}, 422, "k must be"),
    "k-string": ("/v1/search/images", {"json": {"query": "猫", "k": "3"}}, 422, "integer"),
    "k-float": ("/v1/search/images", {"json": {"query": "猫", "k": 1.5}}, 422, "integer"),
    "k-over-texts": ("/v1/search/texts", {"files": {"image": ("q.png", png(1), "image/png")}, "data": {"k": "999"}},
                     422, "k must be"),
    "k-form-not-int": ("/v1/search/texts", {"files": {"image": ("q.png", png(1), "image/png")}, "data": {"k": "x"}},
                       422, "valid integer"),
    "malformed-json": ("/v1/search/images", {"content": '{"query": "猫", '.encode(), "headers":
                                             {"content-type": "application/json"}}, 400, "malformed JSON"),
    "malformed-json-image": ("/v1/search/texts", {"content": b'{"image": ', "headers":
                                                  {"content-type": "application/json"}}, 400, "malformed JSON"),
    "wrong-content-type": ("/v1/search/texts", {"content": b"abc", "headers": {"content-type": "text/plain"}}, 415,
                           "content type"),
    "missing-upload-field": ("/v1/search/texts", {"files": {"picture": ("q.png", png(1), "image/png")}}, 422,
                             "'image'"),
    "duplicate-text-id": ("/v1/index/texts", {"json": {"texts": ["甲", "乙"], "ids": ["d", "d"]}}, 422, "duplicate"),
    "existing-text-id": ("/v1/index/texts", {"json": {"texts": ["甲"], "ids": ["t0"]}}, 422, "duplicate"),
    "ids-count-mismatch": ("/v1/index/texts", {"json": {"texts": ["甲", "乙"], "ids": ["only-one"]}}, 422, "ids"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_status_and_server_survives(server, client, case):
    path, kwargs, status, words = BAD_REQUESTS[case]
    before = client.get("/readyz").json()
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert words.lower() in json.dumps(r.json()["detail"], ensure_ascii=False).lower(), r.text
    assert server.alive()
    assert client.get("/readyz").json() == before  # a refused request changes nothing
    ok = client.post("/v1/search/images", json={"query": "飞天", "k": 1})
    assert ok.status_code == 200


# ---- concurrency: batching across clients gives every caller its own, correct answer ----------------------------

def test_concurrent_clients_get_direct_answers_and_batches_form(server, tiny_checkpoint):
    ref = reference(server, tiny_checkpoint)
    n_images, n_texts = len(ref.index.image_ids), len(ref.index.text_ids)
    queries = [f"{SAMPLE_TEXTS[i % 8]}{i}" for i in range(200)]
    images = [png(200 + i, 64 + 7 * i, 48 + 5 * i) for i in range(40)]
    jobs = [("text", q, 1 + i % n_images) for i, q in enumerate(queries)]
    jobs += [("image", im, 1 + i % n_texts) for i, im in enumerate(images)]
    jobs = jobs[::2] + jobs[1::2]
    want_text = dict(zip(queries, ref.search_images(queries, k=n_images)))
    want_image = ref.search_texts(images, k=n_texts)
    local = threading.local()

    def call(job):
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
        kind, payload, k = job
        if kind == "text":
            r = local.client.post("/v1/search/images", json={"query": payload, "k": k})
        else:
            r = local.client.post("/v1/search/texts", files={"image": ("q.png", payload, "image/png")},
                                  data={"k": str(k)})
        return job, r.status_code, r.json()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs))
    assert len(results) >= 200
    for (kind, payload, k), status, body in results:
        assert status == 200, body
        want = want_text[payload][:k] if kind == "text" else want_image[images.index(payload)][:k]
        assert_same_hits(body["hits"], want)
    metrics = httpx.get(f"{server.url}/metrics").text
    buckets = metric_values(metrics, "cnclip_batch_size_bucket")
    counts = metric_values(metrics, "cnclip_batch_size_count")
    singles = buckets['le="1.0",tower="text"']
    assert counts['tower="text"'] - singles > 0, "no text batch larger than 1 formed"
    served = metric_values(metrics, "cnclip_requests_total")
    assert served['method="POST",route="/v1/search/images",status="200"'] >= 200


# ---- overload: bounded queue refuses at once; never a 5xx other than a 503 timeout -----------------------------

def test_overload_gives_429_and_no_other_5xx(tmp_path):
    srv = Server(["--model", "tiny", "--in-memory", "--max-queue", "64", "--max-batch-size", "8", "--max-delay-ms", "0",
                  "--request-timeout-s", "5", "--workers", "2"], tmp_path / "server.log")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            added = c.post("/v1/index/texts", json={"texts": SAMPLE_TEXTS})
            assert added.status_code == 200 and added.json()["persisted"] is False
            c.post("/v1/index/images", json={"images": [base64.b64encode(png(i)).decode() for i in range(4)]})
        local = threading.local()

        def call(i):
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=srv.url, timeout=60)
            if i % 2:
                r = local.client.post("/v1/encode/text", json={"text": [f"{t}{i}" for t in SAMPLE_TEXTS * 5]})
            else:
                r = local.client.post("/v1/search/texts", files={"image": ("q.png", png(i, 200, 150), "image/png")},
                                      data={"k": "3"})
            return r.status_code, r.headers.get("retry-after")

        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(call, range(128)))
        statuses = [s for s, _ in results]
        assert statuses.count(429) > 0, f"no 429 under overload: {sorted(set(statuses))}"
        assert statuses.count(200) > 0
        assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
        assert all(ra is not None and int(ra) >= 1 for s, ra in results if s == 429)
        assert srv.alive()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.post("/v1/search/images", json={"query": "飞天", "k": 2}).status_code == 200
            refused = metric_values(c.get("/metrics").text, "cnclip_requests_total")
        assert sum(v for key, v in refused.items() if 'status="429"' in key) == statuses.count(429)
    finally:
        srv.stop(signal.SIGKILL)


# ---- SIGKILL during an add: the index reloads intact; SIGTERM: in-flight finishes, index flushed ---------------

def _seed_index(index_dir: Path, image_dir: Path) -> None:
    """A small saved index, built in-process (faster than a server start)."""
    retriever = Retriever.from_checkpoint(None, model="tiny", laclip=LaclipConfig(), progress=False)
    retriever.add_images([image_bytes(make_image(80, 60, seed=i)) for i in range(4)], ids=list("abcd"))
    retriever.add_texts(SAMPLE_TEXTS)
    retriever.save(index_dir)


def _add_in_flight(srv: Server, n_texts: int, tag: str) -> tuple[threading.Thread, dict, list]:
    """Post a big text add from a thread; return once the server reports it in progress."""
    new_ids = [f"{tag}-{i}" for i in range(n_texts)]
    texts = [f"{SAMPLE_TEXTS[i % 8]}，第{i}段" for i in range(n_texts)]
    outcome: dict = {}

    def add():
        try:
            r = httpx.post(f"{srv.url}/v1/index/texts", json={"texts": texts, "ids": new_ids}, timeout=120)
            outcome["status"], outcome["body"] = r.status_code, r.text
        except httpx.TransportError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=add)
    worker.start()
    key = 'method="POST",route="/v1/index/texts"'
    deadline = time.monotonic() + 30
    while metric_values(httpx.get(f"{srv.url}/metrics").text, "cnclip_requests_in_progress").get(key) != 1:
        assert time.monotonic() < deadline and not outcome, f"add never seen in progress: {outcome}"
        time.sleep(0.01)
    return worker, outcome, new_ids


def _kill_during_add(index_dir: Path, log: Path, delay_s: float, n_texts: int, tag: str) -> tuple[list, list]:
    """Start a server on index_dir, SIGKILL it delay_s after a big add is seen in flight; (ids before, posted)."""
    srv = Server(["--model", "tiny", "--index", str(index_dir)], log)
    srv.wait_ready()
    old = list(Index.load(index_dir).text_ids)
    worker, outcome, new_ids = _add_in_flight(srv, n_texts, tag)
    time.sleep(delay_s)
    srv.stop(signal.SIGKILL)
    worker.join(60)
    assert outcome, "the add request neither answered nor failed"
    return old, new_ids


def _assert_intact(index_dir: Path, old_ids: list, new_ids: list) -> str:
    index = Index.load(index_dir)  # raises on a torn snapshot
    ids = list(index.text_ids)
    assert ids in (old_ids, old_ids + new_ids), f"torn index: {len(ids)} texts"
    assert index.array("text_emb").shape == (len(ids), 32)
    return "new" if ids == old_ids + new_ids else "old"


def test_sigkill_during_add_leaves_index_intact_and_sigterm_flushes(tmp_path, image_dir):
    index_dir = tmp_path / "index"
    _seed_index(index_dir, image_dir)
    old_ids, new_ids = _kill_during_add(index_dir, tmp_path / "kill.log", 0.05, 1000, "k")
    _assert_intact(index_dir, old_ids, new_ids)

    srv = Server(["--model", "tiny", "--index", str(index_dir)], tmp_path / "restart.log")  # same dir again
    ready = srv.wait_ready()
    on_disk = Index.load(index_dir)
    assert (ready["images"], ready["texts"]) == (len(on_disk.image_ids), len(on_disk.text_ids)) == (4, len(old_ids))
    worker, outcome, term_ids = _add_in_flight(srv, 1000, "term")
    srv.proc.send_signal(signal.SIGTERM)
    worker.join(120)
    assert outcome.get("status") == 200, outcome  # the in-flight add finished during the graceful shutdown
    assert srv.proc.wait(60) in GRACEFUL
    assert list(Index.load(index_dir).text_ids) == old_ids + term_ids


@pytest.mark.slow
def test_repeated_sigkill_at_varied_moments(tmp_path, image_dir):
    index_dir = tmp_path / "index"
    _seed_index(index_dir, image_dir)
    states = []
    for round_, delay in enumerate([0.0, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]):
        old_ids, new_ids = _kill_during_add(index_dir, tmp_path / f"r{round_}.log", delay, 1000, f"r{round_}")
        states.append(_assert_intact(index_dir, old_ids, new_ids))
    assert len(states) == 8  # each round reloaded as exactly the old or the new state


@pytest.mark.slow
def test_serves_an_onnx_export(tmp_path):
    pytest.importorskip("onnxruntime")
    export_dir = tmp_path / "export"
    subprocess.run([sys.executable, "-m", "export", "--model", "tiny", "--out", str(export_dir)], cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    srv = Server(["--export", str(export_dir), "--index", str(tmp_path / "index")],  # the manifest names the model
                 tmp_path / "onnx.log")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            added = c.post("/v1/index/texts", json={"texts": SAMPLE_TEXTS})
            assert added.status_code == 200 and added.json()["persisted"] is True
            hits = c.post("/v1/search/texts", json={"image": base64.b64encode(png(4)).decode(), "k": 3}).json()
        direct = Retriever.from_export(export_dir, model="tiny", laclip=LaclipConfig(), progress=False)
        direct.attach(Index.load(tmp_path / "index"))
        assert_same_hits(hits["hits"], direct.search_texts(png(4), k=3))
    finally:
        srv.stop(signal.SIGKILL)


# ---- the first hour: --model from the index, --gallery --skip-bad, the mismatch advice --------------------------

def _tiny_index(tmp_path: Path, checkpoint: Path) -> Path:
    retriever = Retriever.from_checkpoint(checkpoint, "tiny", laclip=LaclipConfig(num_crops=2), progress=False)
    retriever.add_texts(SAMPLE_TEXTS[:2])
    retriever.save(tmp_path / "index")
    return tmp_path / "index"


def _config(argv: list[str]):
    from engine.serve.__main__ import build_parser, config_from_args

    parser = build_parser()
    return config_from_args(parser, parser.parse_args(argv))


def test_serve_takes_the_model_from_the_index(tmp_path, tiny_checkpoint, capsys):
    index_dir = _tiny_index(tmp_path, tiny_checkpoint)
    assert _config(["--index", str(index_dir)]).model == "tiny"
    with pytest.raises(SystemExit):
        _config(["--index", str(index_dir), "--model", "RN50"])
    said = capsys.readouterr().err
    assert f"--model RN50: the index at {index_dir} was built with 'tiny'" in said and "leave out --model" in said
    with pytest.raises(SystemExit):
        _config(["--index", str(tmp_path / "new")])     # no index there yet: the model must be given
    assert "--model is required (unless --index names an existing index" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _config(["--model", "tiny", "--skip-bad"])
    assert "--skip-bad is for --gallery" in capsys.readouterr().err


def test_gallery_names_every_bad_image_and_skip_bad_leaves_them_out(tmp_path, tiny_checkpoint):
    from engine.records import DatasetError
    from engine.serve.core import index_gallery

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for i in range(2):
        (gallery / f"{i}.png").write_bytes(png(i))
    (gallery / "empty.png").write_bytes(b"")
    (gallery / "junk.jpg").write_bytes(b"not an image")
    retriever = Retriever.from_checkpoint(tiny_checkpoint, "tiny", progress=False)
    with pytest.raises(DatasetError) as caught:
        index_gallery(retriever, gallery, None)
    said = str(caught.value)
    assert said.startswith("2 bad records") and f"{gallery / 'empty.png'}: empty file" in said
    assert f"{gallery / 'junk.jpg'}: not a readable image" in said and len(retriever.index.image_ids) == 0
    index_gallery(retriever, gallery, None, skip_bad=True)
    assert retriever.index.image_ids == ["0", "1"]


def test_serving_other_weights_over_an_index_says_what_to_do(tmp_path, tiny_checkpoint):
    from engine.errors import IndexFormatError
    from engine.models import build_random_model, get_spec, save_checkpoint

    index_dir = _tiny_index(tmp_path, tiny_checkpoint)
    other = save_checkpoint(build_random_model(get_spec("tiny"), seed=99), tmp_path / "finetuned.pt")
    with pytest.raises(IndexFormatError) as caught:
        Retriever.load(index_dir, checkpoint=other)
    said = str(caught.value)
    assert "was built with checkpoint hash" in said and f"({tiny_checkpoint}: leave out --checkpoint)" in said
    assert "index your collection again with these weights into another directory (a new --index)" in said
