"""The OpenVINO rows of the towers benchmark: OpenVINO's CPU plugin (engine.backends.openvino_backend, the backend
`--precision auto` also times) running the engine's own ONNX exports: fp32, fp32 with the bf16 inference-precision
hint where the CPU has bf16 units, int8 and int8-static.

OpenVINO is optional (pip install --no-build-isolation -e ".[openvino]"); without it, or where a row cannot run
here, the row is skipped with the reason. Parity is measured the same way as for the engine's own paths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.backends.export_reader import load_manifest
from engine.backends.openvino_backend import CANDIDATES, candidate_encoder, unavailable

ROWS = tuple(CANDIDATES)


def openvino_encoders(auto_dir: Path, selection: dict, threads: int) -> tuple[dict[str, Any], dict[str, str]]:
    """(encoders, skip reasons) for ROWS over an auto export (each row compiles its source precision's
    sub-directory)."""
    encoders, skipped = {}, {}
    for row, (source, _) in CANDIDATES.items():
        candidate = selection.get("candidates", {}).get(source, {})
        if not candidate.get("passed"):
            skipped[row] = unavailable(row) or f"the export's {source} candidate failed its parity gate"
            continue
        directory = auto_dir / candidate["directory"]
        manifest = load_manifest(directory)
        encoder, reason = candidate_encoder(row, directory / manifest.vision.file, directory / manifest.text.file,
                                            manifest.encoder_dims(), threads)
        if encoder is None:
            skipped[row] = reason
        else:
            encoders[row] = encoder
    return encoders, skipped
