"""The IIIF Image API (2 and 3) from the client's side: what an `info.json` offers, which size to fetch for the
model (level 0: one of the listed `sizes`; level 2: `!w,h`; level 1: `w,`), and region URLs and canvas fragments for
a box found in the fetched pixels, scaled to the full image and to the canvas."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import InputError
from ..laclip import LaclipConfig

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class ImageService:
    """An image service as its `info.json` describes it: base URL, API version (2 or 3), compliance level, full
    size, the sizes it offers and its limits."""

    id: str
    version: int
    level: int
    width: int
    height: int
    sizes: tuple[tuple[int, int], ...] = ()
    max_width: int | None = None
    max_height: int | None = None
    max_area: int | None = None
    features: frozenset[str] = frozenset()

    @property
    def full_size_param(self) -> str:
        return "max" if self.version == 3 else "full"

    def url(self, size: str, region: str = "full") -> str:
        return f"{self.id}/{region}/{size}/0/default.jpg"


@dataclass(frozen=True)
class SizeChoice:
    """The size parameter to request and the pixel size it gives."""

    param: str
    width: int
    height: int


def parse_info(info: dict[str, Any], where: str) -> ImageService:
    """An ImageService from an info.json; InputError naming `where` when it is not one."""
    context = str(info.get("@context", ""))
    version = 3 if ("image/3" in context or info.get("type") == "ImageService3") else 2
    service_id = info.get("id") if version == 3 else info.get("@id")
    service_id = service_id or info.get("@id") or info.get("id")
    width, height = info.get("width"), info.get("height")
    if "image/" not in context and info.get("type") not in ("ImageService2", "ImageService3"):
        raise InputError(f"{where}: not a IIIF Image API info.json (no image @context)")
    if not isinstance(service_id, str) or not service_id:
        raise InputError(f"{where}: info.json has no id")
    if not _positive_int(width) or not _positive_int(height):
        raise InputError(f"{where}: info.json width/height must be positive integers, got {width!r} x {height!r}")
    level, features, limits = _profile(info.get("profile"))
    limits.update({k: info[k] for k in ("maxWidth", "maxHeight", "maxArea") if _positive_int(info.get(k))})
    if version == 3 and "maxWidth" in limits:
        limits.setdefault("maxHeight", limits["maxWidth"])  # Image API 3: maxHeight defaults to maxWidth
    features |= {str(f) for f in info.get("extraFeatures", []) if isinstance(f, str)}
    sizes = tuple(sorted({(int(s["width"]), int(s["height"])) for s in info.get("sizes") or []
                          if isinstance(s, dict) and _positive_int(s.get("width")) and _positive_int(s.get("height"))}))
    return ImageService(service_id.rstrip("/"), version, level, int(width), int(height), sizes,
                        limits.get("maxWidth"), limits.get("maxHeight"), limits.get("maxArea"), frozenset(features))


def choose_size(service: ImageService, min_side: int) -> SizeChoice:
    """The smallest image whose shorter side is at least `min_side` (the model's input), never the full-resolution
    file when a smaller size is offered: level 0 picks from `sizes` (the largest listed when none is big enough,
    the full image only when none is listed); higher levels ask for exactly that size."""
    full = SizeChoice(service.full_size_param, service.width, service.height)
    listed = [s for s in service.sizes if s[0] < service.width or s[1] < service.height]
    if service.level == 0:
        if not listed:
            return full
        enough = [s for s in listed if min(s) >= min_side]
        w, h = min(enough, key=lambda s: s[0] * s[1]) if enough else max(listed, key=lambda s: s[0] * s[1])
        return SizeChoice(f"{w},{h}" if service.version == 3 else f"{w},", w, h)
    scale = min(1.0, min_side / min(service.width, service.height), *_limit_scales(service))
    if scale >= 1.0:
        return full
    w, h = (max(1, math.ceil(side * scale - 1e-9)) for side in (service.width, service.height))  # no float 224.0000001
    confined = service.level >= 2 or "sizeByConfinedWh" in service.features
    return SizeChoice(f"!{w},{h}" if confined else f"{w},", w, h)


def needed_side(input_resolution: int, laclip: LaclipConfig | None = None) -> int:
    """The shorter side to fetch: the model's input; with LACLIP crops, enough that the smallest crop still has it
    (a crop of area fraction a has sides about sqrt(a) of the image's)."""
    if laclip is None:
        return input_resolution
    smallest = 1 / laclip.num_crops if laclip.crop_mode == "grid" else laclip.crop_area[0]
    return math.ceil(input_resolution / math.sqrt(smallest))


def scale_box(box: Sequence[float], from_size: Sequence[int], to_size: Sequence[int]) -> tuple[int, int, int, int]:
    """A box (x0, y0, x1, y1) in an image of `from_size` as integer (x, y, w, h) in the same image at `to_size`,
    clamped to it (at least one pixel)."""
    fw, fh = from_size
    tw, th = to_size
    if fw <= 0 or fh <= 0 or tw <= 0 or th <= 0:
        raise InputError(f"sizes must be positive, got {tuple(from_size)} -> {tuple(to_size)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = tw / fw, th / fh
    left = min(max(0, math.floor(min(x0, x1) * sx)), tw - 1)
    top = min(max(0, math.floor(min(y0, y1) * sy)), th - 1)
    right = max(left + 1, min(tw, math.ceil(max(x0, x1) * sx)))
    bottom = max(top + 1, min(th, math.ceil(max(y0, y1) * sy)))
    return left, top, right - left, bottom - top


def region_url(service_id: str, version: int, xywh: Sequence[int]) -> str:
    """The Image API URL of a region of the full image, at its full resolution (`max` in 3, `full` in 2)."""
    size = "max" if version == 3 else "full"
    return f"{service_id}/{','.join(str(int(v)) for v in xywh)}/{size}/0/default.jpg"


def fragment(canvas_id: str, xywh: Sequence[int]) -> str:
    """A canvas region as a media fragment: `canvas#xywh=x,y,w,h`."""
    return f"{canvas_id}#xywh={','.join(str(int(v)) for v in xywh)}"


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _profile(profile: Any) -> tuple[int, set[str], dict[str, int]]:
    """(level, features, limits) from a v3 profile string or a v2 profile list [URI, {supports, maxWidth...}]."""
    entries = profile if isinstance(profile, list) else [profile]
    level, features, limits = 0, set(), {}
    for entry in entries:
        if isinstance(entry, str):
            digits = [c for c in entry.rsplit("level", 1)[-1] if c.isdigit()] if "level" in entry else []
            level = max(level, int(digits[0])) if digits else level
        elif isinstance(entry, dict):
            features |= {str(f) for f in entry.get("supports", []) if isinstance(f, str)}
            limits.update({k: entry[k] for k in ("maxWidth", "maxHeight", "maxArea") if _positive_int(entry.get(k))})
    return level, features, limits


def _limit_scales(service: ImageService) -> list[float]:
    """Scales that keep a request within the service's maxWidth / maxHeight / maxArea."""
    scales = []
    if service.max_width:
        scales.append(service.max_width / service.width)
    if service.max_height:
        scales.append(service.max_height / service.height)
    if service.max_area:
        scales.append(math.sqrt(service.max_area / (service.width * service.height)))
    return scales
