"""Shared fixtures: a tiny random-weight cn_clip checkpoint and generated images/texts (tests never read ../shared)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.models import build_random_model, get_spec, save_checkpoint

CHECKPOINT_SEED = 1234
SAMPLE_TEXTS = ["一只橘猫在窗台上晒太阳", "敦煌壁画中的飞天", "蓝色丝绸上的牡丹花纹", "山水之间的古寺",
                "床前明月光，疑是地上霜", "红色的灯笼挂在门口", "青花瓷盘上的鱼", "雪中的长城"]


def make_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A structured random image (smooth blobs plus noise) in any PIL mode."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(xx / (5 + 20 * rng.random()) + rng.random() * 6)
                     * np.cos(yy / (5 + 20 * rng.random())) for _ in range(3)], -1)
    rgb = ((base * 0.5 + 0.5) * 200 + rng.integers(0, 55, (height, width, 3))).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
        image = image.copy()
        image.putalpha(alpha)
        return image
    if mode == "LA":
        la = image.convert("L")
        la.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
        return la.convert("LA") if la.mode != "LA" else la
    if mode == "I;16":
        wide = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        return Image.frombytes("I;16", (width, height), wide.astype("<u2").tobytes())
    return image.convert(mode)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model saved exactly as cn_clip's training writes checkpoints (`module.` prefix)."""
    model = build_random_model(get_spec("tiny"), seed=CHECKPOINT_SEED)
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 12 generated images of assorted sizes and formats, named 0.png .. 11.jpg."""
    folder = tmp_path_factory.mktemp("images")
    sizes = [(92, 96), (1887, 366), (300, 200), (64, 640), (224, 224), (500, 333)]
    for i in range(12):
        w, h = sizes[i % len(sizes)]
        fmt = "PNG" if i % 2 == 0 else "JPEG"
        make_image(w, h, seed=100 + i).save(folder / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", format=fmt)
    return folder
