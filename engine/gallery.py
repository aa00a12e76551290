"""A user's gallery on disk: image folders (the one folder-id rule) and JSON-lines text files (the one reader).

The folder-id rule, for `python -m engine.serve --gallery`, `python -m engine index --images FOLDER` and Ray jobs:
every image file under the folder at any depth (hidden files and folders skipped) has the id of its path relative
to the folder without the suffix, so `cats/001.jpg` is "cats/001" and a file directly inside is its stem. A single
file named without a folder (an HTTP upload, a path given to `Retriever.add_images`) is the same rule's flat case:
its stem. Folders are listed in natural order (numeric parts by value).

The JSON-lines text reader serves `--texts`, `python -m engine index --texts` and the HTTP JSON-lines upload: one
`{"text_id": ..., "text": "..."}` object per line ("id" is accepted for "text_id"; without either, the text's
position in the file), blank lines skipped; errors name the file and line. Every other key of a line (cn_clip's
`image_ids` pairing a caption to its images, say) is kept as the text's payload.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import InputError
from .ids import Id

_RECORD_KEYS = ("text_id", "id", "text")  # what a line's payload leaves out
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _natural(part: str) -> tuple:
    return (0, int(part), part) if part.isdigit() else (1, 0, part)


def folder_images(folder: str | Path) -> list[tuple[str, Path]]:
    """(id, path) of every image under `folder` by the folder-id rule, in natural order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(Path(root, f) for f in files
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    keyed = sorted(found, key=lambda p: [_natural(x) for x in p.relative_to(folder).with_suffix("").parts]
                   + [(1, 0, p.suffix)])
    return [(path.relative_to(folder).with_suffix("").as_posix(), path) for path in keyed]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder` (a dataset's flat `images/` folder), numeric names in numeric order,
    then the rest by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name))


@dataclass(frozen=True)
class TextRecords:
    """The texts of a JSON-lines file: ids, texts, and each line's other keys as its payload (None: no other key)."""

    ids: list[Id]
    texts: list[str]
    payloads: list[dict[str, Any] | None]

    def where(self, keep: Callable[[Id], bool]) -> "TextRecords":
        """The records whose id passes `keep`, in order."""
        rows = [i for i, text_id in enumerate(self.ids) if keep(text_id)]
        return TextRecords([self.ids[i] for i in rows], [self.texts[i] for i in rows], [self.payloads[i] for i in rows])


def read_texts_jsonl(path: str | Path) -> TextRecords:
    """The records of a JSON-lines texts file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"texts file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return parse_texts_jsonl(f, str(path))


def parse_texts_jsonl(lines: Iterable[str], where: str,
                      parse: Callable[[str, str], Any] | None = None) -> TextRecords:
    """The records of JSON lines; `parse(line, at)` decodes one line (default: json.loads), naming `at`
    ("<where> line <n>") in its error."""
    ids: list[Id] = []
    texts: list[str] = []
    payloads: list[dict[str, Any] | None] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        at = f"{where} line {number}"
        record = (parse or _json_line)(line, at)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{at}: expected an object with a string 'text'")
        ids.append(record.get("text_id", record.get("id", len(ids))))
        texts.append(record["text"])
        payloads.append({k: v for k, v in record.items() if k not in _RECORD_KEYS} or None)
    return TextRecords(ids, texts, payloads)


def _json_line(line: str, at: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{at}: malformed JSON ({exc.msg})") from None
