"""Installed versions of the packages that tower figures depend on: recorded in export manifests and reports."""
from __future__ import annotations

from importlib import metadata
from typing import Iterable

RUNTIME_PACKAGES = ("torch", "numpy", "cn_clip", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxconverter-common",
                    "tensorrt")


def package_versions(names: Iterable[str] = RUNTIME_PACKAGES) -> dict[str, str | None]:
    """{package: version}, None for a package that is not installed."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found
