"""Reading a request into the body models: JSON through the guarded parser, multipart form fields converted
to the same models, uploads named by their file name so every error can say which one was at fault."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from .bodies import MAX_ITEMS, MAX_NUMBER_CHARS, parse_json, validate
from .errors import HttpError

M = TypeVar("M", bound=BaseModel)
_INT = re.compile(r"-?[0-9]+")
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


@dataclass(frozen=True)
class Upload:
    """An uploaded image: its bytes and a name for messages (the file name, or `image #i`)."""

    data: bytes
    name: str
    filename: str | None = None

    @property
    def basename(self) -> str | None:
        """The file name without folders (an image's payload "source"), or None."""
        return PurePath(self.filename.replace("\\", "/")).name or None if self.filename else None


def content_kind(request: Request) -> str:
    """"json" or "multipart"; 415 otherwise, saying so when the body is JSON sent under another type."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        return "json"
    if kind == "multipart/form-data":
        return "multipart"
    raise HttpError(415, "UnsupportedMediaType", f"unsupported content type {kind or '(none)'!r}: send "
                                                 "'Content-Type: application/json' for a JSON body (base64 "
                                                 "images) or multipart/form-data for file uploads")


async def json_body(request: Request, model: type[M]) -> M:
    """The body of a JSON-only route as `model`."""
    if content_kind(request) != "json":
        raise HttpError(415, "UnsupportedMediaType", "this route takes a JSON body: send "
                                                     "'Content-Type: application/json'")
    return validate(model, parse_json(await request.body()))


class Utf8MultiPartParser(MultiPartParser):
    """Starlette's multipart parser, except that a text field that is not UTF-8 is refused (starlette would fall
    back to Latin-1 and store mojibake such as the id "\xff\xfe")."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                part.data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MultiPartException(f"form field {part.field_name!r} is not UTF-8 text (byte {exc.start}); "
                                         "multipart text fields must be UTF-8") from None
        super().on_part_end()


async def read_form(request: Request) -> FormData:
    """The form of a multipart (UTF-8 text fields) or URL-encoded body; a malformed one is 400 MalformedBody."""
    try:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            parser = Utf8MultiPartParser(request.headers, request.stream(), max_files=MAX_ITEMS,
                                         max_fields=MAX_ITEMS + 16)
            return await parser.parse()
        return await request.form(max_files=MAX_ITEMS, max_fields=MAX_ITEMS + 16)
    except MultiPartException as exc:
        raise HttpError(400, "MalformedBody", f"malformed multipart body: {exc.message}") from None
    except HTTPException as exc:
        raise HttpError(400, "MalformedBody", f"malformed multipart body: {exc.detail}") from None


def form_field(form: FormData, name: str) -> str | None:
    """A plain (non-file) form field, or None when absent."""
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise HttpError(422, "ValidationError", f"{name}: expected a plain form field, got a file upload")
    return value


def form_list(form: FormData, name: str) -> list[str]:
    """Every value of a repeated plain form field (e.g. `ids`)."""
    values = form.getlist(name)
    if any(isinstance(v, UploadFile) for v in values):
        raise HttpError(422, "ValidationError", f"{name}: expected plain form fields, got a file upload")
    return list(values)


def form_model(form: FormData, model: type[M], **extra: Any) -> M:
    """Form fields (k, exact, laclip, id) converted to `model`'s types and validated like a JSON body."""
    data: dict[str, Any] = dict(extra)
    for name in model.model_fields:
        value = form_field(form, name) if name not in extra else None
        if value is None:
            continue
        if name == "laclip":
            data[name] = parse_json(value.encode("utf-8"))
        elif name in ("k", "id") and _INT.fullmatch(value) and len(value) <= MAX_NUMBER_CHARS:
            data[name] = int(value) if name == "k" else value
        elif name == "exact" and value.lower() in _BOOLS:
            data[name] = _BOOLS[value.lower()]
        else:
            data[name] = value
    unknown = set(form.keys()) - set(model.model_fields) - {"image", "images", "file", "ids", "payloads"}
    if unknown:
        raise HttpError(422, "ValidationError", f"unknown form field(s): {', '.join(sorted(unknown))}")
    return validate(model, data)


async def form_uploads(form: FormData, name: str) -> list[Upload]:
    """Every file uploaded under field `name`, named by its file name (or position)."""
    uploads = []
    for position, value in enumerate(form.getlist(name)):
        if not isinstance(value, UploadFile):
            raise HttpError(422, "ValidationError", f"{name} #{position}: expected a file upload, got a plain "
                                                    "form field")
        label = f"{name} #{position}" + (f" ({value.filename})" if value.filename else "")
        uploads.append(Upload(await value.read(), label, value.filename or None))
    return uploads


async def one_upload(form: FormData, name: str = "image") -> Upload:
    uploads = await form_uploads(form, name)
    if len(uploads) != 1:
        raise HttpError(422, "ValidationError", f"multipart body needs exactly one file field '{name}', "
                                                f"got {len(uploads)}")
    return uploads[0]
