"""The one request-body parser: guarded JSON decoding, then a pydantic model, for every route.

`json.loads` alone answers hostile-but-valid JSON with RecursionError (deep nesting) or ValueError (integers
longer than Python's int-parsing limit); here both, and every other limit, become an `HttpError` 400 naming
the limit. Strings must be valid Unicode text (no lone surrogates), so nothing accepted can fail later when
it is written to disk or sent back.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      WithJsonSchema)

from ..laclip import MIN_TAU
from .errors import HttpError, safe_text

MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 40  # int64 needs 20; a float literal longer than this is not a real value either
MAX_TEXT_CHARS = 10_000  # a query or an indexed text (the tokenizer keeps the first 52 tokens)
MAX_ITEMS = 1024  # queries, texts, images or ids in one request: the one per-request item limit
MAX_CONTAINER = 100_000  # entries of any one JSON array or object (a structural guard, e.g. inside a payload)
DEFAULT_K = 10
MAX_K = 1000

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class BodyLimits:
    """Limits every JSON body is held to before a model sees it."""

    max_depth: int = MAX_JSON_DEPTH
    max_number_chars: int = MAX_NUMBER_CHARS
    max_container: int = MAX_CONTAINER


def _bad(detail: str) -> HttpError:
    return HttpError(400, "MalformedBody", detail)


def _number(limit: int, convert: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > limit:
            raise _bad(f"a number in the body has {len(text)} characters, more than the limit of {limit}")
        return convert(text)
    return parse


def _constant(name: str) -> Any:
    raise _bad(f"{name} is not valid JSON")


def parse_json(raw: bytes, limits: BodyLimits = BodyLimits()) -> Any:
    """Decode a JSON body within `limits`; any failure is an HttpError 400 that says what was wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"the body is not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text, parse_int=_number(limits.max_number_chars, int),
                          parse_float=_number(limits.max_number_chars, float), parse_constant=_constant)
    except json.JSONDecodeError as exc:
        raise HttpError(400, "MalformedJSON", f"malformed JSON body: {exc.msg} at line {exc.lineno} "
                                              f"column {exc.colno}") from None
    except RecursionError:
        raise _bad(f"JSON nested deeper than the limit of {limits.max_depth}") from None
    check_json(data, limits)
    return data


def check_json(data: Any, limits: BodyLimits) -> None:
    """Nesting within the depth limit, no array or object over the container limit, every string (keys too) valid
    Unicode text; the 422 for a bad string says where it is (`body.ids[4]`)."""
    stack: list[tuple[Any, int, Any, Any]] = [(data, 1, None, None)]
    while stack:
        value, depth, parent, key = stack.pop()
        if isinstance(value, str):
            _check_text(value, parent, key)
        elif isinstance(value, (list, dict)):
            if depth > limits.max_depth:
                raise _bad(f"JSON nested deeper than the limit of {limits.max_depth}")
            if len(value) > limits.max_container:
                raise _bad(f"a JSON array or object has {len(value)} items, more than the limit of "
                           f"{limits.max_container}")
            where = (parent, key)
            if isinstance(value, dict):
                for name, item in value.items():
                    _check_text(name, where, None)
                    stack.append((item, depth + 1, where, name))
            else:
                stack.extend((item, depth + 1, where, i) for i, item in enumerate(value)
                             if isinstance(item, (str, list, dict)))


def _path(parent: Any, key: Any) -> str:
    parts = []
    while parent is not None:
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
        parent, key = parent
    return "body" + "".join(reversed(parts))


def _check_text(value: str, parent: Any, key: Any) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = "a key in " + _path(*parent) if key is None and parent is not None else _path(parent, key)
        raise HttpError(422, "InputError", f"{safe_text(where)} is not valid Unicode text (a lone surrogate at "
                                           f"character {exc.start})") from None


