"""OpenVINO's CPU plugin over an export's ONNX towers: an optional backend that `--precision auto` times beside
ONNX Runtime and torch, and that an auto export serves for a tower where it won.

On the Intel Xeon with AMX, OpenVINO with the bf16 inference-precision hint ran both towers faster than every
engine path at the same parity gate (README, performance), so it is a candidate rather than only a benchmark row.
Each candidate compiles one of the export's own ONNX precisions (CANDIDATES: the export precision it reads and the
hint it compiles with); the parity gate and the timing are the same as for every other candidate.
"""
from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from ..errors import InputError
from ..install_hints import install_command
from .base import l2_normalize, trim_padding

# candidate name -> (the export precision whose ONNX files it compiles, OpenVINO's inference-precision hint)
CANDIDATES = {"openvino-fp32": ("fp32", "f32"), "openvino-bf16": ("fp32", "bf16"),
              "openvino-int8": ("int8", "f32"), "openvino-int8-static": ("int8-static", "f32")}
# the parity gate each candidate is held to: that of the precision it computes in (bf16 under the bf16 hint, else
# the precision of the graph it compiles)
GATE_PRECISION = {name: "bf16" if hint == "bf16" else source for name, (source, hint) in CANDIDATES.items()}

__all__ = ["CANDIDATES", "GATE_PRECISION", "OpenVinoEncoder", "candidate_encoder", "import_openvino", "unavailable"]


def import_openvino() -> ModuleType | None:
    """The openvino module, or None where the optional extra is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def unavailable(name: str) -> str | None:
    """Why candidate `name` cannot run on this machine (None: it can): OpenVINO absent, or no bf16 units for the
    bf16 hint (OpenVINO would silently compute in fp32, so the candidate would not be what it says)."""
    if name not in CANDIDATES:
        raise InputError(f"unknown OpenVINO candidate {name!r}; known: {sorted(CANDIDATES)}")
    ov = import_openvino()
    if ov is None:
        return f"openvino is not installed ({install_command('openvino')})"
    if CANDIDATES[name][1] == "bf16":
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            return f"OpenVINO finds no bf16 on this CPU (capabilities {', '.join(capabilities)})"
    return None


class OpenVinoEncoder:
    """The Encoder protocol over ONNX tower files compiled by OpenVINO for the CPU; a tower given no file is not
    compiled (an auto export may serve only one tower from OpenVINO). Padding is trimmed and outputs L2-normalised
    as in every backend."""

    device = "cpu"

    def __init__(self, vision: Path | None, text: Path | None, *, embed_dim: int, input_resolution: int,
                 pad_id: int = 0, hint: str = "f32", threads: int = 0) -> None:
        ov = import_openvino()
        if ov is None:
            raise InputError(f"the openvino backend needs openvino: {install_command('openvino')}")
        if hint not in ("f32", "bf16"):
            raise InputError(f"OpenVINO precision hint must be 'f32' or 'bf16', got {hint!r}")
        if threads < 0:
            raise InputError(f"threads must be >= 0 (0: OpenVINO's default), got {threads}")
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint,
                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        core = ov.Core()
        self._vision = None if vision is None else core.compile_model(str(vision), "CPU", config)
        self._text = None if text is None else core.compile_model(str(text), "CPU", config)
        self.embed_dim, self.input_resolution, self.pad_id, self.hint = embed_dim, input_resolution, pad_id, hint

    def _tower(self, compiled, tower: str):
        if compiled is None:
            raise InputError(f"this OpenVINO encoder was built without the {tower} tower")
        return compiled

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        return l2_normalize(self._tower(self._vision, "vision")(pixels.numpy())[0])

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        ids = trim_padding(token_ids.numpy(), self.pad_id)
        return l2_normalize(self._tower(self._text, "text")(ids)[0])


def candidate_encoder(name: str, vision: Path, text: Path, dims: dict[str, int],
                      threads: int = 0) -> tuple[OpenVinoEncoder | None, str | None]:
    """(encoder, None) for candidate `name` over these ONNX files, or (None, why it cannot run here): OpenVINO
    absent, no bf16 units for the bf16 hint, or an operator this OpenVINO cannot compile (said, never hidden)."""
    reason = unavailable(name)
    if reason is not None:
        return None, reason
    source, hint = CANDIDATES[name]
    try:
        return OpenVinoEncoder(vision, text, hint=hint, threads=threads, **dims), None
    except RuntimeError as exc:
        return None, f"OpenVINO cannot compile the {source} export: {str(exc).splitlines()[0]}"
