"""Records shared by every layer that reads collections and datasets: `Problem` (one bad record, naming its file
and line), `DatasetError` (all of them), `ImageRecord` / `TextRecord` (a dataset's rows), and cn_clip's
`{split}_imgs.tsv` reader. Below engine.sources, engine.distributed, engine.datasets and the CLIs; imports
nothing of theirs.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from .errors import ImageDecodeError, InputError
from .preprocess import DEFAULT_MAX_PIXELS, load_image

MAX_LISTED = 20  # problems quoted in an exception message (the CLI prints them all)


def bad_records(count: int) -> str:
    """\"1 bad record\", \"3 bad records\": the count every bad-data message starts with."""
    return f"{count} bad record{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class Problem:
    """One bad record: where it is, what kind (malformed, duplicate, missing_image, undecodable), what is wrong."""

    file: str
    line: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "kind": self.kind, "message": self.message}

    @classmethod
    def from_dict(cls, data: dict) -> "Problem":
        return cls(data["file"], data["line"], data["kind"], data["message"])


class DatasetError(InputError):
    """The dataset has bad records; `problems` lists every one (file, line, what)."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        listed = "\n  ".join(str(p) for p in self.problems[:MAX_LISTED])
        more = f"\n  ... and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        super().__init__(f"{bad_records(len(self.problems))} (rerun with --skip-bad to skip them):\n  {listed}{more}")


@dataclass(frozen=True)
class TextRecord:
    """A caption and the ids of the images it describes, with its jsonl line."""

    id: str
    text: str
    image_ids: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class ImageRecord:
    """Where one image lives: a file (folder layout) or a byte offset into the TSV (read lazily)."""

    id: str
    file: Path
    line: int | None = None
    offset: int | None = None

    def where(self) -> tuple[str, int | None]:
        return str(self.file), self.line

    def source(self) -> bytes | Path:
        """The encoded image: the file path, or the base64-decoded bytes of its TSV row."""
        if self.offset is None:
            return self.file
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            row = f.readline().rstrip(b"\r\n")
        try:  # cn_clip writes standard base64 and reads it with urlsafe_b64decode; accept both alphabets
            body = row.split(b"\t", 1)[1].strip().translate(bytes.maketrans(b"-_", b"+/"))
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"invalid base64 ({exc})") from None

    def decode(self, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The fully decoded image; ImageDecodeError when the data is not a readable image."""
        return load_image(self.source(), max_pixels)


def read_tsv(path: Path, problems: list[Problem]) -> list[ImageRecord]:
    """Rows `image_id<TAB>base64`; the base64 is decoded later, when the image is needed."""
    records: list[ImageRecord] = []
    first_line: dict[str, int] = {}
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            row = raw.rstrip(b"\r\n")
            if not row.strip():
                continue
            head, tab, body = row.partition(b"\t")
            try:
                image_id = head.decode("utf-8").strip()
            except UnicodeDecodeError:
                image_id = ""
            if not tab or not image_id or not body.strip():
                problems.append(Problem(str(path), number, "malformed",
                                        "expected 'image_id<TAB>base64 image' (missing id, tab or image data)"))
                continue
            if image_id in first_line:
                problems.append(Problem(str(path), number, "duplicate",
                                        f"duplicate image id {image_id!r} (first at line {first_line[image_id]})"))
                continue
            first_line[image_id] = number
            records.append(ImageRecord(image_id, path, number, start))
    return records


def undecodable(record: ImageRecord, exc: Exception) -> Problem:
    file, line = record.where()
    reason = str(exc).removeprefix(f"{file}: ")  # the decoder names the file too; say it once
    return Problem(file, line, "undecodable", f"image {record.id!r} cannot be decoded: {reason}")
