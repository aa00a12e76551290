"""manifest.json of an export directory: what was exported, from which weights, and how close it is to PyTorch.

The export package writes it; the engine reads it (engine.backends.export_reader). An export made with
`--precision auto` holds one sub-directory per precision that passed parity, each a complete export with its
own manifest, and a top-level manifest for the fastest of them (its tower files point into that sub-directory)
carrying every candidate's measurements in `selection`.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TowerEntry:
    """One tower's file (relative to the export directory) and tensor interface."""

    file: str
    input_name: str
    output_name: str
    input_shape: list[int | str]  # "batch" / "sequence" mark the dynamic axes
    input_dtype: str


@dataclass
class ExportManifest:
    """Everything a backend needs to serve an export, and the parity figures measured when it was made.

    `selection` is empty for a single-precision export; for `--precision auto` it records the machine, each
    candidate precision's parity, speed and directory, and the choice (engine.backends.precision_choice)."""

    model: str
    checkpoint_hash: str
    precision: str
    opset: int
    embed_dim: int
    input_resolution: int
    context_length: int
    vision: TowerEntry
    text: TowerEntry
    pad_id: int = 0
    parity: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def encoder_dims(self) -> dict[str, int]:
        """What every encoder over this export is built with: embed_dim, input_resolution and pad_id."""
        return {"embed_dim": self.embed_dim, "input_resolution": self.input_resolution, "pad_id": self.pad_id}

    def metadata(self, tower: str) -> dict[str, str]:
        """The identity stamped into each ONNX file, checked again when a backend opens it."""
        return {"cnclip.model": self.model, "cnclip.checkpoint_hash": self.checkpoint_hash,
                "cnclip.precision": self.precision, "cnclip.tower": tower}

    def save(self, directory: Path) -> Path:
        """Write manifest.json atomically."""
        path = Path(directory) / MANIFEST_NAME
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".manifest-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2, ensure_ascii=False)
        os.replace(tmp, path)
        return path


def load_manifest(directory: str | Path, model: str | None = None) -> ExportManifest:
    """Read and validate `directory`/manifest.json; with `model`, refuse an export of another model."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} is not an export directory: {MANIFEST_NAME} not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} has format_version {raw.get('format_version')!r}, "
                                  f"this engine reads {FORMAT_VERSION}")
        raw["vision"], raw["text"] = TowerEntry(**raw["vision"]), TowerEntry(**raw["text"])
        manifest = ExportManifest(**raw)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a valid export manifest ({exc.__class__.__name__}: {exc})") from exc
    if model is not None and manifest.model != model:
        raise CheckpointError(f"export {directory} holds model {manifest.model!r}, not {model!r}")
    for tower in (manifest.vision, manifest.text):
        if not (directory / tower.file).is_file():
            raise CheckpointError(f"export {directory}: {tower.file} named in {MANIFEST_NAME} is missing")
    return manifest
