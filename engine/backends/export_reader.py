"""Open a `python -m export` directory as an Encoder: the runtime side of an export (export/ writes, this reads).

`open_encoder` is what `Retriever.from_export` and the server use. For an export made with `--precision auto`
(several precisions side by side), `choose_precision` names the one to serve on this machine: the fastest that
passed parity when the export timed them, among those whose hardware this CPU has.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

from engine.errors import CheckpointError, InputError

from .base import Encoder
from .cpu_features import cpu_info
from .export_manifest import ExportManifest, load_manifest

BACKENDS = ("onnxruntime", "tensorrt")
# Precisions that are only worth serving where the CPU has the matching dot-product units.
NEEDS_CPU = {"bf16": ("bf16", "bf16 dot products (AMX or AVX512-BF16)")}
log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "ExportManifest", "choose_precision", "load_manifest", "open_encoder", "runnable_here"]


def _settings(cls: type, options: dict[str, Any], backend: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown {backend} options {unknown}; accepted: {sorted(names)}")
    return cls(**options)


def runnable_here(precision: str) -> str | None:
    """Why `precision` should not be served on this CPU, or None when it should."""
    need = NEEDS_CPU.get(precision)
    if need is None or getattr(cpu_info(), need[0]):
        return None
    return f"this CPU ({cpu_info().model}) has no {need[1]}"


def choose_precision(directory: str | Path) -> str:
    """The precision to serve from `directory`: its only one, or for an auto export the fastest candidate that
    passed parity and suits this CPU (measured at export time; a warning says when that was another CPU)."""
    manifest = load_manifest(directory)
    candidates = manifest.selection.get("candidates", {})
    if not candidates:
        return manifest.precision
    measured_on = manifest.selection.get("machine", {}).get("model")
    if measured_on and measured_on != cpu_info().model:
        log.warning("export %s was timed on %s, this is %s: serving its fastest precision there", directory,
                    measured_on, cpu_info().model)
    usable = {name: c for name, c in candidates.items() if c.get("passed") and runnable_here(name) is None}
    if not usable:
        raise CheckpointError(f"export {directory} holds no precision that passed parity and runs well on this CPU "
                              f"({cpu_info().model}): candidates {sorted(candidates)}")
    return min(usable, key=lambda name: usable[name]["seconds"])


def _precision_directory(directory: Path, manifest: ExportManifest, precision: str | None) -> Path:
    """The directory holding `precision`'s towers (an auto export keeps each in its own sub-directory)."""
    candidates = manifest.selection.get("candidates", {})
    if precision is None:
        precision = choose_precision(directory) if candidates else manifest.precision
    if not candidates:
        if precision != manifest.precision:
            raise InputError(f"export {directory} holds precision {manifest.precision!r} only, not {precision!r}")
        return directory
    entry = candidates.get(precision)
    if entry is None or not entry.get("passed"):
        kept = sorted(name for name, c in candidates.items() if c.get("passed"))
        raise InputError(f"export {directory} holds no passing {precision!r} towers; it holds {kept}")
    return directory / entry["directory"]


def open_encoder(directory: str | Path, backend: str = "onnxruntime", device: str = "cpu", model: str | None = None,
                 *, precision: str | None = None, **backend_options: Any) -> tuple[Encoder, ExportManifest]:
    """The encoder and manifest of an export; `model` None takes the manifest's (another model is an error);
    `precision` None serves `choose_precision`'s pick; options are OrtSettings or ProfileConfig fields."""
    top_dir = Path(directory)
    top = load_manifest(top_dir, model)
    directory = _precision_directory(top_dir, top, precision)
    manifest = top if directory == top_dir else load_manifest(directory, model)
    dims = dict(embed_dim=manifest.embed_dim, input_resolution=manifest.input_resolution, pad_id=manifest.pad_id)
    if backend == "onnxruntime":
        from .onnx_backend import OnnxEncoder, OrtSettings

        settings = _settings(OrtSettings, backend_options, backend)
        identity = {tower: manifest.metadata(tower) for tower in ("vision", "text")}
        encoder = OnnxEncoder(directory / manifest.vision.file, directory / manifest.text.file, device=device,
                              settings=settings, expected_metadata=identity, **dims)
        return encoder, manifest
    if backend == "tensorrt":
        from .tensorrt_backend import TensorRTEncoder
        from .tensorrt_engines import ENGINE_FILES, ProfileConfig, ensure_engines

        if device != "cuda":
            raise InputError(f"the tensorrt backend runs on device 'cuda', got {device!r}")
        engine_dir = ensure_engines(directory, manifest, _settings(ProfileConfig, backend_options, backend))
        encoder = TensorRTEncoder(engine_dir / ENGINE_FILES["vision"], engine_dir / ENGINE_FILES["text"], **dims)
        return encoder, manifest
    raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
