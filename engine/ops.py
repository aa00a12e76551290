"""Typed wrappers over the native LACLIP operators torch.ops.cnclip.* (built as engine._laclip_ext).

laclip_scores gives the full [Q, N] float32 score matrix; laclip_topk the fused top-k (no [Q, N] matrix is
stored). Both take text embeddings T [Q, D], global image embeddings G [N, D] and crop embeddings C [N, K, D]
(float32, float16 or bfloat16, one dtype, one device; L2-normalised), accumulate in float32, and return tensors on
the inputs' device. The math and the pure-PyTorch truth they are tested against are in engine.laclip.

The operators are registered with torch.library (csrc/ops.cpp): torch dispatches CPU/CUDA inputs to their kernel,
and the fake kernels below give torch.compile the output shapes, so `torch.ops.cnclip.laclip_scores` /
`laclip_topk` also work inside `torch.compile(fullgraph=True)`. The C++ entry checks every input and raises
ValueError naming the tensor; the wrappers here translate the Python API (weights="image"/"text", typed
arguments) and re-raise those ValueErrors as engine.errors.InputError. A missing build raises
ExtensionNotBuiltError.
"""
from __future__ import annotations

import operator
from typing import Any

import torch

from .errors import InputError
from .install_hints import BUILD_COMMAND

try:
    from . import _laclip_ext as _ext  # importing it registers torch.ops.cnclip.*
except ImportError as _exc:  # not built (or built against another torch)
    _ext: Any = None
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

BUILD_HINT = f"build it with `{BUILD_COMMAND}` (after installing torch)"
WEIGHT_MODES = ("image", "text")
TENSOR_NAMES = ("text embeddings T", "global image embeddings G", "crop embeddings C")


class ExtensionNotBuiltError(ImportError):
    """The compiled extension engine._laclip_ext is missing or failed to import."""


def extension_available() -> bool:
    """Whether the native extension was built and imports."""
    return _ext is not None


def cuda_available() -> bool:
    """Whether the extension was built with CUDA kernels and a CUDA GPU is present."""
    return _ext is not None and bool(torch.ops.cnclip.built_with_cuda()) and torch.cuda.is_available()


def cpu_isa() -> str:
    """The CPU code path the extension runs: 'amx_bf16', 'avx512_bf16', 'avx512', 'avx2' or 'generic' (detected at
    run time)."""
    return str(extension().cpu_isa())


def cpu_isas() -> list[str]:
    """The CPU code paths this CPU can run, slowest first."""
    return [str(name) for name in extension().cpu_isas()]


def set_max_isa(name: str | None) -> None:
    """Cap the CPU code path at `name` (one of cpu_isas(); tests and benchmarks); None restores detection."""
    extension().set_max_isa(name or "")


def set_force_generic(force: bool) -> None:
    """Force the portable CPU loops (True) or restore run-time detection (False)."""
    set_max_isa("generic" if force else None)


def extension() -> Any:
    """torch.ops.cnclip, the operators engine._laclip_ext registers (kernels, build facts and test hooks; see
    csrc/info_ops.cpp); ExtensionNotBuiltError saying how to build it if the extension is absent."""
    if _ext is None:
        raise ExtensionNotBuiltError(f"engine._laclip_ext is not available ({_IMPORT_ERROR}); {BUILD_HINT}")
    return torch.ops.cnclip


def _op_args(t: Any, g: Any, c: Any, alpha: Any, tau: Any, weights: Any) -> tuple:
    """The operator's arguments from the Python API's (types only: the C++ entry checks the values)."""
    for name, value in zip(TENSOR_NAMES, (t, g, c)):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"laclip: {name} must be a torch.Tensor, got {type(value).__name__}")
    if weights not in WEIGHT_MODES:
        raise InputError(f"laclip: weights must be 'image' or 'text', got {weights!r}")
    try:
        alpha, tau = float(alpha), float(tau)
    except (TypeError, ValueError):
        raise InputError(f"laclip: alpha and tau must be numbers, got {alpha!r} and {tau!r}") from None
    return t, g, c, alpha, tau, weights == "text"


def call_checked(op: Any, *args: Any) -> Any:
    """Run a cnclip operator, re-raising its C++ entry's input errors (ValueError) as InputError."""
    try:
        return op(*args)
    except ValueError as exc:  # the C++ entry's input checks (TORCH_CHECK_VALUE)
        raise InputError(str(exc)) from exc


def laclip_scores(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, alpha: float, tau: float,
                  weights: str) -> torch.Tensor:
    """[Q, N] float32 LACLIP scores of T [Q, D] against G [N, D] / C [N, K, D] (no [Q, N, K] intermediate)."""
    extension()
    return call_checked(torch.ops.cnclip.laclip_scores, *_op_args(t, g, c, alpha, tau, weights))


def laclip_topk(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, k: int, alpha: float, tau: float,
                weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k: (values [Q, k] float32, indices [Q, k] int64), best first, ties to the lower index."""
    extension()
    t, g, c, alpha, tau, text = _op_args(t, g, c, alpha, tau, weights)
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise InputError(f"laclip: k must be an int, got {k!r}")
    values, indices = call_checked(torch.ops.cnclip.laclip_topk, t, g, c, operator.index(k), alpha, tau, text)
    return values, indices


if _ext is not None:
    # Output shapes for torch.compile / FakeTensor tracing; the values are checked when the real kernel runs.
    @torch.library.register_fake("cnclip::laclip_scores")
    def _laclip_scores_fake(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, alpha: float, tau: float,
                            text_weights: bool) -> torch.Tensor:
        return t.new_empty((t.shape[0], g.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("cnclip::laclip_topk")
    def _laclip_topk_fake(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, k: int, alpha: float, tau: float,
                          text_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (t.new_empty((t.shape[0], k), dtype=torch.float32),
                t.new_empty((t.shape[0], k), dtype=torch.int64))
