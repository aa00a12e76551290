"""The HTTP layer under hostile clients (issue 13), against a real uvicorn in a thread over a scripted core:
hostile JSON bodies, unbounded metric labels, stalled uploads and headers, the concurrency cap, auth before
body, one error shape everywhere (keep-alive kept), the OpenAPI error documentation and offline docs.

The core here is a stand-in that answers fixed hits (no model): these tests are about the HTTP layer; the
real core is exercised through the same routes in test_serve_main.py and test_serve_routes.py."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from engine.errors import InputError  # noqa: E402
from engine.ids import check_ids  # noqa: E402
from engine.serve.app import HttpLimits, create_app  # noqa: E402
from engine.serve.core import TextQueryResult  # noqa: E402
from engine.serve.guards import AccessPolicy, guarded_h11  # noqa: E402
from engine.serve.launcher import free_port  # noqa: E402
from engine.serve.metrics import ServerMetrics  # noqa: E402

API_KEY = "k-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
AUTH_LINE = f"Authorization: Bearer {API_KEY}\r\n".encode()
BODY_TIMEOUT_S = 1.5
HEADER_TIMEOUT_S = 3.0  # longer than any pause between a test client's requests on a loaded machine
MAX_CONCURRENCY = 4
MAX_BODY = 256 * 1024


class ScriptedCore:
    """Answers like ServerCore with fixed hits; a query "boom" raises an unexpected error (a bug stand-in)."""

    def __init__(self) -> None:
        self.ready = False
        self.batchers: dict = {}
        self.persistent = True
        self.texts: list[str] = []

    async def start(self) -> None:
        self.ready = True

    async def close(self) -> None:
        self.ready = False

    def counts(self) -> tuple[int, int]:
        return 3, len(self.texts)

    def describe(self) -> dict:
        return {"model": "tiny", "backend": "torch", "precision": "fp32", "device": "cpu"}

    def laclip_info(self) -> None:
        return None

    def _hits(self, k: int) -> list:
        return [SimpleNamespace(id=i, score=1.0 - i / 10, payload={"source": f"{i}.png"}, evidence=None)
                for i in range(min(k, 3))]

    async def search_images(self, queries, k, settings=None, exact=False, **options) -> TextQueryResult:
        if "boom" in queries:
            raise RuntimeError("a bug")
        if any(not q.strip() for q in queries):
            raise InputError("empty query")
        return TextQueryResult([self._hits(k) for _ in queries], [False] * len(queries))

    async def search_texts(self, upload, k, settings=None, exact=False, **options) -> list:
        return self._hits(k)

    async def search_similar(self, item_id, upload, k, exact=False, **options) -> list:
        return self._hits(k)

    async def encode_text(self, texts) -> TextQueryResult:
        return TextQueryResult([np.zeros(4, np.float32) for _ in texts], [False] * len(texts))

    async def encode_image(self, upload):
        return np.zeros(4, np.float32), None

    async def add_texts(self, texts, ids, payloads) -> list:
        ids = check_ids(ids if ids is not None else list(range(len(texts))), set(map(str, range(len(self.texts)))))
        self.texts.extend(texts)
        return ids

    async def add_images(self, uploads, ids, payloads) -> list:
        return check_ids(ids if ids is not None else list(range(len(uploads))))

    async def delete(self, kind, ids) -> int:
        return len(check_ids(ids))

    async def stats(self) -> dict:
        return {"images": 3, "texts": len(self.texts)}

    async def thumbnail(self, item_id) -> bytes:
        return b"\xff\xd8\xff\xd9"


class ThreadServer:
    """uvicorn serving `app` on a loopback port from a background thread, with the header timeout."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                http=guarded_h11(HEADER_TIMEOUT_S))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def make_server(policy: AccessPolicy) -> ThreadServer:
    app = create_app(ScriptedCore(), ServerMetrics(), policy=policy,
                     limits=HttpLimits(MAX_BODY, BODY_TIMEOUT_S, MAX_CONCURRENCY))
    return ThreadServer(app)


@pytest.fixture(scope="module")
def server():
    with make_server(AccessPolicy(API_KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def protected():
    with make_server(AccessPolicy(API_KEY, protect_metrics=True, protect_docs=True)) as srv:
        yield srv


def raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `seconds` (reading whatever it sent first)."""
    sock.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except socket.timeout:
        return False, got
    except ConnectionResetError:
        return True, got


def assert_error_shape(response: httpx.Response | http.client.HTTPResponse, body: bytes | None = None) -> dict:
    data = json.loads(body if body is not None else response.content)
    assert set(data) == {"error", "detail"} and all(isinstance(v, str) for v in data.values()), data
    assert "object at 0x" not in data["detail"]
    return data


# ---- class 1 and 5: hostile JSON bodies get 4xx in the one shape, on a connection that stays open ------------

DEEP = b"[" * 100_000 + b"]" * 100_000
HOSTILE_BODIES = {
    "deep-array": DEEP,
    "deep-object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "deep-in-field": b'{"query": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "long-int": b'{"query": "x", "k": ' + b"9" * 10_000 + b"}",
    "long-float": b'{"query": "x", "k": 1.' + b"5" * 10_000 + b"}",
    "nan": b'{"query": "x", "k": NaN}',
    "infinity": b'{"query": "x", "k": -Infinity}',
    "lone-surrogate": b'{"query": "\\ud800"}',
    "surrogate-key": b'{"\\udfff": 1}',
    "not-utf8": b'{"query": "\xff\xfe"}',
    "truncated": b'{"query": "x", ',
    "empty": b"",
    "not-an-object": b'"just a string"',
    "null": b"null",
    "huge-array": b'{"query": [' + b'"a",' * 120_000 + b'"a"]}',
    "extra-field": b'{"query": "x", "surprise": 1}',
    "k-bool": b'{"query": "x", "k": true}',
    "k-huge": b'{"query": "x", "k": 123456789012345678901234567890}',
    "long-text": json.dumps({"query": "字" * 20_000}).encode(),
}
JSON_ROUTES = ["/v1/search/images", "/v1/search/texts", "/v1/search/similar", "/v1/encode/text",
               "/v1/encode/image", "/v1/index/images", "/v1/index/texts", "/v1/index/images/delete"]


def test_hostile_bodies_get_4xx_and_keep_the_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.connect()
    sock = conn.sock
    seen = set()
    for route in JSON_ROUTES:
        for name, body in HOSTILE_BODIES.items():
            conn.request("POST", route, body=body, headers={**AUTH, "Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            assert 400 <= response.status < 500, (route, name, response.status, data[:300])
            assert response.getheader("connection") != "close", (route, name)
            assert_error_shape(response, data)
            assert conn.sock is sock, f"{route} {name}: the connection was dropped"
            seen.add(response.status)
    assert seen <= {400, 413, 415, 422}
    conn.request("POST", "/v1/search/images", body=b'{"query": "ok"}',
                 headers={**AUTH, "Content-Type": "application/json"})
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_hostile_values_name_the_problem(server):
    with httpx.Client(base_url=server.url, headers={**AUTH, "Content-Type": "application/json"}) as c:
        def detail(route: str, body: bytes) -> tuple[int, str]:
            r = c.post(route, content=body)
            return r.status_code, assert_error_shape(r)["detail"]

        assert detail("/v1/search/images", HOSTILE_BODIES["deep-array"]) == (400, "JSON nested deeper than the "
                                                                                 "limit of 32")
        status, message = detail("/v1/search/images", HOSTILE_BODIES["long-int"])
        assert status == 400 and "10000 characters" in message
        status, message = detail("/v1/index/texts", b'{"texts": ["a", "b"], "ids": ["x", "\\ud800"]}')
        assert status == 422 and "body.ids[1]" in message and "Unicode" in message
        status, message = detail("/v1/index/texts", json.dumps({"texts": ["a"], "ids": ["i" * 257]}).encode())
        assert status == 422 and "id #0" in message and "256" in message
        status, message = detail("/v1/index/texts", json.dumps({"texts": ["a"], "ids": ["a\x00b"]}).encode())
        assert status == 422 and "control character" in message
        status, message = detail("/v1/index/texts", json.dumps({"texts": ["a"], "ids": [2 ** 63]}).encode())
        assert status == 422 and "int64" in message
        status, message = detail("/v1/search/images", b'{"query": "x", "k": "3"}')
        assert status == 422 and message.startswith("k:")


def test_json_sent_as_another_type_is_told_so(server):
    r = httpx.post(f"{server.url}/v1/search/images", content=b'{"query": "x"}', headers=AUTH)
    assert r.status_code == 415 and "application/json" in assert_error_shape(r)["detail"]
    r = httpx.post(f"{server.url}/v1/search/images", content=b'{"query": "x"}',
                   headers={**AUTH, "Content-Type": "text/plain"})
    assert r.status_code == 415 and "'text/plain'" in assert_error_shape(r)["detail"]


def test_unexpected_error_is_json_500_and_keeps_the_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/search/images", body=b'{"query": "boom"}',
                 headers={**AUTH, "Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    assert response.status == 500 and assert_error_shape(response, data)["error"] == "InternalError"
    sock = conn.sock
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_unknown_route_and_method_use_the_error_shape(server):
    r = httpx.get(f"{server.url}/nowhere")
    assert r.status_code == 404 and assert_error_shape(r)["error"] == "NotFound"
    r = httpx.put(f"{server.url}/healthz")
    assert r.status_code == 405 and assert_error_shape(r)


# ---- class 3: metric labels come from fixed sets ----------------------------------------------------------------

def test_metrics_scrape_size_stays_fixed_under_invented_methods_and_paths(server):
    def scrape() -> str:
        return httpx.get(f"{server.url}/metrics").text

    def send(conn: http.client.HTTPConnection, method: str, path: str) -> None:
        conn.request(method, path, headers=AUTH)
        conn.getresponse().read()

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for i in range(3):  # every label combination once, so the second scrape has no new series to add
        send(conn, f"FOO{i}", f"/invented/{i}")
        send(conn, f"BAR{i}", "/v1/search/images")
        send(conn, "GET", f"/v1/images/id{i}/thumbnail")
    scrape()  # the scrape counts itself too
    before = scrape()
    for i in range(300):
        send(conn, f"M{i}X", f"/made/up/{i}?q={i}")
        send(conn, f"QQ{i}", "/v1/search/images")
        send(conn, "GET", f"/v1/images/other{i}/thumbnail")
    conn.close()
    after = scrape()
    series = lambda text: {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}
    assert series(after) == series(before)
    assert abs(len(after) - len(before)) < 200  # only counter values changed
    assert 'method="other"' in after and 'route="<other>"' in after
    assert 'route="/v1/images/{id}/thumbnail"' in after and "other299" not in after and "M1X" not in after


# ---- class 4: stalled clients are cut off while others are served ----------------------------------------------

def test_stalled_body_gets_408_and_is_closed_while_others_are_served(server):
    stalled = raw(server.port)
    stalled.sendall(b"POST /v1/index/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + AUTH_LINE + b"Content-Length: 200000\r\n\r\n{\"texts\": [")
    started = time.monotonic()
    with httpx.Client(base_url=server.url, headers=AUTH) as c:
        for _ in range(5):
            assert c.post("/v1/search/images", json={"query": "ok"}).status_code == 200
    assert time.monotonic() - started < BODY_TIMEOUT_S  # served while the stalled upload waited
    closed, reply = closed_within(stalled, BODY_TIMEOUT_S + 3)
    assert closed and reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < BODY_TIMEOUT_S + 3


def test_huge_declared_body_gets_413_and_a_stalled_sender_is_closed(server):
    sock = raw(server.port)
    sock.sendall(b"POST /v1/index/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + AUTH_LINE
                 + b"Content-Length: 50000000000\r\n\r\n{")
    started = time.monotonic()
    closed, reply = closed_within(sock, HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 3)
    assert reply.startswith(b"HTTP/1.1 413") and closed, reply[:200]
    assert time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_incomplete_headers_are_closed_after_the_header_timeout(server):
    idle = raw(server.port)  # a connection that never sends anything
    sock = raw(server.port)
    sock.sendall(b"POST /v1/search/images HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    started = time.monotonic()
    closed, reply = closed_within(sock, HEADER_TIMEOUT_S + 3)
    assert closed and reply == b""
    assert HEADER_TIMEOUT_S * 0.8 < time.monotonic() - started < HEADER_TIMEOUT_S + 3
    assert closed_within(idle, 1)[0]


def test_concurrency_cap_gives_503_and_health_still_answers(server):
    holders = []
    for _ in range(MAX_CONCURRENCY):
        sock = raw(server.port)
        sock.sendall(b"POST /v1/index/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + AUTH_LINE
                     + b"Content-Length: 1000\r\n\r\n{")
        holders.append(sock)
    time.sleep(0.3)
    r = httpx.post(f"{server.url}/v1/search/images", json={"query": "x"}, headers=AUTH)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "--max-concurrency" in assert_error_shape(r)["detail"]
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    for sock in holders:
        assert closed_within(sock, BODY_TIMEOUT_S + 3)[0]
    assert httpx.post(f"{server.url}/v1/search/images", json={"query": "x"}, headers=AUTH).status_code == 200


# ---- class 5: auth is decided before the body; what is public ---------------------------------------------------

def test_auth_is_decided_before_the_body(server):
    for body in (b"{not json", HOSTILE_BODIES["deep-array"], b""):
        r = httpx.post(f"{server.url}/v1/search/images", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", body[:20]
        assert assert_error_shape(r)["error"] == "Unauthorized"
    sock = raw(server.port)  # a huge declared body without a key: 401 at once, nothing read
    sock.sendall(b"POST /v1/index/texts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 50000000000\r\n\r\n")
    sock.settimeout(5)
    assert sock.recv(100).startswith(b"HTTP/1.1 401")
    sock.close()


def test_public_and_protected_paths(server, protected):
    public = ["/healthz", "/readyz", "/v1/info", "/metrics", "/docs", "/redoc", "/openapi.json"]
    for path in public:
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    info = httpx.get(f"{server.url}/v1/info").json()
    assert info["auth"] is True and info["max_k"] >= 10
    for path in ("/v1/index/stats", "/v1/images/1/thumbnail"):
        assert httpx.get(f"{server.url}{path}").status_code == 401, path
        assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 200, path
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui.css"):
        assert httpx.get(f"{protected.url}{path}").status_code == 401, path
        assert httpx.get(f"{protected.url}{path}", headers=AUTH).status_code == 200, path
    for path in ("/healthz", "/readyz", "/v1/info"):
        assert httpx.get(f"{protected.url}{path}").status_code == 200, path


# ---- class 7: OpenAPI documents every error status with the one model; docs work offline ----------------------

def test_openapi_documents_errors_bodies_and_ids(server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert set(schemas["ErrorBody"]["properties"]) == {"error", "detail"}
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            errors = {int(s) for s in op["responses"] if s != "200"}
            assert path == "/metrics" or 503 in errors, (path, method)
            for status in errors:
                ref = op["responses"][str(status)]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorBody"), (path, method, status)
            if path.startswith("/v1/") and path != "/v1/info":
                assert 401 in errors, (path, method)
            if method == "post":
                assert "requestBody" in op, path
                for media in op["requestBody"]["content"].values():
                    ref = media["schema"].get("$ref")
                    assert ref is None or ref.split("/")[-1] in schemas, (path, ref)
    image_ops = ["/v1/search/texts", "/v1/search/similar", "/v1/encode/image", "/v1/index/images"]
    for path in image_ops:
        assert set(spec["paths"][path]["post"]["requestBody"]["content"]) == {"application/json",
                                                                               "multipart/form-data"}
    hit = schemas["HitOut"]["properties"]
    assert {s["type"] for s in hit["id"]["anyOf"]} == {"string", "integer"} and "payload" in hit
    ids = schemas["IndexTextsRequest"]["properties"]["ids"]["anyOf"][0]["items"]["anyOf"]
    assert {s["type"] for s in ids} == {"string", "integer"}


def test_docs_work_offline(server):
    for page, assets in (("/docs", ["/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"]),
                         ("/redoc", ["/docs/assets/redoc.standalone.js"])):
        html = httpx.get(f"{server.url}{page}").text
        assert "cdn" not in html.lower() and "https://" not in html.replace("https://fastapi", "")
        for asset in assets:
            assert asset in html
            r = httpx.get(f"{server.url}{asset}")
            assert r.status_code == 200 and len(r.content) > 10_000, asset
