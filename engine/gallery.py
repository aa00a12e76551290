"""Reading a user's gallery from disk: image folders and JSON-lines text files."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .index import Id

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _natural_key(path: Path) -> tuple:
    stem = path.stem
    return (0, int(stem), path.name) if stem.isdigit() else (1, 0, path.name)


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, numeric names in numeric order, then the rest by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=_natural_key)


def read_texts_jsonl(path: str | Path) -> tuple[list[Id], list[str]]:
    """(ids, texts) from lines like {"text_id": 1, "text": "..."} (or "id"); errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"texts file not found: {path}")
    ids: list[Id] = []
    texts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{number}: expected an object with a string 'text'")
            ids.append(record.get("text_id", record.get("id", len(ids))))
            texts.append(record["text"])
    return ids, texts