def validate(model: type[M], data: Any) -> M:
    """`data` as `model`; a mismatch is an HttpError 422 listing each field at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HttpError(422, "ValidationError", describe_errors(exc.errors(include_url=False))) from None


def describe_errors(errors: list[dict[str, Any]]) -> str:
    """pydantic's error list as one readable line: `query: Input should be a valid string; k: ...`."""
    parts = []
    for e in errors[:10]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body",)) or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
    return "; ".join(parts) + more


def decode_base64(data: str, what: str) -> bytes:
    """Bytes of a base64 string (a `data:` URL prefix is accepted); HttpError 400 naming `what` otherwise."""
    if data.startswith("data:") and "," in data:
        data = data.split(",", 1)[1]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HttpError(400, "MalformedBody", f"{what} is not valid base64 ({exc})") from None


# ---- request models -----------------------------------------------------------------------------------------

Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_TEXT_CHARS)]
# The id rule itself is engine.ids.check_ids (422 naming the id's position); the schema only documents it.
IdValue = Annotated[Union[Annotated[StrictStr, WithJsonSchema({"type": "string", "minLength": 1, "maxLength": 256})],
                          Annotated[StrictInt, WithJsonSchema({"type": "integer", "minimum": -(2 ** 63),
                                                               "maximum": 2 ** 63 - 1})]], Field(description="an id: a string (1..256 characters of "
                                                                   "Unicode text, no control characters) or a "
                                                                   "64-bit integer; 3 and \"3\" are the same id")]
K = Annotated[StrictInt, Field(ge=1, le=MAX_K, description="how many hits")]
Payload = Optional[dict[str, Any]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoreSettings(_Body):
    """Query-time LACLIP settings for this request; omitted fields keep the server's. `{"alpha": 1}` is plain
    CLIP (global term only)."""

    tau: Optional[Annotated[Union[StrictFloat, StrictInt], Field(ge=MIN_TAU)]] = None  # the schema states the bound
    alpha: Optional[Annotated[Union[StrictFloat, StrictInt], Field(ge=0, le=1)]] = None
    weights: Optional[Literal["image", "text"]] = None


class ImageSearchRequest(_Body):
    """Text -> image: one query or a list of queries."""

    query: Union[Text, Annotated[list[Text], Field(max_length=MAX_ITEMS)]]
    k: K = DEFAULT_K
    laclip: Optional[ScoreSettings] = None
    exact: StrictBool = False


class ImageQuery(_Body):
    """One image as base64 (a `data:` URL prefix is accepted)."""

    image: StrictStr
    k: K = DEFAULT_K
    laclip: Optional[ScoreSettings] = None
    exact: StrictBool = False


class SimilarRequest(_Body):
    """Image -> image: by a stored image's id (its stored vector; it is left out of its own hits) or an image."""

    id: Optional[IdValue] = None
    image: Optional[StrictStr] = None
    k: K = DEFAULT_K
    exact: StrictBool = False


class EncodeTextRequest(_Body):
    text: Union[Text, Annotated[list[Text], Field(max_length=MAX_ITEMS)]]


class EncodeImageRequest(_Body):
    image: StrictStr


class IndexTextsRequest(_Body):
    """Texts to add; ids default to counters; payloads are merged with {"text": ...}."""

    texts: Annotated[list[Text], Field(max_length=MAX_ITEMS)]
    ids: Optional[Annotated[list[IdValue], Field(max_length=MAX_ITEMS)]] = None
    payloads: Optional[Annotated[list[Payload], Field(max_length=MAX_ITEMS)]] = None


class IndexImagesRequest(_Body):
    """Base64 images to add; ids default to counters (uploads: file name stems)."""

    images: Annotated[list[StrictStr], Field(max_length=MAX_ITEMS)]
    ids: Optional[Annotated[list[IdValue], Field(max_length=MAX_ITEMS)]] = None
    payloads: Optional[Annotated[list[Payload], Field(max_length=MAX_ITEMS)]] = None


class DeleteRequest(_Body):
    """Bulk delete: all ids must exist, or nothing is deleted."""

    ids: Annotated[list[IdValue], Field(min_length=1, max_length=MAX_ITEMS)]
