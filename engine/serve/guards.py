"""Connection-level protections, as ASGI middleware plus one uvicorn protocol setting.

Order on the way in: framing (400 and close for Content-Length with Transfer-Encoding) -> concurrency cap (503
past --max-concurrency) -> API key (401, decided on the headers, before any body byte is read) -> body guard (413
past --max-body-mb, 408 when the body has not arrived within --body-timeout-s) -> errors (anything unexpected
becomes the one JSON error shape, so the connection stays usable) -> the app. An early answer leaves the unread
body to uvicorn, which discards it and keeps the connection. `guarded_h11` adds the missing header timeout
(uvicorn waits for request headers forever) and answers requests h11 cannot parse in the JSON error shape.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import h11
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import InputError
from .errors import ErrorBody, error_response

log = logging.getLogger("engine.serve")

CLOSE = {"Connection": "close"}


@dataclass(frozen=True)
class AccessPolicy:
    """Which paths need the API key: every /v1 route but /v1/info, and /metrics and the docs when asked."""

    api_key: str | None = None
    protect_metrics: bool = False
    protect_docs: bool = False

    def __post_init__(self) -> None:
        key = self.api_key
        if key is not None and (not key or any(c.isspace() or not c.isprintable() for c in key)):
            raise InputError(f"the API key must be non-empty, without spaces or control characters "
                             f"(got {len(key)} characters): an empty key would let an empty token in")

    def needs_key(self, path: str) -> bool:
        if self.api_key is None:
            return False
        if path.startswith("/v1/"):
            return path != "/v1/info"
        if path == "/metrics":
            return self.protect_metrics
        if path in ("/docs", "/redoc", "/openapi.json") or path.startswith("/docs/"):
            return self.protect_docs
        return False

    def allows(self, scope: Scope) -> bool:
        if not self.needs_key(scope["path"]):
            return True
        # bytes against bytes: the header arrives as raw bytes, the key is compared in UTF-8 (a non-ASCII key works
        # for a client that sends it in UTF-8, as curl and browsers' fetch do)
        scheme, _, token = _header(scope, b"authorization").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.api_key.encode("utf-8"))


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return b""


class AuthGuard:
    """401 from the headers alone, before the body is read (a bad body never masks a missing key)."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.policy.allows(scope):
            await self.app(scope, receive, send)
            return
        await error_response(401, "Unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY'",
                             {"WWW-Authenticate": "Bearer"})(scope, receive, send)


class FramingGuard:
    """Content-Length together with Transfer-Encoding is 400 and the connection is closed (RFC 9112 6.3): the two
    framings disagree about where the next request starts, the classic request-smuggling vector."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _header(scope, b"transfer-encoding") and _header(scope, b"content-length"):
            await error_response(400, "BadRequest", "a request may not carry both Content-Length and "
                                                    "Transfer-Encoding; the connection is closed",
                                 CLOSE)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class ConcurrencyGuard:
    """At most `limit` requests in flight (health and metrics excepted); more get 503 at once, unread."""

    EXEMPT = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await error_response(503, "Overloaded", f"more than {self.limit} requests in flight "
                                                    "(--max-concurrency); retry shortly",
                                 {"Retry-After": "1"})(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class BodyGuard:
    """Reads the whole body first: 413 past `max_bytes` (declared or streamed), 408 when it has not arrived
    within `timeout_s` (then the connection is closed: the client is stalled mid-body)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send, f"request body of {int(declared)} bytes")
            return
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            await error_response(408, "RequestTimeout", f"the request body did not arrive within "
                                                        f"{self.timeout_s:g} s (--body-timeout-s)",
                                 CLOSE)(scope, receive, send)
            return
        if body is None:  # the client went away
            return
        if len(body) > self.max_bytes:
            await self._too_large(scope, receive, send, "request body")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if size > self.max_bytes:
                return b"".join(chunks)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        await error_response(413, "PayloadTooLarge", f"{what} exceeds the limit of {self.max_bytes} bytes "
                                                     "(--max-body-mb)")(scope, receive, send)


class ErrorGuard:
    """Any exception no handler took becomes a logged JSON 500, so uvicorn does not drop the connection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unexpected error serving %s %s", scope["method"], scope["path"])
            if started:
                raise
            await error_response(500, "InternalError", "unexpected server error (logged)")(scope, receive, send)


def guarded_h11(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header timeout: a connection with no request being answered
    `header_timeout_s` after it opened (or after its last answer) is closed: it never completed its headers,
    or it is trickling the rest of a body already answered. A request h11 cannot parse gets the JSON error shape."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            """h11 could not parse the request: the one JSON error shape instead of uvicorn's text/plain."""
            body = ErrorBody(error="BadRequest", detail="malformed HTTP request (request line or headers could "
                                                        "not be parsed); the connection is closed")
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                          h11.Data(data=body.model_dump_json().encode()), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete  # no request being answered
            if idle and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol
