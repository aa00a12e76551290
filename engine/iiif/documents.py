"""IIIF Presentation documents (API 2 and 3) read into one small model: a collection's members, a manifest's
canvases with their painted image (its service, or the image file itself), labels and metadata as language maps.

Language maps follow Presentation 3 (`{"zh": ["..."], "none": ["..."]}`); a v2 string, `{"@value", "@language"}`
object or list of them is converted to one, so payloads always hold the same shape. `display` picks the text to
show, Chinese first."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

LanguageMap = dict[str, list[str]]
DISPLAY_ORDER = ("zh", "zh-hans", "zh-cn", "zh-hant", "zh-tw", "zh-hk", "none", "en")
_TYPES = {"sc:manifest": "Manifest", "sc:collection": "Collection", "manifest": "Manifest",
          "collection": "Collection", "sc:canvas": "Canvas", "canvas": "Canvas"}


@dataclass(frozen=True)
class Reference:
    """A member of a collection: a manifest or a nested collection, by id, with the document when embedded."""

    id: str
    type: str  # "Manifest" or "Collection"
    embedded: dict[str, Any] | None = None


@dataclass(frozen=True)
class CanvasImage:
    """One canvas and the image painted on it: `service` (an Image API base URL, with its version when the
    manifest tells it) or only `image` (a plain image file); `image_size` as the manifest states it."""

    id: str
    label: LanguageMap
    width: int | None
    height: int | None
    service: str | None
    service_version: int | None
    image: str | None
    image_size: tuple[int, int] | None


@dataclass
class Manifest:
    id: str
    version: int
    label: LanguageMap
    metadata: list[dict[str, LanguageMap]]
    canvases: list[CanvasImage] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (canvas id, what is wrong)


@dataclass
class Collection:
    id: str
    version: int
    label: LanguageMap
    members: list[Reference]


def read_document(document: dict[str, Any], where: str) -> Manifest | Collection:
    """A manifest or a collection; InputError naming `where` for anything else (not IIIF, another type)."""
    version = presentation_version(document, where)
    kind = document_type(document)
    if kind == "Manifest":
        return read_manifest(document, version, where)
    if kind == "Collection":
        return read_collection(document, version, where)
    raise InputError(f"{where}: a IIIF {kind or 'document without a type'} is neither a Manifest nor a Collection")


def presentation_version(document: dict[str, Any], where: str) -> int:
    """2 or 3, by the @context (or, without one, by `@id`/`id`); InputError when the document is not IIIF."""
    contexts = document.get("@context")
    contexts = contexts if isinstance(contexts, list) else [contexts]
    text = " ".join(c for c in contexts if isinstance(c, str))
    if "presentation/3" in text:
        return 3
    if "presentation/2" in text:
        return 2
    if document_type(document) in ("Manifest", "Collection"):
        return 2 if "@id" in document else 3
    raise InputError(f"{where}: not a IIIF Presentation document (no presentation @context, "
                     f"type {document.get('type', document.get('@type'))!r})")


def document_type(document: dict[str, Any]) -> str | None:
    raw = document.get("type", document.get("@type"))
    return _TYPES.get(raw.lower(), raw) if isinstance(raw, str) else None


def read_collection(document: dict[str, Any], version: int, where: str) -> Collection:
    """A collection's members in order (v3 `items`; v2 `collections`, `manifests`, then `members`)."""
    if version == 3:
        entries = document.get("items", [])
    else:
        entries = [*document.get("collections", []), *document.get("manifests", []), *document.get("members", [])]
    if not isinstance(entries, list):
        raise InputError(f"{where}: the collection's members must be a list")
    members = []
    for entry in entries:
        ref_id = _id(entry)
        kind = document_type(entry) if isinstance(entry, dict) else None
        if ref_id is None or kind not in ("Manifest", "Collection"):
            continue
        embedded = entry if _embeds(entry, kind, version) else None
        members.append(Reference(ref_id, kind, embedded))
    return Collection(_id(document) or where, version, language_map(document.get("label")), members)


