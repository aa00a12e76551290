"""A generated retrieval dataset with a learnable text-image signal: coloured shapes and Chinese captions.

Each image is one shape of one colour on a light background at a random place and size; its captions name
the colour and the shape ("红色的圆形", "一个红色圆形", ...). Used by the tests and the benchmark, and handy for
trying `python -m engine.finetune` offline
(`python -m engine.finetune.synthetic DIR`).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"红色": (220, 30, 30), "绿色": (30, 170, 60), "蓝色": (40, 70, 220), "黄色": (235, 200, 20),
           "紫色": (140, 50, 180), "黑色": (20, 20, 20)}
SHAPES = ("圆形", "方形", "三角形", "十字形")
TEMPLATES = ("{c}的{s}", "一个{c}{s}", "画着{c}{s}的图片", "{s}，{c}")


def _draw(colour: tuple[int, int, int], shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    extent = rng.uniform(0.45, 0.8) * size
    x0, y0 = rng.uniform(0, size - extent, 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    if shape == "圆形":
        draw.ellipse(box, fill=colour)
    elif shape == "方形":
        draw.rectangle(box, fill=colour)
    elif shape == "三角形":
        draw.polygon([(x0 + extent / 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    else:
        bar = extent / 3
        draw.rectangle((x0 + bar, y0, x0 + 2 * bar, y0 + extent), fill=colour)
        draw.rectangle((x0, y0 + bar, x0 + extent, y0 + 2 * bar), fill=colour)
    return image


def make_shapes_dataset(root: str | Path, splits: dict[str, int], *, image_size: int = 64, seed: int = 0,
                        templates: int = len(TEMPLATES)) -> Path:
    """Write `root/{split}_imgs.tsv` (PNG, base64) and `root/{split}_texts.jsonl` for each split (cn_clip layout).

    `splits` maps a split name to images per (colour, shape) class. Each split has one text per (class,
    template) naming every image of that class in the split: a text matches several images and an image
    several texts.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    for split, per_class in splits.items():
        rows, tsv = [], []
        for k, (colour, shape) in enumerate(classes):
            ids = []
            for j in range(per_class):
                image_id = f"{split}-{k}-{j}"
                png = io.BytesIO()
                _draw(COLOURS[colour], shape, image_size, rng).save(png, format="PNG")
                tsv.append(f"{image_id}\t{base64.b64encode(png.getvalue()).decode()}\n")
                ids.append(image_id)
            for t, template in enumerate(TEMPLATES[:templates]):
                rows.append({"text_id": f"{split}-{k}-t{t}", "text": template.format(c=colour, s=shape),
                             "image_ids": ids})
        (root / f"{split}_imgs.tsv").write_text("".join(tsv), encoding="utf-8")
        with open(root / f"{split}_texts.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return root


def chance_recall_at_1(classes: int = len(COLOURS) * len(SHAPES)) -> float:
    """R@1 (percent) of a random ranking when each query's class is one of `classes` equally sized classes."""
    return 100.0 / classes if classes else math.nan


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m engine.finetune.synthetic [DIR]`: write a small train/valid shapes dataset to try fine-tuning."""
    parser = argparse.ArgumentParser(prog="python -m engine.finetune.synthetic", description=main.__doc__)
    parser.add_argument("out", nargs="?", default="shapes-data", help="folder to write (default: shapes-data)")
    args = parser.parse_args(argv)
    target = make_shapes_dataset(args.out, {"train": 24, "valid": 4})
    print(f"wrote train and valid splits (24 colour-shape classes) to {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
