"""The HTTP layer's second hardening round (issue 24): every legal id reaches the routes that take one in the path,
API keys (empty refused, non-ASCII compared as UTF-8 bytes), Content-Length with Transfer-Encoding refused and the
connection closed, malformed requests and non-UTF-8 multipart fields in the JSON error shape, messages that quote
the configured limits and no absolute paths. Real uvicorn in a thread over test_serve_guards' scripted core."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_serve_guards import (MAX_BODY, BODY_TIMEOUT_S, MAX_CONCURRENCY, ScriptedCore, ThreadServer,  # noqa: E402
                               assert_error_shape, closed_within, raw)

from engine.errors import ImageDecodeError, InputError  # noqa: E402
from engine.preprocess import load_image  # noqa: E402
from engine.serve.app import HttpLimits, create_app  # noqa: E402
from engine.serve.errors import safe_text  # noqa: E402
from engine.serve.guards import AccessPolicy  # noqa: E402
from engine.serve.metrics import ServerMetrics  # noqa: E402

KEY = "密钥-κλειδί-7"  # non-ASCII
AUTH = {"Authorization": f"Bearer {KEY}".encode("utf-8")}
IDS = ["cats/001", "100%", "../etc/passwd", "a/../b", "敦煌/飞天 第1幅", "x?y#z", "./."]


class RecordingCore(ScriptedCore):
    """The scripted core, remembering which ids the thumbnail and delete routes handed it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list = []

    async def thumbnail(self, item_id) -> bytes:
        self.seen.append(item_id)
        return await super().thumbnail(item_id)

    async def delete(self, kind, ids) -> int:
        self.seen.extend(ids)
        return await super().delete(kind, ids)


@pytest.fixture(scope="module")
def server():
    core = RecordingCore()
    app = create_app(core, ServerMetrics(), policy=AccessPolicy(KEY),
                     limits=HttpLimits(MAX_BODY, BODY_TIMEOUT_S, MAX_CONCURRENCY))
    with ThreadServer(app) as srv:
        srv.core = core
        yield srv


def test_every_legal_id_reaches_the_thumbnail_and_delete_routes(server):
    for item in IDS:
        path = quote(item, safe="")  # what the page and any client must send: the id as one encoded segment
        core = server.core
        core.seen.clear()
        r = httpx.get(f"{server.url}/v1/images/{path}/thumbnail", headers=AUTH)
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", (item, r.text)
        r = httpx.delete(f"{server.url}/v1/index/images/{path}", headers=AUTH)
        assert r.status_code == 200, (item, r.text)
        assert core.seen == [item, item], item


def test_a_non_ascii_key_works_as_utf8_bytes_and_a_wrong_one_does_not(server):
    assert httpx.get(f"{server.url}/v1/index/stats", headers=AUTH).status_code == 200
    latin = {"Authorization": f"Bearer {KEY}".encode("utf-8").decode("latin-1").encode("latin-1")}
    assert httpx.get(f"{server.url}/v1/index/stats", headers=latin).status_code == 200  # the same bytes
    for token in (b"x", KEY.upper().encode(), KEY[:-1].encode(), KEY.encode() + b"7"):
        r = httpx.get(f"{server.url}/v1/index/stats", headers={"Authorization": b"Bearer " + token})
        assert r.status_code == 401, token
        assert_error_shape(r)


@pytest.mark.parametrize("key", ["", " ", "has space", "tab\there", "new\nline"])
def test_empty_or_blank_keys_are_refused(key):
    with pytest.raises(InputError, match="API key"):
        AccessPolicy(key)


def test_the_server_refuses_to_start_with_an_empty_key(tmp_path):
    done = subprocess.run([sys.executable, "-m", "engine.serve", "--model", "tiny", "--in-memory", "--api-key", ""],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "API key must be non-empty" in done.stderr, done.stderr[-500:]


def test_content_length_with_transfer_encoding_is_400_and_closed(server):
    sock = raw(server.port)
    body = b'{"query": "x"}'
    smuggled = b"GET /v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
    sock.sendall(b"POST /v1/search/images HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + b"Authorization: Bearer " + KEY.encode() + b"\r\n"
                 + f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                 + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n" + smuggled)
    closed, got = closed_within(sock, 10)
    assert closed, "the connection was kept"
    head, _, payload = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and got.count(b"HTTP/1.1") == 1, got[:300]  # the smuggled one unanswered
    assert "Transfer-Encoding" in assert_error_shape(None, payload)["detail"]


@pytest.mark.parametrize("request_bytes", [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
                                           b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n"])
def test_malformed_requests_get_the_json_error_shape(server, request_bytes):
    sock = raw(server.port)
    sock.sendall(request_bytes)
    closed, got = closed_within(sock, 10)
    head, _, payload = got.partition(b"\r\n\r\n")
    assert closed and head.startswith(b"HTTP/1.1 400"), got[:200]
    assert b"application/json" in head.lower()
    assert assert_error_shape(None, payload)["error"] == "BadRequest"


def test_a_multipart_text_field_that_is_not_utf8_is_400_naming_it(server):
    files = [("images", ("a.png", b"\x89PNG not really", "image/png"))]
    r = httpx.post(f"{server.url}/v1/index/images", headers=AUTH, files=files,
                   data={"ids": "ok"}, timeout=10)
    assert r.status_code != 400 or "UTF-8" not in r.text  # a UTF-8 field is accepted as before
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"ids\"\r\n\r\n".encode() + b"\xff\xfe\r\n"
            + f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n"
              f"Content-Type: image/png\r\n\r\n".encode() + b"\x89PNG\r\n" + f"--{boundary}--\r\n".encode())
    r = httpx.post(f"{server.url}/v1/index/images", content=body,
                   headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=10)
    assert r.status_code == 400, r.text
    assert "'ids' is not UTF-8" in assert_error_shape(r)["detail"]


def test_the_pixel_limit_message_quotes_the_configured_limit():
    from PIL import Image
    import io

    Image.MAX_IMAGE_PIXELS = 1_000_000  # what the server sets from --max-pixels
    try:
        buffer = io.BytesIO()
        Image.new("1", (2100, 1000)).save(buffer, "PNG")  # over 2x: Pillow's own error, with its own number
        with pytest.raises(ImageDecodeError, match=r"limit of 1000000 ") as caught:
            load_image(buffer.getvalue(), 1_000_000)
        assert "2000000" not in str(caught.value)
    finally:
        Image.MAX_IMAGE_PIXELS = 64_000_000


def test_messages_carry_no_absolute_paths_of_this_machine(tmp_path):
    segment = tmp_path / "index" / "segments" / "abc.seg"
    segment.parent.mkdir(parents=True)
    text = safe_text(f"{segment}: column images.vectors fails its checksum; see /v1/info and http://h/a/b")
    assert str(tmp_path) not in text and "segments/abc.seg: column" in text
    assert "/v1/info" in text and "http://h/a/b" in text
