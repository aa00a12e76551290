"""The OpenVINO rows of the towers benchmark: OpenVINO's CPU plugin running the engine's own ONNX exports (fp32,
int8, int8-static), plus fp32 with the bf16 inference-precision hint where the CPU has bf16 units.

OpenVINO is optional (pip install --no-build-isolation -e ".[openvino]"); without it, or where a row cannot run here, the row is
skipped with the reason. Each encoder follows the engine's Encoder protocol (padding trimmed as every backend
does, outputs L2-normalised), so parity is measured the same way as for the engine's own paths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.backends.base import l2_normalize, trim_padding
from engine.backends.export_reader import load_manifest
from engine.install_hints import install_command

ROWS = ("openvino-fp32", "openvino-bf16", "openvino-int8", "openvino-int8-static")
SOURCE = {"openvino-fp32": "fp32", "openvino-bf16": "fp32", "openvino-int8": "int8",
          "openvino-int8-static": "int8-static"}  # the export precision each row compiles


def import_openvino() -> Any | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino


class OpenVinoEncoder:
    """The Encoder protocol over an export's two ONNX files compiled by OpenVINO for the CPU."""

    def __init__(self, directory: Path, threads: int, precision_hint: str = "f32") -> None:
        ov = import_openvino()
        manifest = load_manifest(directory)
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": precision_hint}
        self.vision = core.compile_model(str(directory / manifest.vision.file), "CPU", config)
        self.text = core.compile_model(str(directory / manifest.text.file), "CPU", config)
        self.embed_dim, self.input_resolution, self.pad_id = (manifest.embed_dim, manifest.input_resolution,
                                                              manifest.pad_id)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return l2_normalize(self.vision(pixels.numpy())[0])

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        return l2_normalize(self.text(trim_padding(token_ids.numpy(), self.pad_id))[0])


def openvino_encoders(auto_dir: Path, selection: dict, threads: int) -> tuple[dict[str, Any], dict[str, str]]:
    """(encoders, skip reasons) for ROWS over an auto export (each row compiles its precision's sub-directory)."""
    ov = import_openvino()
    if ov is None:
        return {}, {row: f"openvino is not installed ({install_command('openvino')})" for row in ROWS}
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    encoders, skipped = {}, {}
    for row in ROWS:
        candidate = selection["candidates"].get(SOURCE[row], {})
        if row == "openvino-bf16" and "BF16" not in capabilities:
            skipped[row] = f"OpenVINO finds no bf16 on this CPU (capabilities {', '.join(capabilities)})"
        elif not candidate.get("passed"):
            skipped[row] = f"the export's {SOURCE[row]} candidate failed its parity gate"
        else:
            hint = "bf16" if row == "openvino-bf16" else "f32"
            try:
                encoders[row] = OpenVinoEncoder(auto_dir / candidate["directory"], threads, hint)
            except RuntimeError as exc:  # an operator this OpenVINO cannot read: say so, never hide it
                skipped[row] = f"OpenVINO cannot compile the {SOURCE[row]} export: {str(exc).splitlines()[0]}"
    return encoders, skipped
