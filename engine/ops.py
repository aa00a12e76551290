"""Typed wrappers over the compiled LACLIP extension (engine._laclip_ext); the only module importing it."""
from __future__ import annotations

import torch

try:
    from . import _laclip_ext as _ext
except ImportError:
    _ext = None


def extension_available() -> bool:
    """Whether the native extension was built and imports."""
    return _ext is not None


def _require() -> None:
    if _ext is None:
        raise ImportError("engine._laclip_ext is not built; run `pip install --no-build-isolation -e .`")


def laclip_scores(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, alpha: float, tau: float,
                  weights: str) -> torch.Tensor:
    """[Q, N] fp32 LACLIP scores, fused (no [Q, N, K] intermediate)."""
    _require()
    return _ext.scores(t, g, c, alpha, tau, weights == "text")


def laclip_topk(t: torch.Tensor, g: torch.Tensor, c: torch.Tensor, *, k: int, alpha: float, tau: float,
                weights: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused top-k: (values [Q, k] fp32, indices [Q, k] int64), best first, ties to the lower index."""
    _require()
    return tuple(_ext.topk(t, g, c, k, alpha, tau, weights == "text"))
