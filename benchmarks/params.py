"""Shared benchmark parameters: quick mode (BENCH_QUICK=1, set by `python -m benchmarks --quick`) shrinks the lists.

Bench files call `choose(full, quick)` for a parameter list and `model_name()` for the model to time, so one
environment variable makes the whole suite fit its quick time budget without separate quick files.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

T = TypeVar("T")

QUICK_ENV = "BENCH_QUICK"
MODEL_ENV = "BENCH_MODEL"
SCALE_ENV = "BENCH_SCALE"  # set by the runner: the size this subject's share of the suite's budget allows


def quick() -> bool:
    """True when the suite runs in quick mode (BENCH_QUICK set to anything but "", "0" or "false")."""
    return os.environ.get(QUICK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def choose(full: Sequence[T], quick_values: Sequence[T]) -> list[T]:
    """`quick_values` in quick mode, else `full` (as lists, ready for pytest.mark.parametrize)."""
    return list(quick_values if quick() else full)


def scale() -> float:
    """The runner's size factor for this subject, in (0, 1] (1 when unset or malformed)."""
    try:
        value = float(os.environ.get(SCALE_ENV, "1"))
    except ValueError:
        return 1.0
    return value if 0 < value <= 1 else 1.0


def scaled(n: int, minimum: int = 1) -> int:
    """`n` shrunk by the runner's scale, at least `minimum` (sizes, counts, repeats)."""
    return max(minimum, int(round(n * scale())))


def model_name(full: str = "ViT-B-16", quick_model: str = "tiny") -> str:
    """Model to benchmark: $BENCH_MODEL if set, else `quick_model` in quick mode, else `full`."""
    return os.environ.get(MODEL_ENV) or (quick_model if quick() else full)


def env_int(name: str, default: int) -> int:
    """Integer from environment variable `name` (default when unset); a bad value is an error naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value