def read_manifest(document: dict[str, Any], version: int, where: str) -> Manifest:
    """A manifest's canvases (v3 `items`; v2 the first sequence's `canvases`); a canvas without a readable image
    is listed in `problems`, not dropped silently."""
    manifest_id = _id(document)
    if manifest_id is None:
        raise InputError(f"{where}: the manifest has no id")
    manifest = Manifest(manifest_id, version, language_map(document.get("label")), metadata(document.get("metadata")))
    if version == 3:
        canvases = document.get("items", [])
    else:
        sequences = document.get("sequences") or [{}]
        canvases = sequences[0].get("canvases", []) if isinstance(sequences[0], dict) else []
    if not isinstance(canvases, list):
        raise InputError(f"{where}: the manifest's canvases must be a list")
    for position, canvas in enumerate(canvases):
        canvas_id = _id(canvas) if isinstance(canvas, dict) else None
        if canvas_id is None:
            manifest.problems.append((f"{manifest_id} canvas #{position}", "canvas without an id"))
            continue
        image = _painted_image(canvas, version)
        if image is None:
            manifest.problems.append((canvas_id, "no image painted on the canvas"))
            continue
        manifest.canvases.append(CanvasImage(canvas_id, language_map(canvas.get("label")), _int(canvas.get("width")),
                                             _int(canvas.get("height")), *image))
    return manifest


def language_map(value: Any) -> LanguageMap:
    """A Presentation 3 language map from a v3 map, a v2 string / `{"@value", "@language"}` / list of them."""
    if value is None:
        return {}
    if isinstance(value, dict) and "@value" not in value:
        return {str(k): [str(v) for v in (vs if isinstance(vs, list) else [vs])] for k, vs in value.items()}
    out: LanguageMap = {}
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            out.setdefault(str(item.get("@language") or "none"), []).append(str(item.get("@value", "")))
        elif item is not None:
            out.setdefault("none", []).append(str(item))
    return out


def metadata(entries: Any) -> list[dict[str, LanguageMap]]:
    """Metadata pairs as language maps; entries that are not label/value pairs are left out."""
    if not isinstance(entries, list):
        return []
    return [{"label": language_map(e.get("label")), "value": language_map(e.get("value"))}
            for e in entries if isinstance(e, dict) and "label" in e and "value" in e]


def display(label: LanguageMap, default: str = "") -> str:
    """The text to show for a language map: Chinese first, then no language, English, then any."""
    lowered = {k.lower(): v for k, v in label.items() if v}
    for language in DISPLAY_ORDER:
        if language in lowered:
            return "; ".join(lowered[language])
    zh = next((v for k, v in lowered.items() if k.startswith("zh")), None)
    values = zh or next(iter(lowered.values()), None)
    return "; ".join(values) if values else default


def _painted_image(canvas: dict[str, Any], version: int) -> tuple[str | None, int | None, str | None,
                                                                   tuple[int, int] | None] | None:
    """(service id, service version, image URL, image size) of the first image painted on a canvas."""
    if version == 3:
        annotations = [a for page in canvas.get("items", []) if isinstance(page, dict)
                       for a in page.get("items", []) if isinstance(a, dict)]
        bodies = [a.get("body") for a in annotations if a.get("motivation", "painting") == "painting"]
    else:
        bodies = [a.get("resource") for a in canvas.get("images", []) if isinstance(a, dict)]
    for body in bodies:
        body = body[0] if isinstance(body, list) and body else body
        if isinstance(body, dict) and document_type(body) in ("Choice", "oa:Choice"):  # v3 items, v2 default
            body = body.get("default") or next(iter(body.get("items") or body.get("item") or []), None)
        if not isinstance(body, dict):
            continue
        service, service_version = _image_service(body.get("service"))
        url = _id(body)
        if service is None and url is None:
            continue
        size = (_int(body.get("width")), _int(body.get("height")))
        return service, service_version, url, size if None not in size else None
    return None


def _image_service(services: Any) -> tuple[str | None, int | None]:
    for service in services if isinstance(services, list) else [services]:
        if not isinstance(service, dict):
            continue
        kind = str(service.get("type", service.get("@type", "")))
        marks = f"{kind} {service.get('@context', '')} {service.get('profile', '')}"
        if "ImageService" in kind or "api/image" in marks or "level" in marks:
            service_id = _id(service)
            if service_id:
                return service_id.rstrip("/"), 3 if ("ImageService3" in kind or "image/3" in marks) else 2
    return None, None


def _embeds(entry: dict[str, Any], kind: str, version: int) -> bool:
    """Whether a collection member carries its own content (v3 items; v2 sequences, manifests or collections)."""
    if version == 3:
        return bool(entry.get("items"))
    keys = ("sequences",) if kind == "Manifest" else ("manifests", "collections", "members")
    return any(entry.get(k) for k in keys)


def _id(node: Any) -> str | None:
    if isinstance(node, str):
        return node or None
    if not isinstance(node, dict):
        return None
    value = node.get("id", node.get("@id"))
    return value if isinstance(value, str) and value else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
