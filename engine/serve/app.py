"""The HTTP layer (FastAPI): parse requests, call the ServerCore, map engine errors to status codes.

Status codes: 400 malformed JSON / bad base64 / undecodable, empty or over-sized image; 401 missing or wrong
API key; 413 body over the limit; 415 unsupported content type; 422 invalid values (empty query, k out of
range, bad ids); 429 a tower queue is full (Retry-After); 503 not ready yet, or a request timed out in the
queue. OpenAPI at /docs.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import time
from typing import Any, Callable, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, StrictInt, StrictStr, ValidationError
from starlette.datastructures import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..batcher import BatcherClosed, QueueFull, Timeout
from ..errors import EngineError, ImageDecodeError, InputError
from ..retriever import Hit
from .core import NotReady, ServerCore
from .metrics import ServerMetrics

log = logging.getLogger("engine.serve")
DEFAULT_K = 10
_DRAIN_CAP = 64 << 20  # an over-limit body is read and dropped up to this much, so the client sees the 413

IdValue = Union[StrictStr, StrictInt]


class HttpError(Exception):
    """An error the HTTP layer itself detects (bad base64, wrong content type)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- request bodies (JSON) ------------------------------------------------------------------------------------

class ImageSearchRequest(BaseModel):
    """Text -> image: one query or a list of queries."""

    query: Union[StrictStr, list[StrictStr]]
    k: StrictInt = DEFAULT_K


class ImageQuery(BaseModel):
    """An image as base64 (a `data:` URL prefix is accepted), with k for searches."""

    image: StrictStr
    k: StrictInt = DEFAULT_K


class EncodeTextRequest(BaseModel):
    text: Union[StrictStr, list[StrictStr]]


class IndexTextsRequest(BaseModel):
    texts: list[StrictStr]
    ids: Union[list[IdValue], None] = None


class IndexImagesRequest(BaseModel):
    images: list[StrictStr]
    ids: Union[list[IdValue], None] = None


def _body_schema(json_fields: dict[str, Any], multipart_fields: dict[str, Any], required: list[str]) -> dict:
    """OpenAPI requestBody for routes that take JSON (base64 images) or multipart uploads."""
    def obj(props: dict[str, Any]) -> dict[str, Any]:
        return {"schema": {"type": "object", "properties": props, "required": required}}
    return {"requestBody": {"required": True, "content": {"application/json": obj(json_fields),
                                                          "multipart/form-data": obj(multipart_fields)}}}


_B64 = {"type": "string", "description": "base64 image (a data: URL prefix is accepted)"}
_FILE = {"type": "string", "format": "binary"}
_K = {"type": "integer", "default": DEFAULT_K, "minimum": 1}
_IDS = {"type": "array", "items": {"type": "string"}}
_SEARCH_TEXTS_BODY = _body_schema({"image": _B64, "k": _K}, {"image": _FILE, "k": _K}, ["image"])
_ENCODE_IMAGE_BODY = _body_schema({"image": _B64}, {"image": _FILE}, ["image"])
_INDEX_IMAGES_BODY = _body_schema({"images": {"type": "array", "items": _B64}, "ids": _IDS},
                                  {"images": {"type": "array", "items": _FILE}, "ids": _IDS}, ["images"])


# ---- middleware -------------------------------------------------------------------------------------------------

class BodyLimitMiddleware:
    """Buffers request bodies up to `max_bytes`; larger ones (declared or streamed) get 413 before routing."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"request body of {int(declared)} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, "request body", size, message.get("more_body", False))
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str, drained: int = 0,
                      more: bool = True) -> None:
        while more and drained < _DRAIN_CAP:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        detail = f"{what} exceeds the limit of {self.max_bytes} bytes (--max-body-mb)"
        await JSONResponse({"detail": detail, "error": "PayloadTooLarge"}, 413)(scope, receive, send)


class MetricsMiddleware:
    """Counts every request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Callable[[], set[str]]) -> None:
        self.app = app
        self.metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        route = scope["path"] if scope["path"] in self._routes() else "<other>"
        in_progress = self.metrics.in_progress.labels(route, scope["method"])
        in_progress.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            in_progress.dec()
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)


# ---- helpers ----------------------------------------------------------------------------------------------------

def _hits_json(hits: list[Hit]) -> list[dict[str, Any]]:
    return [{"id": h.id, "score": h.score} for h in hits]


def _decode_base64(data: str, what: str) -> bytes:
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HttpError(400, f"{what} is not valid base64 ({exc})") from None


def _content_kind(request: Request) -> str:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return "json"
    if kind == "multipart/form-data":
        return "multipart"
    raise HttpError(415, f"unsupported content type {kind or '(none)'!r}: send application/json (base64 images) "
                         "or multipart/form-data (file uploads)")


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"malformed JSON body ({exc})") from None


def _validate(model: type[BaseModel], data: Any) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def _upload_bytes(value: Any, what: str) -> tuple[bytes, str]:
    if not isinstance(value, UploadFile):
        raise HttpError(400, f"{what} must be a file upload, got a plain form field")
    return await value.read(), value.filename or what


def _form_k(form: Any) -> int:
    raw = form.get("k", str(DEFAULT_K))
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise InputError(f"k must be an int, got {raw!r}") from None


async def _one_image(request: Request) -> tuple[bytes, int]:
    """(image bytes, k) from JSON {"image": base64, "k"} or a multipart upload field `image` (+ form `k`)."""
    if _content_kind(request) == "json":
        body = _validate(ImageQuery, await _json_body(request))
        return _decode_base64(body.image, "image"), body.k
    form = await request.form()
    if "image" not in form:
        raise HttpError(400, "multipart body has no 'image' file field")
    data, _ = await _upload_bytes(form["image"], "image")
    return data, _form_k(form)


