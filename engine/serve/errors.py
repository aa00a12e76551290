"""The one error shape of the HTTP API, `{"error": kind, "detail": message}`, and which status each error gets.

Every error answer, from a route, a middleware or FastAPI's own validation, is built by `error_response`, so
clients parse one shape; OpenAPI documents it per route through `error_responses`.
"""
from __future__ import annotations

import os
import re
from typing import Any, Iterable

from fastapi.responses import JSONResponse
from pydantic import BaseModel

from ..batcher import BatcherClosed, QueueFull, Timeout
from ..errors import (EngineError, IdConflictError, ImageDecodeError, IndexBusyError, InputError,
                      ReadOnlyIndexError, ShardUnavailableError)


class ErrorBody(BaseModel):
    """Every error answer: a short kind (an exception name) and a message for people."""

    error: str
    detail: str


class HttpError(Exception):
    """An error the HTTP layer detects itself (malformed body, wrong content type, unknown id)."""

    def __init__(self, status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.headers = headers


class NotReady(EngineError):
    """The model is still loading or warming up."""


class IndexWriteError(EngineError):
    """The index directory could not be written (disk full or failing); the index is unchanged (500)."""


class NotFound(InputError):
    """An id that is not in the index (404)."""


STATUS_TEXT = {
    400: "malformed body: bad JSON, bad base64, an undecodable, empty or over-sized image, a body over a limit "
         "of depth, number size, string length or item count",
    401: "missing or wrong API key (`Authorization: Bearer KEY`)",
    403: "a write to a read-only server (--read-only): send adds and deletes to the index's writer",
    404: "unknown id",
    409: "another process's commit, made while this write waited, added an id it adds or deleted a row it deletes",
    408: "the request body did not arrive within --body-timeout-s",
    413: "request body over --max-body-mb",
    415: "unsupported content type (send application/json or multipart/form-data)",
    422: "invalid values: empty query, k out of range, a bad or duplicate id, wrong field types",
    429: "a tower queue is full; retry after the Retry-After seconds",
    500: "the index could not be written (disk full or failing); nothing was changed",
    503: "not ready yet, more than --max-concurrency requests in flight, a request timed out in a queue, or the "
         "index's writer lock stayed held by another writer, or (--ray) a shard did not answer (retry after "
         "Retry-After)",
}


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_ABSOLUTE_PATH = re.compile(r"(?<![\w./:])/(?:[^\s'\"/:,;()]+/)+[^\s'\"/:,;()]+")


def _file_name(match: re.Match[str]) -> str:
    """An absolute path on this machine becomes its last two parts (the index's layout is not the client's
    business); anything else that looks like one (a route such as /v1/info) stays."""
    path = match.group(0)
    if not os.path.isdir(os.path.dirname(path)):
        return path
    return "/".join(path.rsplit("/", 2)[-2:])


def safe_text(text: str) -> str:
    """`text` fit for a client: Python object reprs (`<_io.BytesIO object at 0x...>`, from library messages)
    replaced by "the data", absolute paths of this machine cut to their last two parts, anything UTF-8 cannot
    carry (lone surrogates) escaped."""
    text = _ABSOLUTE_PATH.sub(_file_name, _OBJECT_REPR.sub("the data", text))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error answer."""
    return JSONResponse({"error": kind, "detail": safe_text(detail)}, status, headers=headers)


def status_of(exc: BaseException) -> tuple[int, dict[str, str] | None]:
    """HTTP status (and headers) for an engine error raised while serving a request."""
    if isinstance(exc, HttpError):
        return exc.status, exc.headers
    if isinstance(exc, NotFound):
        return 404, None
    if isinstance(exc, ImageDecodeError):
        return 400, None
    if isinstance(exc, IdConflictError):
        return 409, None
    if isinstance(exc, ReadOnlyIndexError):
        return 403, None
    if isinstance(exc, (IndexBusyError, ShardUnavailableError)):
        return 503, {"Retry-After": "1"}
    if isinstance(exc, InputError):
        return 422, None
    if isinstance(exc, QueueFull):
        return 429, {"Retry-After": str(exc.retry_after_s)}
    if isinstance(exc, NotReady):
        return 503, {"Retry-After": "1"}
    if isinstance(exc, (Timeout, BatcherClosed)):
        return 503, None
    return 500, None


def engine_error_response(exc: BaseException) -> JSONResponse:
    status, headers = status_of(exc)
    kind = exc.kind if isinstance(exc, HttpError) else type(exc).__name__
    return error_response(status, kind, str(exc), headers)


HANDLED = (HttpError, EngineError)


def error_responses(statuses: Iterable[int]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for `statuses`, each with the one error model."""
    return {status: {"model": ErrorBody, "description": STATUS_TEXT[status]} for status in sorted(set(statuses))}
