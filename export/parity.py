"""Per-vector cosine between an exported backend and the fp32 PyTorch towers: the export's pass/fail gate."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from engine.backends import Encoder
from engine.errors import EngineError, InputError
from engine.gallery import read_texts_jsonl
from engine.preprocess import ImageTransform, Tokenizer, load_image

THRESHOLDS = {"fp32": 0.99999, "fp16": 0.999, "bf16": 0.999, "int8": 0.99, "int8-static": 0.99}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ParityError(EngineError):
    """An export's outputs are further from PyTorch fp32 than its precision's threshold allows."""


@dataclass(frozen=True)
class CosineStats:
    """Minimum and mean per-vector cosine over `count` inputs."""

    min: float
    mean: float
    count: int


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b`, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-300)


def generated_pixels(resolution: int, count: int = 8, seed: int = 0) -> torch.Tensor:
    """Preprocessed synthetic images (smooth colour fields plus noise) of assorted sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    transform = ImageTransform(resolution)
    views = []
    for i in range(count):
        h, w = int(rng.integers(64, 400)), int(rng.integers(64, 400))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        field = np.stack([np.sin(xx / rng.uniform(4, 30) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(4, 30))
                          for _ in range(3)], -1)
        rgb = ((field * 0.5 + 0.5) * 200 + rng.integers(0, 55, (h, w, 3))).clip(0, 255).astype(np.uint8)
        views.append(transform(Image.fromarray(rgb, "RGB")))
    return torch.stack(views)


def generated_token_ids(context_length: int, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Tokenised random Chinese strings from 1 character to past the context (so some are truncated)."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(1, context_length + 8, count).astype(int)
    texts = ["".join(chr(int(c)) for c in rng.integers(0x4E00, 0x9FA5, n)) for n in lengths]
    return Tokenizer(context_length)(texts).ids


def user_pixels(images_dir: str | Path, resolution: int, limit: int = 64) -> torch.Tensor:
    """Preprocessed images from `images_dir` (first `limit` by name); InputError if it holds none."""
    folder = Path(images_dir)
    if not folder.is_dir():
        raise InputError(f"--images {folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise InputError(f"--images {folder} holds no images ({sorted(IMAGE_SUFFIXES)})")
    transform = ImageTransform(resolution)
    return torch.stack([transform(load_image(p)) for p in files])


def user_token_ids(texts_file: str | Path, context_length: int, limit: int = 256) -> torch.Tensor:
    """Tokenised texts of the JSON-lines file `texts_file` ({"text": ...} per line, as every other command reads
    texts; the first `limit`); InputError naming the line when one is not such an object, or when there are none."""
    path = Path(texts_file)
    if not path.is_file():
        raise InputError(f"--texts {path} is not a file")
    try:
        texts = read_texts_jsonl(path).texts
    except InputError as exc:
        raise InputError(f"--texts takes JSON lines {{\"text\": ...}} (as python -m engine index): {exc}") from None
    if not texts:
        raise InputError(f"--texts {path} holds no texts (JSON lines {{\"text\": ...}})")
    return Tokenizer(context_length)(texts[:limit]).ids


@dataclass
class ParityInputs:
    """Named input sets per tower, e.g. {"generated": pixels, "user": pixels}."""

    pixels: dict[str, torch.Tensor]
    token_ids: dict[str, torch.Tensor]


def _batched(fn, x: torch.Tensor, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + batch_size]), np.float32) for i in range(0, len(x), batch_size)])


@dataclass(frozen=True)
class Reference:
    """cn_clip's fp32 `encode_image` / `encode_text` (padded ids) outputs for each input set, computed once."""

    vision: dict[str, np.ndarray]
    text: dict[str, np.ndarray]


@torch.inference_mode()
def reference(clip: torch.nn.Module, inputs: ParityInputs, batch_size: int = 8) -> Reference:
    """The fp32 PyTorch embeddings every precision is compared with."""
    clip = clip.float().eval()
    return Reference({name: _batched(clip.encode_image, x, batch_size) for name, x in inputs.pixels.items()},
                     {name: _batched(clip.encode_text, x, batch_size) for name, x in inputs.token_ids.items()})


@torch.inference_mode()
def measure(ref: Reference, encoder: Encoder, inputs: ParityInputs, batch_size: int = 8) -> dict[str, Any]:
    """Per-vector cosine stats of `encoder` vs the fp32 reference, per tower and input set."""
    report: dict[str, Any] = {"vision": {}, "text": {}}
    for tower, sets, encode in (("vision", inputs.pixels, encoder.encode_images),
                                ("text", inputs.token_ids, encoder.encode_texts)):
        for name, x in sets.items():
            cos = row_cosines(_batched(encode, x, batch_size), getattr(ref, tower)[name])
            report[tower][name] = asdict(CosineStats(float(cos.min()), float(cos.mean()), len(cos)))
    return report


def lowest(report: Mapping[str, Any]) -> float:
    """The lowest minimum cosine over both towers and every input set."""
    return min(s["min"] for tower in ("vision", "text") for s in report[tower].values())


def check(report: Mapping[str, Any], threshold: float) -> None:
    """Raise ParityError with every figure when any set's minimum cosine is below `threshold`."""
    rows = [(f"{tower}/{name}: min {s['min']:.8f} mean {s['mean']:.8f} (n={s['count']})", s["min"])
            for tower in ("vision", "text") for name, s in report[tower].items()]
    figures = [text for text, _ in rows]
    failed = [text for text, low in rows if low < threshold]
    if failed:
        raise ParityError(f"export fails parity: minimum cosine vs fp32 PyTorch must be >= {threshold}; "
                          f"failing: {'; '.join(failed)}. All figures: {'; '.join(figures)}")
