"""Fetching IIIF documents and images over HTTP(S): a timeout per request, retries with backoff for what may pass
(connection errors, timeouts, 408/429/5xx), a byte limit enforced while reading, and bounded concurrency for many
URLs at once. Stdlib only (urllib + concurrent.futures): it runs unchanged in Ray prepare tasks."""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from ..errors import ImageDecodeError, InputError

T = TypeVar("T")
R = TypeVar("R")
RETRIED_STATUS = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "cnclip-engine-iiif/1"
CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchPolicy:
    """How every request is made: `timeout_s` per attempt (connect and each read), `retries` after the first
    attempt for transient failures, `max_bytes` per image, `max_json_bytes` per document, `concurrency` requests
    at once when many are fetched together."""

    timeout_s: float = 20.0
    retries: int = 2
    max_bytes: int = 20 << 20
    max_json_bytes: int = 16 << 20
    concurrency: int = 8
    backoff_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise InputError(f"IIIF fetch timeout must be > 0 seconds, got {self.timeout_s}")
        for name in ("max_bytes", "max_json_bytes", "concurrency"):
            if getattr(self, name) < 1:
                raise InputError(f"IIIF fetch {name} must be >= 1, got {getattr(self, name)}")
        if self.retries < 0 or self.backoff_s < 0:
            raise InputError(f"IIIF fetch retries and backoff must be >= 0, got {self.retries}, {self.backoff_s}")


class FetchFailed(InputError):
    """One URL could not be fetched (after its retries); the message names the URL and the cause. Listing turns it
    into a per-canvas problem, the prepare stage into an ImageDecodeError."""


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def fetch_bytes(url: str, policy: FetchPolicy, limit: int | None = None) -> bytes:
    """The body of `url`, at most `limit` bytes (default: the policy's image limit); FetchFailed otherwise."""
    if not is_url(url):
        raise FetchFailed(f"{url}: not an http(s) URL")
    limit = policy.max_bytes if limit is None else limit
    attempt = 0
    while True:
        try:
            return _get(url, policy.timeout_s, limit)
        except _Transient as exc:
            if attempt >= policy.retries:
                raise FetchFailed(f"{url}: {exc} (after {attempt + 1} attempts)") from None
        attempt += 1
        time.sleep(policy.backoff_s * 2 ** (attempt - 1))


def fetch_json(url: str, policy: FetchPolicy) -> dict[str, Any]:
    """The JSON object at `url` (a manifest, a collection, an info.json); FetchFailed when unreachable, InputError
    when not a JSON object."""
    return parse_json(fetch_bytes(url, policy, policy.max_json_bytes), url)


def parse_json(data: bytes, where: str) -> dict[str, Any]:
    """A JSON object; InputError naming `where` when the bytes are not one."""
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{where}: not JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(document, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(document).__name__}")
    return document


def fetch_image(url: str, policy: FetchPolicy) -> bytes:
    """An image's bytes for the prepare stage: any failure is an ImageDecodeError (a bad image, per canvas)."""
    try:
        return fetch_bytes(url, policy)
    except FetchFailed as exc:
        raise ImageDecodeError(str(exc)) from None


def fetch_many(items: Iterable[T], fetch: Callable[[T], R], concurrency: int) -> list[R | InputError]:
    """`fetch(item)` for every item, `concurrency` at a time, in order; an InputError (FetchFailed: unreachable;
    else not what was expected) is returned in the item's place."""
    def one(item: T) -> R | InputError:
        try:
            return fetch(item)
        except InputError as exc:
            return exc

    items = list(items)
    if len(items) <= 1:
        return [one(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(concurrency, len(items)), thread_name_prefix="iiif-fetch") as pool:
        return list(pool.map(one, items))


class _Transient(Exception):
    """A failure worth retrying."""


def _get(url: str, timeout_s: float, limit: int) -> bytes:
    """One attempt: the body, read in chunks so that neither `limit` bytes nor `timeout_s` in all (a server that
    trickles) is ever passed."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "*/*"})
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise FetchFailed(f"{url}: {int(declared)} bytes exceeds the limit of {limit} bytes")
            chunks, size = [], 0
            while size <= limit:
                chunk = response.read1(min(CHUNK, limit + 1 - size))  # what has arrived; +1: to tell the limit passed
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if time.monotonic() > deadline:
                    raise _Transient(f"the body took longer than {timeout_s:g} s")
            data = b"".join(chunks)
    except (FetchFailed, _Transient):
        raise
    except urllib.error.HTTPError as exc:
        if exc.code in RETRIED_STATUS:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise FetchFailed(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Transient(f"{reason.__class__.__name__}: {reason}") from None
    except (ValueError, OSError, http.client.HTTPException) as exc:  # a malformed URL, a broken body
        raise FetchFailed(f"{url}: {exc.__class__.__name__}: {exc}") from None
    if len(data) > limit:
        raise FetchFailed(f"{url}: more than the limit of {limit} bytes")
    return data
