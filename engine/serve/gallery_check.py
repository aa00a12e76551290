"""`--gallery` at start-up: every image that will not decode is named before any is encoded, all of them at once;
with --skip-bad each is logged and left out instead (as `python -m engine index --skip-bad` does)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from ..errors import ImageDecodeError
from ..ids import Id
from ..preprocess import load_image
from ..records import DatasetError, Problem

log = logging.getLogger("engine.serve")


def usable_gallery_images(images: Sequence[tuple[Id, Path]], skip_bad: bool,
                          max_pixels: int) -> list[tuple[Id, Path]]:
    """The (id, path) pairs whose image decodes. The others raise one DatasetError naming every file, or, with
    `skip_bad`, are logged and skipped."""
    usable, problems = [], []
    for image_id, path in images:
        try:
            load_image(path, max_pixels)
        except ImageDecodeError as exc:
            problems.append(Problem(str(path), None, "undecodable", str(exc).removeprefix(f"{path}: ")))
        else:
            usable.append((image_id, path))
    if problems and not skip_bad:
        raise DatasetError(problems)
    for problem in problems:
        log.warning("--skip-bad: skipped %s", problem)
    return usable
