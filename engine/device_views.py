"""Image views made on a CUDA device for indexing: batched nvJPEG decode, then the global view and the K LACLIP
crops cut, resized and normalised on the GPU; only the compressed bytes cross the bus.

The PIL path (Retriever.prepare_images with preprocess.ImageTransform) stays the reference and the CPU default.
This path differs from it in two documented ways:
- pixels: nvJPEG's IDCT and chroma upsampling and torch's antialiased bicubic resize are close to, not identical
  with, libjpeg + PIL; parity is measured per embedding (cosine against the PIL path's, benchmarks/bench_gpu.py);
- random crops are seeded by a hash of the file's bytes (`file_seed`) instead of the decoded pixels, so the crops
  never depend on which decoder ran (grid crops are the same on both paths).
Inputs that are not JPEG files, or that nvJPEG refuses, are decoded by PIL (the reference decoder, with its error
messages and pixel limit) and uploaded as uint8.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .index.thumbnails import JPEG_QUALITY, THUMBNAIL_SIZE, make_thumbnail
from .laclip import CropConfig, crop_boxes
from .preprocess import DEFAULT_MAX_PIXELS, ImageInput, ImageTransform, load_image

_JPEG_MAGIC = b"\xff\xd8\xff"


def file_seed(data: bytes) -> int:
    """A 63-bit crop seed from an image file's bytes (decoder-independent)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class DeviceViews:
    """Normalised views [n, 1 + K, 3, R, R] float32 on the device, and each image's thumbnail when asked for."""

    views: torch.Tensor
    thumbnails: list[bytes] | None


class DeviceViewMaker:
    """Turns image inputs into normalised views on `device` (see the module docstring for how it differs from
    the PIL path)."""

    def __init__(self, resolution: int, crops: CropConfig | None, device: str = "cuda",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.resolution = resolution
        self.crops = crops
        self.device = torch.device(device)
        self.max_pixels = max_pixels
        self._transform = ImageTransform(resolution)  # its normalisation, the reference path's

    @property
    def views_per_image(self) -> int:
        return 1 + (self.crops.num_crops if self.crops is not None else 0)

    def __call__(self, images: Sequence[ImageInput], *, thumbnails: bool = False) -> DeviceViews:
        decoded = self.decode(images)
        return DeviceViews(self.views(decoded), self.thumbnails([p for p, _ in decoded]) if thumbnails else None)

    def decode(self, images: Sequence[ImageInput]) -> list[tuple[torch.Tensor, int]]:
        """[3, H, W] uint8 RGB on the device and the crop seed of each input: JPEG files by nvJPEG in one batch,
        the rest (and any file nvJPEG refuses) by PIL."""
        from torchvision.io import ImageReadMode, decode_jpeg

        blobs = [self._bytes(image) for image in images]
        jpeg = [i for i, blob in enumerate(blobs) if blob is not None and self._decodable_jpeg(blob)]
        out: list[tuple[torch.Tensor, int] | None] = [None] * len(images)
        if jpeg:
            data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpeg]
            try:
                pixels = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the batch: decode one by one, the refused ones by PIL
                pixels = [self._decode_one(d) for d in data]
            for i, p in zip(jpeg, pixels):
                if p is not None:
                    out[i] = (p, file_seed(blobs[i]))
        for i, image in enumerate(images):
            if out[i] is None:
                decoded = load_image(image, self.max_pixels).convert("RGB")
                host = torch.from_numpy(np.asarray(decoded, dtype=np.uint8).copy()).permute(2, 0, 1)
                seed = file_seed(blobs[i]) if blobs[i] is not None else file_seed(decoded.tobytes())
                out[i] = (host.to(self.device, non_blocking=True), seed)
        return out  # type: ignore[return-value]

    def views(self, decoded: Sequence[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """[n, 1 + K, 3, R, R] normalised views of decoded images: each whole image, then its crops. Resized views
        are written in place; rounding to uint8 levels (as PIL's) and normalising run once for the batch."""
        r = self.resolution
        out = torch.empty((len(decoded), self.views_per_image, 3, r, r), device=self.device)
        for i, (pixels, seed) in enumerate(decoded):
            image = pixels.float()
            _, height, width = pixels.shape
            regions = [image]
            if self.crops is not None:
                regions += [image[:, top:bottom, left:right]
                            for left, top, right, bottom in crop_boxes(width, height, self.crops, seed)]
            for v, region in enumerate(regions):
                out[i, v] = self._resize(region)[0]
        return self._transform.normalise(out.round_().clamp_(0, 255))

    def thumbnails(self, images: Sequence[torch.Tensor]) -> list[bytes]:
        """The index's ~256 px JPEG thumbnails (aspect kept, never enlarged), downscaled on the device and encoded
        by nvJPEG in one batch where torchvision can, else by PIL."""
        small = []
        for pixels in images:
            _, height, width = pixels.shape
            scale = min(1.0, THUMBNAIL_SIZE / max(width, height))
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            small.append(pixels if scale == 1.0 else self._resize(pixels.float(), size)[0].round_().clamp_(0, 255)
                         .to(torch.uint8))
        if self.device.type == "cuda":
            from torchvision.io import encode_jpeg

            try:
                return [bytes(blob.cpu().numpy()) for blob in encode_jpeg(small, quality=JPEG_QUALITY)]
            except (RuntimeError, TypeError):  # an older torchvision without batched GPU encoding
                pass
        return [make_thumbnail(Image.fromarray(t.permute(1, 2, 0).cpu().numpy())) for t in small]

    def _resize(self, region: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[1, 3, h, w] float32 bicubic resize of a float [3, H, W] region with antialiasing (PIL's filter)."""
        return torch.nn.functional.interpolate(region[None], size=size or (self.resolution, self.resolution),
                                               mode="bicubic", antialias=True, align_corners=False)

    def _decode_one(self, data: torch.Tensor) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return None

    def _decodable_jpeg(self, blob: bytes) -> bool:
        """A JPEG whose header PIL reads (no pixels decoded) as RGB or grey within the pixel limit; the rest go to
        the PIL path, which names the problem."""
        if not blob.startswith(_JPEG_MAGIC):
            return False
        try:
            with Image.open(io.BytesIO(blob)) as header:
                width, height, mode = header.width, header.height, header.mode
        except Exception:  # damaged: let the PIL path raise its ImageDecodeError
            return False
        return mode in ("RGB", "L") and 0 < width * height <= self.max_pixels

    @staticmethod
    def _bytes(image: ImageInput) -> bytes | None:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return bytes(image)
        if isinstance(image, (str, Path)) and Path(image).is_file():
            return Path(image).read_bytes()
        return None  # PIL images, and paths that are no file (load_image names the problem)
