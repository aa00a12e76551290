"""Retrieval datasets on disk: cn_clip's `{split}_imgs.tsv` layout and the CulTi image-folder layout.

Both share `{split}_texts.jsonl` (`{"text_id": ..., "text": "...", "image_ids": [...]}` per line). Ids are
compared as strings (`1` in the jsonl matches `images/1.png` and a TSV row `1<TAB>...`). Every bad record
becomes a `Problem` naming file and line; nothing bad is dropped without being reported.
Shared by evaluation (engine.eval) and fine-tuning (engine.finetune); the records themselves are engine.records.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from .errors import ImageDecodeError, InputError
from .gallery import list_images
from .preprocess import DEFAULT_MAX_PIXELS, wordpieces
from .records import DatasetError, ImageRecord, Problem, TextRecord, read_tsv, undecodable

Layout = Literal["auto", "tsv", "folder"]

__all__ = ["Dataset", "DatasetError", "ImageRecord", "Layout", "Problem", "TextRecord", "check_images",
           "fingerprint", "read_dataset", "undecodable"]


@dataclass
class Dataset:
    """Texts and images of one split, the problems found while reading, and fingerprints of the files.

    `texts` holds every well-formed, first-seen text, including those whose images are missing (reported in
    `problems`); `evaluable_texts` picks the ones that can be scored.
    """

    layout: str
    texts_file: Path
    texts: list[TextRecord]
    images: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    texts_fingerprint: str = ""
    images_fingerprint: str = ""

    def evaluable_texts(self, usable_ids: set[str]) -> tuple[list[TextRecord], list[Problem]]:
        """Texts whose images are all usable; a Problem for each text dropped because one of its images
        is in the gallery but unusable (texts naming absent images are already in `problems`)."""
        gallery = {r.id for r in self.images}
        kept, dropped = [], []
        for record in self.texts:
            if all(i in usable_ids for i in record.image_ids):
                kept.append(record)
                continue
            bad = [i for i in record.image_ids if i in gallery and i not in usable_ids]
            if bad and all(i in gallery for i in record.image_ids):
                dropped.append(Problem(str(self.texts_file), record.line, "missing_image",
                                       f"text {record.id!r} refers to skipped (undecodable) images {bad}"))
        return kept, dropped


def read_dataset(data: str | Path, split: str, layout: Layout = "auto") -> Dataset:
    """Read `data/{split}_texts.jsonl` plus `data/{split}_imgs.tsv` or `data/images/`; problems are collected."""
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    texts_file = root / f"{split}_texts.jsonl"
    if not texts_file.is_file():
        raise InputError(f"texts file not found: {texts_file} (expected {split}_texts.jsonl in {root})")
    tsv, folder = root / f"{split}_imgs.tsv", root / "images"
    layout = _resolve_layout(layout, tsv, folder)
    problems: list[Problem] = []
    if layout == "tsv":
        images = read_tsv(tsv, problems)
        image_files = [tsv]
    else:
        images = _read_folder(folder, problems)
        image_files = [r.file for r in images]
    texts = _read_texts(texts_file, problems)
    known = {r.id for r in images}
    for record in texts:
        missing = [i for i in record.image_ids if i not in known]
        if missing:
            problems.append(Problem(str(texts_file), record.line, "missing_image",
                                    f"text {record.id!r} refers to image ids {missing} not in the {layout} gallery"))
    return Dataset(layout, texts_file, texts, images, problems, fingerprint([texts_file]), fingerprint(image_files))


def check_images(images: Sequence[ImageRecord], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Problem]:
    """Decode every image (no encoding) and return one Problem per undecodable image."""
    problems = []
    for record in images:
        try:
            record.decode(max_pixels)
        except ImageDecodeError as exc:
            problems.append(undecodable(record, exc))
    return problems


def fingerprint(files: Sequence[Path]) -> str:
    """A digest of each file's resolved path, size and modification time (cheap; changes when a file does)."""
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _resolve_layout(layout: Layout, tsv: Path, folder: Path) -> str:
    if layout == "tsv" or (layout == "auto" and tsv.is_file() and not folder.is_dir()):
        if not tsv.is_file():
            raise InputError(f"image TSV not found: {tsv}")
        return "tsv"
    if layout == "folder" or (layout == "auto" and folder.is_dir() and not tsv.is_file()):
        if not folder.is_dir():
            raise InputError(f"image folder not found: {folder}")
        return "folder"
    if layout != "auto":
        raise InputError(f"layout must be 'auto', 'tsv' or 'folder', got {layout!r}")
    if tsv.is_file():
        raise InputError(f"both {tsv} and {folder}/ exist; choose one with --layout tsv|folder")
    raise InputError(f"no images found: expected {tsv} (cn_clip layout) or {folder}/ (image folder layout)")


def _read_folder(folder: Path, problems: list[Problem]) -> list[ImageRecord]:
    """Image files directly in `folder`; the id is the file stem (`images/7.png` has id "7")."""
    records: list[ImageRecord] = []
    first: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in first:
            problems.append(Problem(str(path), None, "duplicate",
                                    f"duplicate image id {path.stem!r} (also {first[path.stem].name})"))
            continue
        first[path.stem] = path
        records.append(ImageRecord(path.stem, path))
    return records


def _read_texts(path: Path, problems: list[Problem]) -> list[TextRecord]:
    records: list[TextRecord] = []
    first_line: dict[str, int] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            record, error = _parse_text_line(raw)
            if error:
                problems.append(Problem(str(path), number, "malformed", error))
                continue
            if record.id in first_line:
                problems.append(Problem(str(path), number, "duplicate",
                                        f"duplicate text_id {record.id!r} (first at line {first_line[record.id]})"))
                continue
            first_line[record.id] = number
            records.append(TextRecord(record.id, record.text, record.image_ids, number))
    return records


def _parse_text_line(raw: bytes) -> tuple[TextRecord | None, str | None]:
    """(record, None) for a good line, (None, what is wrong) for a bad one."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    except json.JSONDecodeError as exc:
        return None, f"malformed JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    text_id, text, image_ids = obj.get("text_id"), obj.get("text"), obj.get("image_ids")
    if not _is_id(text_id):
        return None, f"'text_id' must be a non-empty string or an integer, got {text_id!r}"
    if not isinstance(text, str) or not wordpieces(text):
        return None, f"'text' must be a string with at least one token (not only spaces/control), got {text!r}"
    if not isinstance(image_ids, list) or not image_ids or not all(_is_id(i) for i in image_ids):
        return None, f"'image_ids' must be a non-empty list of string or integer ids, got {image_ids!r}"
    ids = tuple(dict.fromkeys(str(i) for i in image_ids))
    return TextRecord(str(text_id), text, ids, 0), None


def _is_id(value: object) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and bool(value))
