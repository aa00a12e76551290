"""Deployable towers: `python -m export` writes ONNX (fp32/fp16/int8) or TensorRT towers with a parity manifest."""
from .manifest import ExportManifest, load_manifest
from .parity import THRESHOLDS, ParityError
from .pipeline import export_model
from .serving import open_encoder

__all__ = ["ExportManifest", "ParityError", "THRESHOLDS", "export_model", "load_manifest", "open_encoder"]
