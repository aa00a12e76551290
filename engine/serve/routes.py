"""The /v1 routes: read the request (engine.serve.inputs), call the ServerCore, shape the answer.

Routes that take images accept JSON (base64) or multipart uploads; each documents both bodies and every error
status it can answer, all with the one error model.
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel

from ..errors import InputError
from ..gallery import TextRecords, parse_texts_jsonl
from ..ids import Id
from ..duplicates import DEFAULT_DUPLICATE_THRESHOLD
from .bodies import (MAX_K, DeleteRequest, EncodeImageRequest, EncodeTextRequest, IndexImagesRequest,
                     IndexTextsRequest, decode_base64, parse_json, validate)
from .core import ServerCore
from .errors import HttpError, error_responses
from .guards import AccessPolicy
from .inputs import Upload, content_kind, form_list, form_model, form_uploads, json_body, one_upload, read_form
from .schemas import (DeleteResponse, DuplicatesResponse, EncodeImageResponse, EncodeTextResponse, HitsResponse,
                      ImageSearchResponse, IndexResponse, InfoResponse, PayloadKeysResponse)
from .search_bodies import ImageSearchBody, SimilarBody, TextSearchBody, form_options, options

_FILE = {"type": "string", "format": "binary"}
_LACLIP_FIELD = {"type": "string", "description": "query-time LACLIP settings as a JSON object string, "
                                                  "e.g. {\"alpha\": 1}"}
_K_FIELD = {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": 10}
_EXACT_FIELD = {"type": "boolean", "default": False}
_ID_FIELD = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
_WHERE_FIELD = {"type": "string", "description": "payload filter as a JSON object string, e.g. {\"album\": \"敦煌\"}"}
_BOX_FIELD = {"type": "string", "description": "[x0, y0, x1, y1] as a JSON array string (pixels of the image)"}


class Schemas:
    """Collects the JSON body models that routes reference from `openapi_extra`, for components/schemas."""

    def __init__(self) -> None:
        self.models: dict[str, type[BaseModel]] = {}

    def ref(self, model: type[BaseModel]) -> dict[str, str]:
        self.models[model.__name__] = model
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    def body(self, json_model: type[BaseModel] | None, multipart: dict[str, Any] | None = None,
             required: Sequence[str] = ()) -> dict[str, Any]:
        content: dict[str, Any] = {}
        if json_model is not None:
            content["application/json"] = {"schema": self.ref(json_model)}
        if multipart is not None:
            content["multipart/form-data"] = {"schema": {"type": "object", "properties": multipart,
                                                         "required": list(required)}}
        return {"requestBody": {"required": True, "content": content}}

    def install(self, app_openapi: dict[str, Any]) -> None:
        """Add the collected models (and their nested definitions) to an OpenAPI document."""
        schemas = app_openapi.setdefault("components", {}).setdefault("schemas", {})
        for name, model in self.models.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema


def hits_json(hits: Sequence[Any]) -> list[dict[str, Any]]:
    """Hits (id, score, payload, and evidence when there is some) as JSON objects."""
    return [{"id": h.id, "score": h.score, "payload": h.payload,
             **({"evidence": h.evidence} if h.evidence is not None else {})} for h in hits]


def build_router(core: ServerCore, policy: AccessPolicy, schemas: Schemas) -> APIRouter:
    """The /v1 routes over `core` (auth is enforced before routing, by engine.serve.guards.AuthGuard); the
    JSON body models they take are collected in `schemas`."""
    keyed = [401] if policy.api_key is not None else []
    reads = error_responses([400, 408, 413, 415, 422, 429, 503, *keyed])
    writes = error_responses([400, 403, 408, 409, 413, 415, 422, 429, 500, 503, *keyed])
    v1 = APIRouter(prefix="/v1")

    async def image_query(request: Request) -> tuple[Upload, TextSearchBody]:
        if content_kind(request) == "json":
            body = await json_body(request, TextSearchBody)
            return Upload(decode_base64(body.image, "image"), "image"), body
        form = await read_form(request)
        upload = await one_upload(form)
        return upload, form_model(form, TextSearchBody, image="<upload>", **form_options(form))

    @v1.get("/info", summary="What the server runs and whether it needs a key (no key needed)",
            response_model=InfoResponse, responses=error_responses([503]))
    async def info() -> dict[str, Any]:
        images, texts = core.counts()
        return {"auth": policy.api_key is not None, **core.describe(), "laclip": core.laclip_info(),
                "max_k": MAX_K, "images": images, "texts": texts}

    @v1.post("/search/images", summary="Text -> image search", response_model=ImageSearchResponse,
             responses=reads, openapi_extra=schemas.body(ImageSearchBody), response_model_exclude_unset=True)
    async def search_images(request: Request) -> dict[str, Any]:
        body = await json_body(request, ImageSearchBody)
        single = isinstance(body.query, str)
        result = await core.search_images([body.query] if single else body.query, body.k, body.laclip, body.exact,
                                          **options(body, "where", "negative", "negative_weight", "explain",
                                                    "collapse"))
        hits = [hits_json(h) for h in result.values]
        return {"hits": hits[0] if single else hits, "truncated": result.truncated[0] if single else result.truncated}

    @v1.post("/search/texts", summary="Image -> text search (the texts come back in each hit's payload)",
             response_model=HitsResponse, responses=reads, response_model_exclude_unset=True,
             openapi_extra=schemas.body(TextSearchBody, {"image": _FILE, "k": _K_FIELD, "laclip": _LACLIP_FIELD,
                                                         "exact": _EXACT_FIELD, "where": _WHERE_FIELD,
                                                         "box": _BOX_FIELD}, ["image"]))
    async def search_texts(request: Request) -> dict[str, Any]:
        upload, body = await image_query(request)
        return {"hits": hits_json(await core.search_texts(upload, body.k, body.laclip, body.exact,
                                                          **options(body, "where", "box")))}

    @v1.post("/search/similar", summary="Image -> image search, by a stored image's id or by an image",
             response_model=HitsResponse, responses=error_responses([404, *reads]), response_model_exclude_unset=True,
             openapi_extra=schemas.body(SimilarBody, {
                 "image": _FILE, "id": _ID_FIELD, "k": _K_FIELD, "exact": _EXACT_FIELD, "where": _WHERE_FIELD,
                 "box": _BOX_FIELD, "explain": _EXACT_FIELD, "against": {"type": "string", "enum": ["global", "crops"]},
                 "collapse": {"type": "string", "enum": ["duplicates"]}}))
    async def search_similar(request: Request) -> dict[str, Any]:
        if content_kind(request) == "json":
            body = await json_body(request, SimilarBody)
            upload = None if body.image is None else Upload(decode_base64(body.image, "image"), "image")
        else:
            form = await read_form(request)
            uploads = await form_uploads(form, "image")
            upload = uploads[0] if uploads else None
            body = form_model(form, SimilarBody, image=None, **form_options(form))
            if len(uploads) > 1:
                raise HttpError(422, "ValidationError", f"one image at a time, got {len(uploads)}")
        if (body.id is None) == (upload is None):
            raise HttpError(422, "ValidationError", "give exactly one of 'id' (a stored image) or 'image'")
        hits = await core.search_similar(body.id, upload, body.k, body.exact,
                                         **options(body, "box", "where", "against", "explain", "collapse"))
        return {"hits": hits_json(hits)}

    @v1.post("/encode/text", summary="Text embeddings (L2-normalised)", response_model=EncodeTextResponse,
             responses=reads, openapi_extra=schemas.body(EncodeTextRequest))
    async def encode_text(request: Request) -> dict[str, Any]:
        body = await json_body(request, EncodeTextRequest)
        result = await core.encode_text([body.text] if isinstance(body.text, str) else body.text)
        return {"embeddings": [row.tolist() for row in result.values], "truncated": result.truncated,
                "dim": int(result.values[0].shape[0])}

    @v1.post("/encode/image", summary="Image embedding: global, and LACLIP crops when the index uses them",
             response_model=EncodeImageResponse, responses=reads,
             openapi_extra=schemas.body(EncodeImageRequest, {"image": _FILE}, ["image"]))
    async def encode_image(request: Request) -> dict[str, Any]:
        if content_kind(request) == "json":
            body = await json_body(request, EncodeImageRequest)
            upload = Upload(decode_base64(body.image, "image"), "image")
        else:
            form = await read_form(request)
            upload = await one_upload(form)
            form_model(form, EncodeImageRequest, image="<upload>")
        global_, crops = await core.encode_image(upload)
        return {"embedding": global_.tolist(), "crops": None if crops is None else crops.tolist(),
                "dim": int(global_.shape[0])}

    async def counted(added_or_deleted: dict[str, Any]) -> dict[str, Any]:
        images, texts = core.counts()
        return {**added_or_deleted, "images": images, "texts": texts, "persisted": core.persistent}

    @v1.post("/index/images", summary="Add images (durable before the answer unless the server is --in-memory)",
             response_model=IndexResponse, responses=writes,
             openapi_extra=schemas.body(IndexImagesRequest, {
                 "images": {"type": "array", "items": _FILE},
                 "ids": {"type": "array", "items": _ID_FIELD, "description": "default: the file name stems"},
                 "payloads": {"type": "string", "description": "a JSON array of objects, one per image"}},
                 ["images"]))
    async def index_images(request: Request) -> dict[str, Any]:
        if content_kind(request) == "json":
            body = await json_body(request, IndexImagesRequest)
            uploads = [Upload(decode_base64(data, f"image #{i}"), f"image #{i}") for i, data in enumerate(body.images)]
            ids, payloads = body.ids, body.payloads
        else:
            form = await read_form(request)
            uploads = await form_uploads(form, "images")
            ids = form_list(form, "ids") or None  # None: file name stems (the folder-id rule), else counters
            payloads = _form_payloads(form)
        return await counted({"added": await core.add_images(uploads, ids, payloads)})

    @v1.post("/index/texts", summary="Add texts: JSON, or a JSON-lines file upload in the --texts format",
             response_model=IndexResponse, responses=writes,
             openapi_extra=schemas.body(IndexTextsRequest, {"file": {**_FILE, "description":
                                        "JSON lines {\"text_id\" (or \"id\"): ..., \"text\": ...}"}}, ["file"]))
    async def index_texts(request: Request) -> dict[str, Any]:
        if content_kind(request) == "json":
            body = await json_body(request, IndexTextsRequest)
            texts, ids, payloads = body.texts, body.ids, body.payloads
        else:
            form = await read_form(request)
            upload = await one_upload(form, "file")
            records = texts_from_jsonl(upload)
            texts, ids, payloads = records.texts, records.ids, records.payloads
        return await counted({"added": await core.add_texts(texts, ids, payloads)})

    for kind in ("images", "texts"):
        _add_delete_routes(v1, core, kind, counted, schemas, writes)

    @v1.get("/index/stats", summary="Index counts, segments, deleted rows, bytes on disk, ANN state",
            responses=error_responses([503, *keyed]))
    async def stats() -> dict[str, Any]:
        return {**(await core.stats()), "persisted": core.persistent}

    @v1.get("/index/duplicates", summary="Groups of near-duplicate images (global vectors within the threshold)",
            response_model=DuplicatesResponse, responses=error_responses([422, 503, *keyed]))
    async def duplicates(threshold: float = Query(DEFAULT_DUPLICATE_THRESHOLD, gt=0, le=1),
                         limit: int = Query(100, ge=1, le=10_000)) -> dict[str, Any]:
        return await core.duplicates(threshold, limit)

    @v1.get("/index/payload-keys", summary="Keys seen in the payloads (first 10,000 live rows), for filters",
            response_model=PayloadKeysResponse, responses=error_responses([422, 503, *keyed]))
    async def payload_keys(kind: Literal["images", "texts"] = "images") -> dict[str, Any]:
        return {"keys": await core.payload_keys(kind)}

    @v1.get("/images/{id:path}/thumbnail", summary="The stored thumbnail of an indexed image (JPEG)",
            response_class=Response, responses={200: {"content": {"image/jpeg": {"schema": _FILE}}},
                                                **error_responses([404, 422, 503, *keyed])})
    async def thumbnail(id: str) -> Response:
        return Response(await core.thumbnail(id), media_type="image/jpeg",
                        headers={"Cache-Control": "private, max-age=3600"})

    return v1


def _add_delete_routes(v1: APIRouter, core: ServerCore, kind: str, counted: Any, schemas: Schemas,
                       responses: dict) -> None:
    @v1.delete(f"/index/{kind}/{{id:path}}", summary=f"Delete one of the {kind} (durable before the answer)",
               response_model=DeleteResponse, responses={**responses, **error_responses([404, 422])},
               name=f"delete_{kind}_one")
    async def delete_one(id: str) -> dict[str, Any]:
        return await counted({"deleted": await core.delete(kind, [id])})

    @v1.post(f"/index/{kind}/delete", summary=f"Delete several {kind}: all ids must exist, or none is deleted",
             response_model=DeleteResponse, responses={**responses, **error_responses([404])},
             openapi_extra=schemas.body(DeleteRequest), name=f"delete_{kind}_many")
    async def delete_many(request: Request) -> dict[str, Any]:
        body = await json_body(request, DeleteRequest)
        return await counted({"deleted": await core.delete(kind, body.ids)})


def _form_payloads(form: Any) -> list[dict[str, Any] | None] | None:
    raw = form.get("payloads")
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise HttpError(422, "ValidationError", "payloads: expected a JSON array in a plain form field")
    return validate(IndexImagesRequest, {"images": [], "payloads": parse_json(raw.encode("utf-8"))}).payloads


def texts_from_jsonl(upload: Upload) -> TextRecords:
    """The records of a JSON-lines upload, read by engine.gallery's one reader (the `--texts` format) with the
    body limits of every JSON request; errors name the file and line."""
    try:
        lines = upload.data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise HttpError(400, "MalformedBody", f"{upload.name}: not UTF-8 text (byte {exc.start})") from None
    try:
        records = parse_texts_jsonl(lines, upload.name, _json_line)
    except InputError as exc:
        raise HttpError(422, "ValidationError", str(exc)) from None
    if not records.texts:
        raise HttpError(422, "ValidationError", f"{upload.name}: no texts in the file")
    return records


def _json_line(line: str, at: str) -> Any:
    try:
        return parse_json(line.encode("utf-8"))
    except HttpError as exc:
        raise HttpError(exc.status, exc.kind, f"{at}: {exc.detail}") from None
