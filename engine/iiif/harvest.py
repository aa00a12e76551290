"""Listing a IIIF source (a manifest or a collection, by URL or local file) into the canvases to fetch: collections
followed to their manifests (breadth first, up to `max_manifests`), each image service's `info.json` read to pick
the size to fetch, manifests and info.json documents fetched `concurrency` at a time. Every canvas that cannot be
listed becomes a `Problem` naming it; the images themselves are fetched later (engine.sources' "iiif" refs)."""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..ids import check_id
from ..records import Problem
from .documents import Collection, Manifest, display, read_document
from .fetch import FetchFailed, FetchPolicy, fetch_json, fetch_many, is_url, parse_json
from .images import ImageService, choose_size, parse_info

log = logging.getLogger("engine.iiif")
DEFAULT_MIN_SIDE = 224  # the input resolution of every cn_clip model


@dataclass(frozen=True)
class IiifSource:
    """What to list: `location` (an http(s) URL or a local JSON file of a manifest or a collection), the shorter side
    the images are fetched at, at most `max_manifests` manifests of a collection, and how requests are made."""

    location: str
    min_side: int = DEFAULT_MIN_SIDE
    max_manifests: int = 1000
    fetch: FetchPolicy = field(default_factory=FetchPolicy)

    def __post_init__(self) -> None:
        if self.min_side < 1 or self.max_manifests < 1:
            raise InputError(f"IIIF min_side and max_manifests must be >= 1, got {self.min_side}, "
                             f"{self.max_manifests}")


@dataclass(frozen=True)
class ListedCanvas:
    """One canvas ready to fetch: its id (the index id), the image URL at the chosen size, its payload."""

    id: str
    url: str
    payload: dict[str, Any]


@dataclass
class Listing:
    canvases: list[ListedCanvas]
    problems: list[Problem]
    manifests: int = 0
    truncated: bool = False  # the collection held more than max_manifests manifests


def looks_like_iiif(location: str) -> bool:
    """An http(s) URL, or a local `.json` file: what `--images` auto-detection hands to this module."""
    return is_url(location) or location.lower().endswith(".json")


def list_iiif(source: IiifSource) -> Listing:
    """The canvases of a manifest or of every manifest under a collection; InputError when the source itself
    cannot be read or is not IIIF (the per-manifest and per-canvas failures are Problems)."""
    try:
        root = read_document(_load_root(source), source.location)
    except InputError as exc:
        raise InputError(f"IIIF source: {exc}") from None
    manifests, problems, truncated = _manifests(root, source)
    listing = Listing([], problems, len(manifests), truncated)
    services = sorted({c.service for m in manifests for c in m.canvases if c.service is not None})
    infos = dict(zip(services, fetch_many(services, lambda s: _info(s, source.fetch), source.fetch.concurrency)))
    for manifest in manifests:
        listing.problems.extend(Problem(where, None, "missing_image", f"{manifest.id}: {what}")
                                for where, what in manifest.problems)
        for position, canvas in enumerate(manifest.canvases):
            try:
                check_id(canvas.id)
                listing.canvases.append(_listed(manifest, position, infos.get(canvas.service), source))
            except InputError as exc:  # an unreachable (FetchFailed) or broken info.json, a bad id
                kind = "unreachable" if isinstance(exc, FetchFailed) else "malformed"
                listing.problems.append(Problem(canvas.id, None, kind, f"canvas of {manifest.id}: {exc}"))
    if truncated:
        log.warning("%s: more than %d manifests; listed the first %d", source.location, source.max_manifests,
                    source.max_manifests)
    return listing


def _load_root(source: IiifSource) -> dict[str, Any]:
    if is_url(source.location):
        return fetch_json(source.location, source.fetch)
    path = Path(source.location)
    if not path.is_file():
        raise InputError(f"IIIF source not found: {source.location} (give an http(s) URL or a local JSON file)")
    if path.stat().st_size > source.fetch.max_json_bytes:
        raise InputError(f"{path}: more than {source.fetch.max_json_bytes} bytes")
    return parse_json(path.read_bytes(), str(path))


def _manifests(root: Manifest | Collection, source: IiifSource) -> tuple[list[Manifest], list[Problem], bool]:
    """Every manifest under `root`, breadth first, fetched `concurrency` at a time, up to `max_manifests`."""
    if isinstance(root, Manifest):
        return [root], [], False
    manifests: list[Manifest] = []
    problems: list[Problem] = []
    queue = deque([root])
    seen = {root.id}
    truncated = False
    while queue:
        collection = queue.popleft()
        members = [m for m in collection.members if m.id not in seen]
        seen.update(m.id for m in members)
        room = source.max_manifests - len(manifests)
        wanted = [m for m in members if m.type == "Manifest"][:room]
        wanted += [m for m in members if m.type == "Collection"][:max(0, room - len(wanted))]
        truncated = truncated or len(wanted) < len(members)
        documents = fetch_many(wanted, lambda m: m.embedded or fetch_json(m.id, source.fetch),
                               source.fetch.concurrency)
        for member, document in zip(wanted, documents):
            try:
                if isinstance(document, InputError):
                    raise document
                read = read_document(document, member.id)
            except InputError as exc:
                kind = "unreachable" if isinstance(exc, FetchFailed) else "malformed"
                problems.append(Problem(member.id, None, kind, f"{member.type.lower()} in {collection.id}: {exc}"))
                continue
            if isinstance(read, Collection):
                queue.append(read)
            else:
                manifests.append(read)
    return manifests, problems, truncated


def _info(service: str, policy: FetchPolicy) -> ImageService:
    url = f"{service}/info.json"
    return parse_info(fetch_json(url, policy), url)


def _listed(manifest: Manifest, position: int, info: ImageService | InputError | None,
            source: IiifSource) -> ListedCanvas:
    """The fetch URL and payload of the manifest's canvas at `position`; an info.json failure is raised for the
    caller to report."""
    canvas = manifest.canvases[position]
    if isinstance(info, InputError):
        raise info
    if info is not None:
        size = choose_size(info, source.min_side)
        url, full = info.url(size.param), [info.width, info.height]
        fetched: list[int] | None = [size.width, size.height]
    elif canvas.image is not None:  # no image service: the file itself, the only size offered
        url, full, fetched = canvas.image, list(canvas.image_size) if canvas.image_size else None, None
    else:
        raise InputError("the canvas's image has neither a service nor an id")
    label = display(canvas.label, default=canvas.id)
    payload = {
        "source": f"{display(manifest.label, default=manifest.id)} / {label}",
        "manifest": manifest.id, "manifest_label": manifest.label, "canvas": canvas.id, "label": canvas.label,
        "title": label, "metadata": manifest.metadata,
        "canvas_index": position,
        "image_service": None if info is None else info.id,
        "image_api": None if info is None else info.version,
        "image_level": None if info is None else info.level,
        "image_url": url, "full_size": full, "fetched_size": fetched,
        "canvas_size": [canvas.width, canvas.height] if canvas.width and canvas.height else full,
    }
    return ListedCanvas(canvas.id, url, payload)