# ---- the app ----------------------------------------------------------------------------------------------------

def create_app(core: ServerCore, metrics: ServerMetrics, *, api_key: str | None = None,
               max_body_bytes: int = 20 << 20,
               on_fatal: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app over `core`; loading starts in the background at start-up (see /readyz)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        loading = asyncio.create_task(core.start())

        def report(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("start-up failed: %s", task.exception())
                if on_fatal is not None:
                    on_fatal(task.exception())

        loading.add_done_callback(report)
        yield
        if not loading.done():
            loading.cancel()
            with contextlib.suppress(BaseException):
                await loading
        await core.close()
        log.info("shut down: queues drained, index flushed")

    app = FastAPI(title="cnclip-engine retrieval server", version="0.1.0", lifespan=lifespan,
                  description="Chinese-CLIP text<->image retrieval with dynamic batching. " + (__doc__ or ""))
    known_paths: set[str] = set()
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=lambda: known_paths)

    def error(status: int, exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status, headers=headers)

    handlers: list[tuple[type[BaseException], Callable[[Any], JSONResponse]]] = [
        (HttpError, lambda e: error(e.status, e)),
        (ImageDecodeError, lambda e: error(400, e)),
        (InputError, lambda e: error(422, e)),
        (QueueFull, lambda e: error(429, e, {"Retry-After": str(e.retry_after_s)})),
        (Timeout, lambda e: error(503, e)),
        (NotReady, lambda e: error(503, e, {"Retry-After": "1"})),
        (BatcherClosed, lambda e: error(503, e)),
        (EngineError, lambda e: error(500, e)),
    ]
    for kind, make in handlers:
        app.add_exception_handler(kind, lambda _request, exc, make=make: make(exc))

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse({"detail": "malformed JSON body", "error": "MalformedJSON"}, 400)
        detail = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in errors]
        return JSONResponse({"detail": detail, "error": "ValidationError"}, 422)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise _Unauthorized()

    app.add_exception_handler(_Unauthorized, lambda _r, _e: JSONResponse(
        {"detail": "missing or wrong API key: send 'Authorization: Bearer KEY'", "error": "Unauthorized"}, 401,
        headers={"WWW-Authenticate": "Bearer"}))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @v1.post("/search/images", summary="Text -> image search")
    async def search_images(body: ImageSearchRequest) -> JSONResponse:
        single = isinstance(body.query, str)
        result = await core.search_images([body.query] if single else body.query, body.k)
        hits = [_hits_json(h) for h in result.values]
        return JSONResponse({"hits": hits[0] if single else hits,
                             "truncated": result.truncated[0] if single else result.truncated})

    @v1.post("/search/texts", summary="Image -> text search", openapi_extra=_SEARCH_TEXTS_BODY)
    async def search_texts(request: Request) -> JSONResponse:
        image, k = await _one_image(request)
        return JSONResponse({"hits": _hits_json(await core.search_texts(image, k))})

    @v1.post("/encode/text", summary="Text embeddings (L2-normalised)")
    async def encode_text(body: EncodeTextRequest) -> JSONResponse:
        texts = [body.text] if isinstance(body.text, str) else body.text
        result = await core.encode_text(texts)
        return JSONResponse({"embeddings": [row.tolist() for row in result.values], "truncated": result.truncated,
                             "dim": int(result.values[0].shape[0])})

    @v1.post("/encode/image", summary="Image embedding: global, and LACLIP crops when the index uses them",
             openapi_extra=_ENCODE_IMAGE_BODY)
    async def encode_image(request: Request) -> JSONResponse:
        image, _ = await _one_image(request)
        global_, crops = await core.encode_image(image)
        return JSONResponse({"embedding": global_.tolist(), "crops": None if crops is None else crops.tolist(),
                             "dim": int(global_.shape[0])})

    def index_response(added: list) -> JSONResponse:
        view = core.view
        return JSONResponse({"added": added, "images": len(view.image_ids), "texts": len(view.text_ids),
                             "persisted": core.persistent})

    @v1.post("/index/images", summary="Add images to the index (persisted)",
             openapi_extra=_INDEX_IMAGES_BODY)
    async def index_images(request: Request) -> JSONResponse:
        if _content_kind(request) == "json":
            body = _validate(IndexImagesRequest, await _json_body(request))
            images = [(_decode_base64(data, f"image #{i}"), "base64") for i, data in enumerate(body.images)]
            ids = body.ids
        else:
            form = await request.form()
            images = [await _upload_bytes(v, "images") for v in form.getlist("images")]
            ids = [str(v) for v in form.getlist("ids")] or None
        return index_response(await core.add_images(images, ids))

    @v1.post("/index/texts", summary="Add texts to the index (persisted)")
    async def index_texts(body: IndexTextsRequest) -> JSONResponse:
        return index_response(await core.add_texts(body.texts, body.ids))

    app.include_router(v1)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up")
    async def readyz() -> JSONResponse:
        if not core.ready:
            return JSONResponse({"status": "loading"}, 503, headers={"Retry-After": "1"})
        view = core.view
        return JSONResponse({"status": "ready", "model": core.config.model, "images": len(view.image_ids),
                             "texts": len(view.text_ids)})

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(core.batchers, core.ready), media_type=metrics.content_type)

    known_paths.update(app.openapi()["paths"], ["/docs", "/openapi.json"])
    return app


class _Unauthorized(Exception):
    """Raised by the API-key check; answered with 401."""
