"""cn_clip's top-k prediction files, so cn_clip's own `evaluation.py` / `evaluation_tr.py` can score our rankings.

Text->image, as `make_topk_predictions.py` writes it: one line per text, `{"text_id": id, "image_ids": [top k]}`.
Image->text, as `make_topk_predictions_tr.py` writes it: one line per image, `{"image_id": id, "text_ids": [top k]}`,
in `<OUT minus .jsonl>.tr.jsonl`. Rankings follow engine.eval's tie rule (descending score, ties to the lower
gallery index, as `metrics.best_ranks` counts them), so cn_clip's scorer reproduces engine.eval's recalls.
An id that is a decimal integer is written as a JSON number (cn_clip's scorer accepts only integers); any other
id is written as a string.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..index import topk_rows
from ..recall import KS

TOP_K = max(KS)  # cn_clip's scorer reads exactly 10 predictions per query


@dataclass(frozen=True)
class Rankings:
    """Each text's top images and each image's top texts, as indices into `image_ids` / `text_ids`, best first."""

    text_ids: list[str]
    image_ids: list[str]
    text_to_image: np.ndarray  # [T, min(TOP_K, I)]
    image_to_text: np.ndarray  # [I, min(TOP_K, T)]


def rank(scores: np.ndarray, text_ids: Sequence[str], image_ids: Sequence[str], k: int = TOP_K) -> Rankings:
    """Top-k both ways from one [T, I] text-image score matrix; every image is a query, as in cn_clip."""
    t2i = topk_rows(scores, min(k, scores.shape[1]))[1]
    i2t = topk_rows(np.ascontiguousarray(scores.T), min(k, scores.shape[0]))[1]
    return Rankings(list(text_ids), list(image_ids), t2i, i2t)


def image_to_text_path(path: str | Path) -> Path:
    """Where the image->text file goes: `preds.jsonl` -> `preds.tr.jsonl` (cn_clip's `.tr.jsonl` naming)."""
    path = Path(path)
    stem = path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name
    return path.with_name(f"{stem}.tr.jsonl")


def write_predictions(rankings: Rankings, path: str | Path) -> tuple[Path, Path]:
    """Write the text->image file at `path` and the image->text file beside it; returns both paths."""
    t2i_path, i2t_path = Path(path), image_to_text_path(path)
    t2i_path.parent.mkdir(parents=True, exist_ok=True)
    _write_lines(t2i_path, "text_id", rankings.text_ids, "image_ids", rankings.image_ids, rankings.text_to_image)
    _write_lines(i2t_path, "image_id", rankings.image_ids, "text_ids", rankings.text_ids, rankings.image_to_text)
    return t2i_path, i2t_path


def _write_lines(path: Path, query_key: str, queries: list[str], hits_key: str, gallery: list[str],
                 top: np.ndarray) -> None:
    with open(path, "w", encoding="utf-8") as out:
        for query, row in zip(queries, top):
            line = {query_key: json_id(query), hits_key: [json_id(gallery[i]) for i in row]}
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def unscorable_by_cn_clip(rankings: Rankings) -> str | None:
    """Why cn_clip's scorer would refuse these rankings (it needs integer ids and 10 hits per query), or None."""
    if min(len(rankings.text_ids), len(rankings.image_ids)) < TOP_K:
        return (f"it needs {TOP_K} predictions per query, and there are {len(rankings.image_ids)} images and "
                f"{len(rankings.text_ids)} texts")
    for kind, ids in (("text", rankings.text_ids), ("image", rankings.image_ids)):
        odd = next((i for i in ids if not isinstance(json_id(i), int)), None)
        if odd is not None:
            return f"it needs integer ids, and {kind} id {odd!r} is not one"
    return None


def json_id(value: str) -> int | str:
    """The id as cn_clip's files hold it: an int when `value` is an integer's canonical spelling, else the string."""
    try:
        number = int(value)
    except ValueError:
        return value
    return number if str(number) == value else value
