"""Deployable towers: `python -m export` writes ONNX (fp32/fp16/bf16/int8) or TensorRT towers with a parity manifest.

Reading an export back is the engine's job (engine.backends.export_reader); this package only writes them.
"""
from engine.backends.export_manifest import ExportManifest, load_manifest

from .parity import THRESHOLDS, ParityError
from .pipeline import export_model

__all__ = ["ExportManifest", "ParityError", "THRESHOLDS", "export_model", "load_manifest"]
