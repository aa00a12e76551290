"""ONNX Runtime towers: CUDA provider when asked for and present, else CPU; text trimmed to the batch's longest ids.

CUDA sessions are checked after creation: ONNX Runtime silently falls back to CPU when its CUDA provider cannot
load (no cuDNN, a CUDA version mismatch), and that is an error here, not a slow surprise. Their provider options
are set on purpose: TF32 off (fp32 exports must match fp32 PyTorch) and a heuristic cuDNN algorithm search (an
exhaustive one re-tunes on every new batch size).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import CheckpointError, InputError
from ..install_hints import install_command
from .base import l2_normalize, trim_padding

_LEVELS = ("disabled", "basic", "extended", "all")
CUDA_PROVIDER = "CUDAExecutionProvider"
CUDA_OPTIONS = {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}
INSTALL_HINT = install_command("onnx")


def import_onnxruntime():
    """The onnxruntime module; an InputError naming the install command when it is absent."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise InputError(f"ONNX exports need onnxruntime: {INSTALL_HINT} (for CUDA also "
                         f"{install_command('gpu')})") from exc
    return onnxruntime


def gpu_present() -> bool:
    """A CUDA GPU is visible (torch's check, which does not create a CUDA context)."""
    return torch.cuda.is_available()


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session settings; 0 threads means ONNX Runtime's default (one per physical core)."""

    intra_op_num_threads: int = 0
    inter_op_num_threads: int = 0
    optimization: str = "all"


def ort_providers(device: str) -> list:
    """Execution providers for `device`: "cpu", "cuda", or "auto" (CUDA when onnxruntime-gpu is installed AND a
    GPU is present, else CPU). CUDA comes with CUDA_OPTIONS and CPU as the fallback for unsupported nodes."""
    if device not in ("cpu", "cuda", "auto"):
        raise InputError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    available = import_onnxruntime().get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    usable = CUDA_PROVIDER in available and gpu_present()
    if not usable:
        if device == "auto":
            return ["CPUExecutionProvider"]
        why = "no CUDA GPU is visible" if CUDA_PROVIDER in available else f"providers here: {available}"
        raise InputError(f"device 'cuda' needs onnxruntime-gpu and a CUDA GPU; {why}")
    return [(CUDA_PROVIDER, dict(CUDA_OPTIONS)), "CPUExecutionProvider"]


def check_providers(session, providers: list, path: Path) -> None:
    """Fail when a requested CUDA provider is not among the session's (ONNX Runtime fell back to CPU)."""
    wanted = [p[0] if isinstance(p, tuple) else p for p in providers]
    got = session.get_providers()
    if CUDA_PROVIDER in wanted and CUDA_PROVIDER not in got:
        raise InputError(f"ONNX Runtime could not use CUDA for {path} and fell back to {got}: the CUDA provider "
                         f"failed to load (missing cuDNN, or a CUDA version that onnxruntime-gpu was not built "
                         f"for; its log above says which)")


def open_session(path: Path, providers: list[str], settings: OrtSettings,
                 expected_metadata: Mapping[str, str] | None = None):
    """An InferenceSession for `path`; a missing, corrupt or mismatched file is a CheckpointError naming it."""
    ort = import_onnxruntime()

    if settings.optimization not in _LEVELS:
        raise InputError(f"optimization must be one of {_LEVELS}, got {settings.optimization!r}")
    if not Path(path).is_file():
        raise CheckpointError(f"ONNX file not found: {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_num_threads
    options.inter_op_num_threads = settings.inter_op_num_threads
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[settings.optimization]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad protobufs and graphs
        raise CheckpointError(f"ONNX file {path} could not be loaded ({exc.__class__.__name__}: "
                              f"{str(exc).strip()[:300]})") from exc
    check_providers(session, providers, path)
    found = session.get_modelmeta().custom_metadata_map
    for key, value in (expected_metadata or {}).items():
        if found.get(key) != value:
            raise CheckpointError(f"ONNX file {path} records {key}={found.get(key)!r}, "
                                  f"but the export manifest says {value!r}")
    return session


class OnnxEncoder:
    """The Encoder protocol over two ONNX files (any precision the export made)."""

    def __init__(self, vision_path: str | Path, text_path: str | Path, *, embed_dim: int, input_resolution: int,
                 device: str = "cpu", settings: OrtSettings | None = None, pad_id: int = 0,
                 max_sequence: int | None = None,
                 expected_metadata: Mapping[str, Mapping[str, str]] | None = None) -> None:
        settings = settings or OrtSettings()
        providers = ort_providers(device)
        meta = expected_metadata or {}
        self.vision = open_session(Path(vision_path), providers, settings, meta.get("vision"))
        self.text = open_session(Path(text_path), providers, settings, meta.get("text"))
        self.providers = self.vision.get_providers()
        self.embed_dim = embed_dim
        self.input_resolution = input_resolution
        self.pad_id = pad_id
        self.max_sequence = max_sequence
        for name, session in (("vision", self.vision), ("text", self.text)):
            dim = session.get_outputs()[0].shape[-1]
            if isinstance(dim, int) and dim != embed_dim:
                raise CheckpointError(f"{name} ONNX file outputs {dim}-d embeddings, the manifest says {embed_dim}")

    def _run(self, session, array: np.ndarray) -> np.ndarray:
        if array.shape[0] == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        out = session.run(None, {session.get_inputs()[0].name: array})[0]
        return l2_normalize(out)

    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        r = self.input_resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise InputError(f"pixels must have shape [B, 3, {r}, {r}], got {list(pixels.shape)}")
        return self._run(self.vision, np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32))

    def encode_texts(self, token_ids: torch.Tensor) -> np.ndarray:
        if token_ids.ndim != 2:
            raise InputError(f"token_ids must have shape [B, L], got {list(token_ids.shape)}")
        ids = trim_padding(token_ids.detach().cpu().numpy().astype(np.int64, copy=False), self.pad_id)
        if self.max_sequence is not None and ids.shape[1] > self.max_sequence:
            raise InputError(f"texts of {ids.shape[1]} tokens exceed the export's maximum of {self.max_sequence}")
        return self._run(self.text, np.ascontiguousarray(ids))
