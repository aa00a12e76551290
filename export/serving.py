"""Open an export directory as an Encoder for the onnxruntime or tensorrt backend."""
from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from engine.backends import Encoder
from engine.errors import InputError

from .manifest import ExportManifest, load_manifest

BACKENDS = ("onnxruntime", "tensorrt")


def _settings(cls: type, options: dict[str, Any], backend: str):
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise InputError(f"unknown {backend} options {unknown}; accepted: {sorted(names)}")
    return cls(**options)


def open_encoder(directory: str | Path, backend: str = "onnxruntime", device: str = "cpu", model: str | None = None,
                 **backend_options: Any) -> tuple[Encoder, ExportManifest]:
    """The encoder and manifest of an export; options are OrtSettings or ProfileConfig fields per backend."""
    directory = Path(directory)
    manifest = load_manifest(directory, model)
    dims = dict(embed_dim=manifest.embed_dim, input_resolution=manifest.input_resolution, pad_id=manifest.pad_id)
    if backend == "onnxruntime":
        from engine.backends.onnx_backend import OnnxEncoder, OrtSettings

        settings = _settings(OrtSettings, backend_options, backend)
        identity = {tower: manifest.metadata(tower) for tower in ("vision", "text")}
        encoder = OnnxEncoder(directory / manifest.vision.file, directory / manifest.text.file, device=device,
                              settings=settings, expected_metadata=identity, **dims)
        return encoder, manifest
    if backend == "tensorrt":
        from engine.backends.tensorrt_backend import TensorRTEncoder

        from .tensorrt_build import ENGINE_FILES, ProfileConfig, ensure_engines

        if device != "cuda":
            raise InputError(f"the tensorrt backend runs on device 'cuda', got {device!r}")
        engine_dir = ensure_engines(directory, manifest, _settings(ProfileConfig, backend_options, backend))
        encoder = TensorRTEncoder(engine_dir / ENGINE_FILES["vision"], engine_dir / ENGINE_FILES["text"], **dims)
        return encoder, manifest
    raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
