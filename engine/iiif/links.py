"""IIIF links of an image hit, computed at answer time from its payload (what engine.iiif.harvest stored) and,
when the hit carries crop evidence, its best crop: the whole image, the best region (scaled from the fetched
pixels to the full image), the canvas fragment, the manifest and a viewer URL from a user pattern."""
from __future__ import annotations

from typing import Any, Mapping
from urllib.parse import quote

from ..errors import InputError
from .images import fragment, region_url, scale_box

def check_viewer(pattern: str | None) -> str | None:
    """A viewer URL pattern holding `{manifest}` (and optionally `{canvas}`), e.g.
    `https://viewer.example/?manifest={manifest}&canvas={canvas}`; InputError otherwise."""
    if pattern is not None and (not pattern.startswith(("http://", "https://", "/")) or "{manifest}" not in pattern):
        raise InputError(f"the IIIF viewer pattern must be an http(s) URL (or a path) with {{manifest}}, "
                         f"got {pattern!r}")
    return pattern


def is_iiif_payload(payload: Mapping[str, Any] | None) -> bool:
    return bool(payload) and isinstance(payload.get("canvas"), str) and isinstance(payload.get("manifest"), str)


def best_box(evidence: Mapping[str, Any] | None) -> tuple[list[float], list[int]] | None:
    """(box, image size) of the best crop of a hit's evidence, or None without one."""
    if not evidence:
        return None
    crops, best, size = evidence.get("crops") or [], evidence.get("best"), evidence.get("image_size")
    if not isinstance(best, int) or not 0 <= best < len(crops) or not size or not crops[best].get("box"):
        return None  # no crops, or boxes of null (the image's size was not recorded)
    return list(crops[best]["box"]), list(size)


def hit_links(payload: Mapping[str, Any], evidence: Mapping[str, Any] | None = None,
              viewer: str | None = None) -> dict[str, Any]:
    """`{"image", "region", "canvas", "manifest", "viewer"}` for a IIIF hit: region is null without evidence (or
    without an image service), and the canvas fragment then covers the whole canvas."""
    service, version = payload.get("image_service"), int(payload.get("image_api") or 2)
    full = payload.get("full_size")
    canvas_size = payload.get("canvas_size") or full
    image = (f"{service}/full/{'max' if version == 3 else 'full'}/0/default.jpg" if service
             else payload.get("image_url"))
    found = best_box(evidence)
    region = None
    if found is not None:
        box, fetched = found
        if service and full:
            region = region_url(service, version, scale_box(box, fetched, full))
        xywh = scale_box(box, fetched, canvas_size) if canvas_size else None
    else:
        xywh = (0, 0, *canvas_size) if canvas_size else None
    canvas = payload["canvas"]
    return {"image": image, "region": region, "canvas": fragment(canvas, xywh) if xywh else canvas,
            "manifest": payload["manifest"], "viewer": viewer_url(viewer, payload["manifest"], canvas)}


def viewer_url(pattern: str | None, manifest: str, canvas: str) -> str | None:
    if pattern is None:
        return None
    return pattern.replace("{manifest}", quote(manifest, safe="")).replace("{canvas}", quote(canvas, safe=""))


def decorate_hit(hit: Any, viewer: str | None = None) -> Any:
    """The hit with `payload["iiif"]` set when it is a IIIF image (any other hit unchanged); its evidence, when
    present, is the hit's `evidence` attribute."""
    if not is_iiif_payload(hit.payload):
        return hit
    links = hit_links(hit.payload, getattr(hit, "evidence", None), viewer)
    return hit._replace(payload={**hit.payload, "iiif": links})
