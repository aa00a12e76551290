"""The IIIF routes: `POST /v1/index/iiif` (index a manifest or collection by URL; behind the API key like every
/v1 write), and the read-only, public `/iiif` routes a viewer calls without a key: the Content Search 2.0 service
(`GET /iiif/search?q=` over every IIIF image, `GET /iiif/search/{key}?q=` inside one manifest, `within=` to the
same effect) and the manifests it declares (`GET /iiif/manifest/{key}`, `GET /iiif/collection`). Answers of the
/iiif routes allow any origin (CORS), as viewers run on other sites."""
from __future__ import annotations

import weakref
from typing import Any, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictBool, StrictStr
from starlette.concurrency import run_in_threadpool

from ..errors import ImageDecodeError, InputError
from ..iiif.fetch import FetchPolicy, fetch_image, fetch_many, is_url
from ..iiif.harvest import IiifSource, list_iiif
from ..iiif.images import needed_side
from ..iiif.links import is_iiif_payload
from ..iiif.search_service import (MAX_RESULTS, PRESENTATION_CONTEXT, SEARCH_CONTEXT, ignored_parameters,
                                   manifest_document, manifest_key, search_page)
from ..records import DatasetError, Problem
from .core import ServerCore
from .errors import HttpError, NotFound, error_responses
from .inputs import Upload, json_body

ADD_CHUNK = 16  # canvases fetched, decoded and added at a time
SEARCH_TYPE = f'application/ld+json;profile="{SEARCH_CONTEXT}"'
PRESENTATION_TYPE = f'application/ld+json;profile="{PRESENTATION_CONTEXT}"'
OPEN = {"Access-Control-Allow-Origin": "*"}


def _json_ld(profile: str) -> dict[int, dict[str, Any]]:
    """The documented 200 answer of a /iiif route: JSON-LD with the API's context as its profile."""
    return {200: {"description": "JSON-LD", "content": {
        "application/ld+json": {"schema": {"type": "object"}, "example": {"@context": profile}}}}}


class IiifIndexRequest(BaseModel):
    """A IIIF source to index over HTTP."""

    source: StrictStr = Field(description="http(s) URL of a IIIF manifest or collection (v2 or v3)")
    max_manifests: int = Field(1000, ge=1, le=100_000, description="manifests followed from a collection")
    skip_bad: StrictBool = Field(False, description="skip canvases that cannot be fetched or decoded (reported)")


