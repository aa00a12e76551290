"""`export_model`: checkpoint -> ONNX (and TensorRT) towers + manifest.json, gated on parity with fp32 PyTorch."""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from engine.errors import InputError
from engine.models import load_model
from engine.preprocess import DEFAULT_CONTEXT_LENGTH
from engine.towers import PAD_ID

from .manifest import MANIFEST_NAME, ExportManifest, TowerEntry
from .onnx_export import ONNXRUNTIME_OPSET, PRECISIONS, TENSORRT_OPSET, build_towers, stamp_metadata
from .parity import (THRESHOLDS, ParityInputs, check, generated_pixels, generated_token_ids, measure, user_pixels,
                     user_token_ids)
from .serving import open_encoder
from .tensor_names import TEXT_INPUT, TEXT_OUTPUT, VISION_INPUT, VISION_OUTPUT

FORMATS = ("onnx", "tensorrt")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "cn_clip", "onnx", "onnxruntime", "onnxconverter-common", "tensorrt"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _check_target(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_NAME).is_file())):
        raise InputError(f"--out {out} exists and is not an export directory; choose a new or empty directory")


def _publish_permissions(directory: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the finished export the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def export_model(model: str, out: str | Path, checkpoint: str | Path | None = None, fmt: str = "onnx",
                 precision: str = "fp32", images: str | Path | None = None, texts: str | Path | None = None,
                 min_cosine: float | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH) -> ExportManifest:
    """Export `model`'s towers into `out`; raises ParityError (nothing written) when parity is below threshold."""
    if fmt not in FORMATS:
        raise InputError(f"format must be one of {FORMATS}, got {fmt!r}")
    if precision not in PRECISIONS or (fmt == "tensorrt" and precision == "int8"):
        allowed = PRECISIONS if fmt == "onnx" else ("fp32", "fp16")
        raise InputError(f"precision for {fmt} must be one of {allowed}, got {precision!r}")
    out = Path(out)
    _check_target(out)
    loaded = load_model(checkpoint, model)
    config = loaded.spec.config()
    resolution = loaded.spec.input_resolution
    inputs = ParityInputs({"generated": generated_pixels(resolution)},
                          {"generated": generated_token_ids(context_length)})
    if images is not None:
        inputs.pixels["user"] = user_pixels(images, resolution)
    if texts is not None:
        inputs.token_ids["user"] = user_token_ids(texts, context_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        opset = ONNXRUNTIME_OPSET if fmt == "onnx" else TENSORRT_OPSET
        files = build_towers(loaded.model, resolution, config["text_max_position_embeddings"], precision, staging,
                             opset)
        manifest = ExportManifest(
            model=model, checkpoint_hash=loaded.checkpoint_hash, precision=precision, opset=opset,
            embed_dim=int(config["embed_dim"]), input_resolution=resolution, context_length=context_length,
            vision=TowerEntry(files.vision.name, VISION_INPUT, VISION_OUTPUT, ["batch", 3, resolution, resolution],
                              "float32"),
            text=TowerEntry(files.text.name, TEXT_INPUT, TEXT_OUTPUT, ["batch", "sequence"], "int64"),
            pad_id=PAD_ID, versions=_versions())
        for tower, path in files.items():
            stamp_metadata(path, manifest.metadata(tower))
        manifest.save(staging)
        backend, device = ("onnxruntime", "cpu") if fmt == "onnx" else ("tensorrt", "cuda")
        encoder, _ = open_encoder(staging, backend, device)
        threshold = THRESHOLDS[precision] if min_cosine is None else min_cosine
        report = measure(loaded.model, encoder, inputs)
        manifest.parity = {"backend": backend, "device": device, "threshold": threshold, **report}
        del encoder
        check(report, threshold)
        manifest.save(staging)
        _publish_permissions(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
