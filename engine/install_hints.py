"""The one place that writes the install commands the engine prints, and the up-front check for optional modules.

Every hint is `pip install --no-build-isolation -e ".[extra]"`: without --no-build-isolation pip would build the
native extension in an isolated environment that has no torch, and fail ("torch is not importable").
"""
from __future__ import annotations

import importlib.util
from typing import Iterable

from .errors import InputError

BUILD_COMMAND = "pip install --no-build-isolation -e ."  # builds the native extension against the installed torch


def install_command(extra: str) -> str:
    """The command that installs the optional extra `extra` of this repository, as a user can copy it."""
    return f'{BUILD_COMMAND.removesuffix(".")}".[{extra}]"'


def missing_modules(modules: Iterable[str]) -> list[str]:
    """The modules in `modules` that are not installed (found without importing them, so the check is quick)."""
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def require(modules: Iterable[str], extra: str, purpose: str) -> None:
    """Raise an InputError naming the missing modules and the install command when any of `modules` is absent;
    called before any work starts, so a missing optional dependency never stops a job halfway."""
    missing = missing_modules(modules)
    if missing:
        raise InputError(f"{purpose} needs {', '.join(missing)} (not installed): {install_command(extra)}")
