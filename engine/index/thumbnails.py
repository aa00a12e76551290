"""Thumbnails stored with image rows: a ~256 px JPEG made once, at add time, from the decoded image."""
from __future__ import annotations

import io

from PIL import Image

THUMBNAIL_SIZE = 256
JPEG_QUALITY = 85


def make_thumbnail(image: Image.Image, size: int = THUMBNAIL_SIZE) -> bytes:
    """JPEG bytes of `image` scaled to fit size x size (aspect kept, never enlarged), in RGB."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return buf.getvalue()