def build_iiif_router(core: ServerCore) -> APIRouter:
    """The IIIF routes over `core`."""
    router = APIRouter()

    @router.post("/v1/index/iiif", summary="Index a IIIF manifest or collection by URL (canvases not yet indexed)",
                 responses=error_responses([400, 401, 403, 408, 409, 413, 415, 422, 429, 500, 503]),
                 openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {
                     "type": "object", "required": ["source"], "properties": {
                         "source": {"type": "string"}, "max_manifests": {"type": "integer", "default": 1000},
                         "skip_bad": {"type": "boolean", "default": False}}}}}}})
    async def index_iiif(request: Request) -> dict[str, Any]:
        body = await json_body(request, IiifIndexRequest)
        if not is_url(body.source):
            raise InputError(f"source must be an http(s) URL, got {body.source!r}")
        core.counts()  # NotReady before the model is up
        retriever = core.retriever
        policy = FetchPolicy()
        side = needed_side(retriever.transform.resolution, retriever.laclip)
        listing = await run_in_threadpool(list_iiif, IiifSource(body.source, side, body.max_manifests, policy))
        problems = list(listing.problems)
        if problems and not body.skip_bad:
            raise DatasetError(problems)
        todo = [c for c in listing.canvases if not retriever.index.has_image(c.id)]
        added: list[Any] = []
        for start in range(0, len(todo), ADD_CHUNK):
            chunk = todo[start:start + ADD_CHUNK]
            fetched = await run_in_threadpool(fetch_many, chunk, lambda c: fetch_image(c.url, policy),
                                              policy.concurrency)
            bad = len(problems)
            problems += [Problem(c.id, None, "undecodable", f"image {c.id!r}: {data}")
                         for c, data in zip(chunk, fetched) if isinstance(data, InputError)]
            added += await add([(c, data) for c, data in zip(chunk, fetched) if not isinstance(data, InputError)],
                               problems)
            if len(problems) > bad and not body.skip_bad:
                raise DatasetError(problems + [Problem(body.source, None, "stopped", f"{len(added)} canvases were "
                                                       "added before this; a rerun skips them")])
        images, texts = core.counts()
        return {"added": added, "already_indexed": len(listing.canvases) - len(todo),
                "problems": [p.to_dict() for p in problems], "manifests": listing.manifests,
                "truncated": listing.truncated, "images": images, "texts": texts, "persisted": core.persistent}

    async def add(canvases: list[tuple[Any, bytes]], problems: list[Problem]) -> list[Any]:
        """Add (canvas, image bytes) pairs through the server's own decoding (its time budget and pixel limits); a
        chunk holding an undecodable image, or over --max-request-pixels, is added one by one, each image that
        still fails becoming a problem."""
        if not canvases:
            return []
        try:
            return await core.add_images([Upload(data, c.id) for c, data in canvases], [c.id for c, _ in canvases],
                                         [c.payload for c, _ in canvases])
        except (ImageDecodeError, HttpError) as exc:
            if isinstance(exc, HttpError) and exc.status != 413:
                raise
            if len(canvases) > 1:
                return [item for pair in canvases for item in await add([pair], problems)]
            problems.append(Problem(canvases[0][0].id, None, "undecodable", f"image {canvases[0][0].id!r}: {exc}"))
            return []

    @router.get("/iiif/search", summary="IIIF Content Search 2.0 over every IIIF image (public: no key)",
                response_class=JSONResponse, responses={**_json_ld(SEARCH_CONTEXT), **error_responses([422, 503])})
    async def search_all(request: Request, q: str = "", within: str | None = None, page: int = 1) -> JSONResponse:
        params = {"within": within} if within else {}
        return await _search(request, q, page, within, f"{_base(request)}/iiif/search", params)

    @router.get("/iiif/search/{key}", summary="IIIF Content Search 2.0 inside one manifest (public: no key)",
                response_class=JSONResponse, responses={**_json_ld(SEARCH_CONTEXT), **error_responses([404, 422, 503])})
    async def search_manifest(request: Request, key: str, q: str = "", page: int = 1) -> JSONResponse:
        manifest = (await _catalog())[0].get(key)
        if manifest is None:
            raise NotFound(f"no indexed IIIF manifest with key {key!r}")
        return await _search(request, q, page, manifest, f"{_base(request)}/iiif/search/{key}", {})

    @router.get("/iiif/manifest/{key}", summary="A Presentation 3 manifest of a source manifest's indexed canvases, "
                                                "declaring the search service (public: no key)",
                response_class=JSONResponse,
                responses={**_json_ld(PRESENTATION_CONTEXT), **error_responses([404, 422, 503])})
    async def manifest(request: Request, key: str) -> JSONResponse:
        manifests, canvases = await _catalog()
        if key not in manifests:
            raise NotFound(f"no indexed IIIF manifest with key {key!r}")
        base = _base(request)
        document = manifest_document(f"{base}/iiif/manifest/{key}", f"{base}/iiif/search/{key}", canvases[key])
        return JSONResponse(document, media_type=PRESENTATION_TYPE, headers=OPEN)

    @router.get("/iiif/collection", summary="A Presentation 3 collection of every indexed IIIF manifest "
                                            "(public: no key)", response_class=JSONResponse,
                responses={**_json_ld(PRESENTATION_CONTEXT), **error_responses([503])})
    async def collection(request: Request) -> JSONResponse:
        manifests, canvases = await _catalog()
        base = _base(request)
        items = [{"id": f"{base}/iiif/manifest/{key}", "type": "Manifest",
                  "label": canvases[key][0].get("manifest_label") or {"none": [source]}}
                 for key, source in manifests.items()]
        document = {"@context": PRESENTATION_CONTEXT, "id": f"{base}/iiif/collection", "type": "Collection",
                    "label": {"en": ["Indexed IIIF manifests"], "zh": ["已索引的 IIIF 清单"]}, "items": items}
        return JSONResponse(document, media_type=PRESENTATION_TYPE, headers=OPEN)

    async def _search(request: Request, q: str, page: int, manifest: str | None, service: str,
                      params: dict[str, str]) -> JSONResponse:
        if not q.strip():
            raise InputError("q: give the text to search for (?q=...)")
        live, _ = core.counts()
        where = {"manifest": manifest} if manifest else {"canvas": {"$exists": True}}
        hits: Sequence[Any] = []
        if live:  # ranked, with crop evidence on a LACLIP index; core.search_images adds payload["iiif"]
            found = await core.search_images([q], min(MAX_RESULTS, live), where=where,
                                             explain=core.retriever.laclip is not None)
            hits = [h for h in found.values[0] if is_iiif_payload(h.payload)]
        answer = search_page(service, q, hits, page, scoped=manifest is not None, params=params,
                             ignored=ignored_parameters(request.query_params))
        return JSONResponse(answer, media_type=SEARCH_TYPE, headers=OPEN)

    held: dict[str, Any] = {}  # the last catalog and a weak reference to the snapshot it was read from

    async def _catalog() -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
        """({key: source manifest id}, {key: its canvases' payloads in canvas order}) of the index now: read once
        per index snapshot (every payload), then reused until a write makes a new one."""
        core.counts()  # NotReady before the model is up
        snapshot = core.retriever.index.snapshot()
        if held.get("snapshot", lambda: None)() is not snapshot:
            held["catalog"] = await run_in_threadpool(_scan, core, snapshot)
            held["snapshot"] = weakref.ref(snapshot)
        return held["catalog"]

    return router


def _scan(core: ServerCore, snapshot: Any) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
    retriever = core.retriever
    manifests: dict[str, str] = {}
    canvases: dict[str, list[dict[str, Any]]] = {}
    for item in snapshot.ids("images"):
        payload = retriever.image_payload(item)
        if is_iiif_payload(payload):
            key = manifest_key(payload["manifest"])
            manifests[key] = payload["manifest"]
            canvases.setdefault(key, []).append(payload)
    for payloads in canvases.values():
        payloads.sort(key=lambda p: (p.get("canvas_index", 0), p["canvas"]))
    return manifests, canvases


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")
