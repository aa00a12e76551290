"""IIIF Content Search 2.0 answers, and the Presentation 3 manifests that declare the service.

A search answer is an `AnnotationPage` (JSON-LD, Search 2 context) of `highlighting` annotations, best first, each
targeting a matching canvas with its best region (`canvas#xywh=...`), paged by `page` (1-based) within an
`AnnotationCollection` (`partOf`, with `total`, `first` and `last`). A manifest written by the engine re-publishes
the indexed canvases of one source manifest (same canvas ids, the museum's image services) and declares the search
service (`SearchService2`) scoped to it, so a viewer that opens it can search inside the object."""
from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence
from urllib.parse import urlencode

from ..errors import InputError

SEARCH_CONTEXT = "http://iiif.io/api/search/2/context.json"
PRESENTATION_CONTEXT = "http://iiif.io/api/presentation/3/context.json"
PAGE_SIZE = 20
MAX_RESULTS = 200  # matches answered per query (ranked), across its pages


def manifest_key(manifest_id: str) -> str:
    """The short, URL-safe key of a source manifest in the engine's /iiif routes."""
    return hashlib.sha256(manifest_id.encode("utf-8")).hexdigest()[:20]


def ignored_parameters(params: Mapping[str, str]) -> list[str]:
    """Search 2 parameters the engine does not use (it ranks images by similarity to `q`): reported as `ignored`."""
    return sorted(p for p in ("motivation", "date", "user") if params.get(p))


def search_page(service: str, query: str, hits: Sequence[Any], page: int = 1, *, scoped: bool = False,
                params: Mapping[str, str] | None = None, ignored: Sequence[str] = (),
                page_size: int = PAGE_SIZE) -> dict[str, Any]:
    """Page `page` of the answer to `query` at the service URL `service` over ranked IIIF hits (each with
    `payload["iiif"]`, engine.iiif.links). `scoped`: the hits are of one manifest (targets are then plain
    `canvas#xywh` strings, else SpecificResources naming their manifest); `params`: other query parameters the
    page URLs keep (e.g. `within`)."""
    if query is None or not query.strip():
        raise InputError("q: give the text to search for (?q=...)")
    pages = max(1, math.ceil(len(hits) / page_size))
    if not 1 <= page <= pages:
        raise InputError(f"page must be between 1 and {pages} for this query, got {page}")
    def url(number: int | None) -> str:
        kept = {"q": query, **(params or {}), **({"page": number} if number is not None else {})}
        return f"{service}?{urlencode(kept)}"

    start = (page - 1) * page_size
    answer: dict[str, Any] = {
        "@context": SEARCH_CONTEXT, "id": url(page), "type": "AnnotationPage",
        "partOf": {"id": url(None), "type": "AnnotationCollection", "total": len(hits),
                   "first": {"id": url(1), "type": "AnnotationPage"},
                   "last": {"id": url(pages), "type": "AnnotationPage"}},
        "startIndex": start,
        "items": [_annotation(url(page), start + i, hit, scoped)
                  for i, hit in enumerate(hits[start:start + page_size])],
    }
    if page > 1:
        answer["prev"] = {"id": url(page - 1), "type": "AnnotationPage"}
    if page < pages:
        answer["next"] = {"id": url(page + 1), "type": "AnnotationPage"}
    if ignored:
        answer["ignored"] = list(ignored)
    return answer


def _annotation(page_id: str, rank: int, hit: Any, scoped: bool) -> dict[str, Any]:
    links = hit.payload["iiif"]
    fragment = links["canvas"]
    canvas, _, selector = fragment.partition("#")
    target: Any = fragment
    if not scoped:
        target = {"type": "SpecificResource",
                  "source": {"id": canvas, "type": "Canvas",
                             "partOf": [{"id": links["manifest"], "type": "Manifest"}]}}
        if selector:
            target["selector"] = {"type": "FragmentSelector", "conformsTo": "http://www.w3.org/TR/media-frags/",
                                  "value": selector}
    title = hit.payload.get("title") or hit.payload.get("source") or str(hit.id)
    return {"id": f"{page_id}#result-{rank + 1}", "type": "Annotation", "motivation": "highlighting",
            "label": {"none": [f"{title} ({hit.score:.4f})"]},
            "body": {"type": "TextualBody", "value": title, "format": "text/plain"},
            "target": target}


def manifest_document(self_id: str, search_id: str, payloads: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A Presentation 3 manifest of the indexed canvases of one source manifest (their payloads, in canvas order),
    declaring the Content Search 2 service at `search_id`."""
    if not payloads:
        raise InputError("no indexed canvases for this manifest")
    first = payloads[0]
    return {
        "@context": [SEARCH_CONTEXT, PRESENTATION_CONTEXT],
        "id": self_id, "type": "Manifest",
        "label": first.get("manifest_label") or {"none": [first["manifest"]]},
        "metadata": first.get("metadata") or [],
        "seeAlso": [{"id": first["manifest"], "type": "Dataset", "label": {"en": ["source manifest"]},
                     "format": "application/ld+json"}],
        "service": [{"id": search_id, "type": "SearchService2"}],
        "items": [_canvas(self_id, position, p) for position, p in enumerate(payloads)],
    }


def _canvas(self_id: str, position: int, payload: Mapping[str, Any]) -> dict[str, Any]:
    width, height = payload.get("canvas_size") or payload.get("full_size") or (1, 1)
    body: dict[str, Any] = {"id": payload.get("image_url"), "type": "Image", "format": "image/jpeg"}
    if payload.get("full_size"):
        body["width"], body["height"] = payload["full_size"]
    if payload.get("image_service"):
        version = int(payload.get("image_api") or 2)
        body["id"] = f"{payload['image_service']}/full/{'max' if version == 3 else 'full'}/0/default.jpg"
        level = int(payload.get("image_level") or 0)
        body["service"] = [{"id": payload["image_service"], "type": f"ImageService{version}",
                            "profile": f"level{level}" if version == 3
                            else f"http://iiif.io/api/image/2/level{level}.json"}]
    canvas = payload["canvas"]
    return {"id": canvas, "type": "Canvas", "width": width, "height": height,
            "label": payload.get("label") or {"none": [canvas]},
            "items": [{"id": f"{self_id}/page/{position}", "type": "AnnotationPage",
                       "items": [{"id": f"{self_id}/annotation/{position}", "type": "Annotation",
                                  "motivation": "painting", "body": body, "target": canvas}]}]}
