"""The search routes' request bodies: the base models (engine.serve.bodies) plus the search options of issue 26
(payload filter, negative queries, evidence, region, best-crop search, duplicate collapse), and the same options
read from multipart form fields.

`where`, `box`, `negative` and `negative_weight` are checked by the engine (an InputError, 422 naming the bad
part), so the models take any JSON there and document the shape.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, StrictBool
from starlette.datastructures import FormData

from .bodies import ImageQuery, ImageSearchRequest, SimilarRequest, parse_json
from .errors import HttpError
from .inputs import form_field

_WHERE = Field(None, description="payload filter: {key: value | {$eq|$ne|$in|$nin|$gt|$gte|$lt|$lte|$exists: ...}, "
                                 "$and: [...], $or: [...]} (at most 8 levels)")
_BOX = Field(None, description="[x0, y0, x1, y1] in the query image's pixels: only that region is encoded")
_EXPLAIN = Field(False, description="add each image hit's crop evidence (LACLIP indexes)")
_COLLAPSE = Field(None, description="\"duplicates\": keep the best hit of each near-duplicate group")


class ImageSearchBody(ImageSearchRequest):
    """Text -> image with the search options."""

    where: Optional[Any] = _WHERE
    negative: Optional[Any] = Field(None, description="a text or a list of texts (at most 64) to steer away from")
    negative_weight: Any = Field(0.5, description="w in score = s(query) - w * max s(negative), 0..10")
    explain: StrictBool = _EXPLAIN
    collapse: Optional[Literal["duplicates"]] = _COLLAPSE


class TextSearchBody(ImageQuery):
    """Image -> text with a payload filter and a region."""

    where: Optional[Any] = _WHERE
    box: Optional[Any] = _BOX


class SimilarBody(SimilarRequest):
    """Image -> image with the search options; against="crops" scores each image by its best-matching crop."""

    where: Optional[Any] = _WHERE
    box: Optional[Any] = _BOX
    explain: StrictBool = _EXPLAIN
    collapse: Optional[Literal["duplicates"]] = _COLLAPSE
    against: Literal["global", "crops"] = Field("global", description="\"crops\": fragment search (max over K crops)")


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def form_options(form: FormData) -> dict[str, Any]:
    """The JSON-valued (`where`, `box`) and boolean (`explain`) search options of a multipart form, parsed; the
    plain strings (`against`, `collapse`) are read by form_model like any field."""
    out: dict[str, Any] = {}
    for name in ("where", "box"):
        value = form_field(form, name)
        if value is not None:
            out[name] = parse_json(value.encode("utf-8"))
    explain = form_field(form, "explain")
    if explain is not None:
        if explain.lower() not in _BOOLS:
            raise HttpError(422, "ValidationError", f"explain: expected true or false, got {explain!r}")
        out["explain"] = _BOOLS[explain.lower()]
    return out


def options(body: Any, *names: str) -> dict[str, Any]:
    """The named options of a parsed body as keyword arguments."""
    return {name: getattr(body, name) for name in names}
