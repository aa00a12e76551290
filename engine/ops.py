"""Typed wrappers over the native LACLIP kernel, engine._laclip_ext (this module is its only importer).

laclip_scores gives the full [Q, N] float32 score matrix; laclip_topk the fused top-k (no [Q, N] matrix is
stored). Both take text embeddings T [Q, D], global image embeddings G [N, D] and crop embeddings C [N, K, D]
(float32 or float16, one dtype, one device; L2-normalised), accumulate in float32, and return tensors on the
inputs' device. The math and the pure-PyTorch truth they are tested against are in engine.laclip.
Bad inputs raise engine.errors.InputError naming the tensor; a missing build raises ExtensionNotBuiltError.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch

from .errors import InputError

try:
    from . import _laclip_ext as _ext
except ImportError as _exc:  # not built (or built against another torch)
    _ext: Any = None
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (after installing torch)"
WEIGHT_MODES = ("image", "text")


class ExtensionNotBuiltError(ImportError):
    """The compiled extension engine._laclip_ext is missing or failed to import."""


def extension_available() -> bool:
    """Whether the native extension was built and imports."""
    return _ext is not None


def cuda_available() -> bool:
    """Whether the extension was built with CUDA kernels and a CUDA GPU is present."""
    return _ext is not None and bool(_ext.built_with_cuda()) and torch.cuda.is_available()


def cpu_isa() -> str:
    """The CPU code path the extension runs: 'avx512' or 'generic'."""
    return str(_require().cpu_isa())


def set_force_generic(force: bool) -> None:
    """Force the portable CPU loops instead of AVX-512 (tests and benchmarks); False restores detection."""
    _require().set_force_generic(bool(force))


def _require() -> Any:
    if _ext is None:
        raise ExtensionNotBuiltError(f"engine._laclip_ext is not available ({_IMPORT_ERROR}); {BUILD_HINT}")
    return _ext


def _check_args(tensors: dict[str, Any], alpha: float, tau: float, weights: str) -> tuple[float, float, bool]:
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(f"laclip: {name} must be a torch.Tensor, got {type(value).__name__}")
    if weights not in WEIGHT_MODES:
        raise InputError(f"laclip: weights must be 'image' or 'text', got {weights!r}")
    try:
        alpha, tau = float(alpha), float(tau)
    except (TypeError, ValueError):
        raise InputError(f"laclip: alpha and tau must be numbers, got {alpha!r} and {tau!r}") from None
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"laclip: alpha must be in [0, 1], got {alpha!r}")
    if not (tau > 0.0 and not math.isnan(tau)):
        raise InputError(f"laclip: tau must be > 0, got {tau!r}")
    return alpha, tau, weights == "text"


def _call(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ValueError, RuntimeError) as exc:  # the extension's validation errors all start with "laclip:"
        if isinstance(exc, ValueError) or str(exc).startswith("laclip:"):
            raise InputError(str(exc).split("\nException raised from")[0]) from exc
        raise


def laclip_scores(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, alpha: float, tau: float,
                  weights: str) -> torch.Tensor:
    """[Q, N] float32 LACLIP scores of T [Q, D] against G [N, D] / C [N, K, D] (no [Q, N, K] intermediate)."""
    ext = _require()
    alpha, tau, is_text = _check_args({"text embeddings T": t, "global image embeddings G": g,
                                       "crop embeddings C": c}, alpha, tau, weights)
    return _call(ext.scores, t, g, c, alpha, tau, is_text)


def laclip_topk(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, k: int, alpha: float, tau: float,
                weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k: (values [Q, k] float32, indices [Q, k] int64), best first, ties to the lower index."""
    ext = _require()
    alpha, tau, is_text = _check_args({"text embeddings T": t, "global image embeddings G": g,
                                       "crop embeddings C": c}, alpha, tau, weights)
    try:
        if isinstance(k, bool):
            raise TypeError
        k = operator.index(k)
    except TypeError:
        raise InputError(f"laclip: k must be an int, got {k!r}") from None
    values, indices = _call(ext.topk, t, g, c, k, alpha, tau, is_text)
    return values, indices
