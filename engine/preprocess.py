"""Image decoding, cn_clip-exact image transform, LACLIP crop pixels, cn_clip's text normalisation + tokenizer."""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode, Resize

from .errors import ImageDecodeError, InputError

ImageInput = Union[str, Path, bytes, bytearray, memoryview, Image.Image]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 64_000_000  # more than this is treated as a decompression bomb
DEFAULT_CONTEXT_LENGTH = 52
_SEED_STRIP_BYTES = 4 << 20


def describe(source: ImageInput) -> str:
    """A short name for an image input, used in error messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} {source.size[0]}x{source.size[1]}>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes or PIL image fully; any failure is an ImageDecodeError naming the input."""
    name = describe(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, Path, bytes, bytearray, memoryview)):
        image = _open(source, name, max_pixels)
    else:
        raise ImageDecodeError(f"{name}: expected a path, bytes or a PIL image")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"{name}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for damaged data
        raise ImageDecodeError(f"{name}: cannot decode image ({exc.__class__.__name__}: {exc})") from exc
    return image


def _open(source: str | Path | bytes | bytearray | memoryview, name: str, max_pixels: int) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError(f"{name}: empty image data")
        stream: io.IOBase | Path = io.BytesIO(bytes(source))
    else:
        stream = Path(source)
        if not stream.is_file():
            raise ImageDecodeError(f"{name}: no such file")
        if stream.stat().st_size == 0:
            raise ImageDecodeError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(stream)
    except UnidentifiedImageError as exc:  # its message holds the stream's repr, which names nothing useful
        raise ImageDecodeError(f"{name}: not a readable image (unknown or damaged format)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's text quotes its own
        raise ImageDecodeError(f"{name}: more pixels than the limit of {max_pixels} "  # threshold, not ours
                               "(possible decompression bomb)") from exc
    except Exception as exc:
        raise ImageDecodeError(f"{name}: cannot open image ({exc.__class__.__name__}: {exc})") from exc


def content_seed(image: Image.Image) -> int:
    """A 63-bit seed from the decoded pixels, mode and size: the same image always gets the same crops."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    rows = max(1, _SEED_STRIP_BYTES // max(1, len(image.mode) * image.width))  # strips: no full copy of a huge image
    for top in range(0, image.height, rows):
        digest.update(image.crop((0, top, image.width, min(image.height, top + rows))).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def _to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


class ImageTransform:
    """cn_clip's `image_transform`: bicubic resize to a square (aspect not kept), then RGB, then CLIP mean/std.

    Split in two exact steps, `resized` (uint8, a quarter of the bytes: what a distributed job ships between its
    prepare and encode stages) and `normalise`, whose composition equals torchvision's ToTensor + Normalize
    bit for bit (the same float32 operations in the same order)."""

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution
        self._resize = Resize((resolution, resolution), interpolation=InterpolationMode.BICUBIC)
        self._mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)

    def resized(self, image: Image.Image) -> torch.Tensor:
        """[3, R, R] uint8: the resized RGB image, before normalisation."""
        rgb = _to_rgb(self._resize(image))
        return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[..., 3, R, R] uint8 levels (uint8, or floats holding them) -> float32 CLIP-normalised pixels, on the
        pixels' device."""
        mean, std = self._mean.to(pixels.device), self._std.to(pixels.device)
        return pixels.to(torch.float32).div(255).sub_(mean).div_(std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """[3, R, R] float32 pixels for a decoded image."""
        return self.normalise(self.resized(image))

    def resized_crops(self, image: Image.Image, boxes: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
        """[K, 3, R, R] uint8: each (left, top, right, bottom) crop resized exactly as the whole image is."""
        return torch.stack([self.resized(image.crop(box)) for box in boxes])

    def crops(self, image: Image.Image, boxes: Sequence[tuple[int, int, int, int]]) -> torch.Tensor:
        """[K, 3, R, R]: each crop put through exactly the global transform."""
        return self.normalise(self.resized_crops(image, boxes))


TEXT_PIPELINE = "cn_clip-eval-text-v1"  # version of normalize_text + the wordpiece tokenisation; indexes record it


def normalize_text(text: str) -> str:
    """cn_clip's `_preprocess_text` (training, evaluation and zero-shot data code): lower-case, then map the
    curly double quotes \u201c \u201d to ASCII '"'. Curly single quotes stay (cn_clip leaves them, as [UNK])."""
    return text.lower().replace("\u201c", '"').replace("\u201d", '"')


def wordpieces(text: str) -> list[int]:
    """Vocabulary ids of `normalize_text(text)`'s wordpieces, before [CLS]/[SEP] and truncation."""
    from cn_clip.clip import _tokenizer

    return _tokenizer.convert_tokens_to_ids(_tokenizer.tokenize(normalize_text(text)))


@dataclass(frozen=True)
class TokenizedTexts:
    """Token ids [n, context_length] (cn_clip layout, 0-padded) and which texts were truncated."""

    ids: torch.Tensor
    truncated: list[bool]


class Tokenizer:
    """cn_clip's evaluation text pipeline: `normalize_text`, BERT wordpieces, [CLS] pieces[:L-2] [SEP],
    zero-padded to the context length L (cn_clip's `tokenize([_preprocess_text(text)], L)`)."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        if context_length < 3:
            raise InputError(f"context_length must be at least 3, got {context_length}")
        from cn_clip.clip import _tokenizer

        self.context_length = context_length
        self.cls_id = _tokenizer.vocab["[CLS]"]
        self.sep_id = _tokenizer.vocab["[SEP]"]
        self.pad_id = _tokenizer.vocab["[PAD]"]

    def __call__(self, texts: Sequence[str]) -> TokenizedTexts:
        """Tokenize a batch; a non-string text, or one with no wordpieces, is an InputError naming its position."""
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        truncated = []
        for row, text in enumerate(texts):
            pieces = self._pieces(text, row)
            keep = pieces[: self.context_length - 2]
            truncated.append(len(keep) < len(pieces))
            tokens = [self.cls_id, *keep, self.sep_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return TokenizedTexts(ids, truncated)

    def _pieces(self, text: object, row: int) -> list[int]:
        if not isinstance(text, str):
            raise InputError(f"text #{row} is a {type(text).__name__}, expected str")
        pieces = wordpieces(text)
        if not pieces:
            raise InputError(f"text #{row} is empty (or only whitespace/control characters): {text!r}")
        return pieces
