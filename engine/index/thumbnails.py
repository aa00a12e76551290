"""Thumbnails stored with image rows: a ~256 px JPEG made once, at add time, from the decoded image."""
from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_SIZE = 256
JPEG_QUALITY = 85


def make_thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    """JPEG bytes of `image` scaled to fit size x size (aspect kept, never enlarged), in RGB. Grey images are
    scaled before they become RGB, so a huge 1-bit or grey scan costs one grey copy, not an RGB one."""
    base = image.convert("L") if image.mode == "1" else image
    if base.mode not in ("L", "RGB"):
        base = base.convert("RGB")
    scale = size / max(base.size)
    if scale < 1:
        target = (max(1, round(base.width * scale)), max(1, round(base.height * scale)))
        base = base.resize(target, Image.BICUBIC, reducing_gap=2.0)
    thumb = base.convert("RGB")
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()
