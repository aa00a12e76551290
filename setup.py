"""Builds the native LACLIP kernel engine._laclip_ext (C++ CPU, plus CUDA when a toolkit is found).

Project metadata lives in pyproject.toml. torch must already be installed; build with
    pip install --no-build-isolation -e .
Environment:
    ENGINE_BUILD_CUDA=0      build the CPU-only extension even when a CUDA toolkit is present
    CUDA_HOME                the CUDA toolkit (otherwise found from `nvcc` on PATH, following wrapper scripts)
    TORCH_CUDA_ARCH_LIST     GPU architectures; when unset and no GPU is visible, DEFAULT_CUDA_ARCHS: machine code
                             for Ampere/Ada (8.0, which also runs on 8.6 and 8.9) and Hopper (9.0), plus 9.0 PTX that
                             the driver compiles for newer GPUs (Blackwell) at first load. Turing (T4) needs
                             TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0+PTX" (left out by default: each arch adds minutes to a build)
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the build environment
    sys.exit(
        "setup.py: torch is not importable ({}). Install torch first (pip install torch==2.14.1), then build with "
        "`pip install --no-build-isolation -e .` so the build uses that torch instead of an isolated environment "
        "without it.".format(exc)
    )

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _toolkit_from_nvcc(nvcc: Path) -> Path | None:
    """The toolkit folder of an nvcc binary, following `exec /real/bin/nvcc` wrapper scripts."""
    for _ in range(4):
        nvcc = nvcc.resolve()
        try:
            head = nvcc.read_bytes()[:4096] if nvcc.stat().st_size < 65536 else b""
        except OSError:
            return None
        if not head.startswith(b"#!"):
            break
        match = re.search(r"exec\s+[\"']?([^\s\"']*nvcc)\b", head.decode("utf-8", "ignore"))
        if not match:
            break
        nvcc = Path(match.group(1))
    home = nvcc.parent.parent
    if (home / "bin" / "nvcc").exists() and any((home / lib).is_dir() for lib in ("lib64", "lib")):
        return home
    return None


def find_cuda_home() -> Path | None:
    """The CUDA toolkit to build with, or None (ENGINE_BUILD_CUDA=0, or no toolkit)."""
    if os.environ.get("ENGINE_BUILD_CUDA", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and (Path(value) / "bin" / "nvcc").exists():
            return _toolkit_from_nvcc(Path(value) / "bin" / "nvcc") or Path(value)
    nvcc = shutil.which("nvcc")
    return _toolkit_from_nvcc(Path(nvcc)) if nvcc else None


def make_extension():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when imported, so set it (and the arch list) first.
        os.environ["CUDA_HOME"] = str(cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    import torch.utils.cpp_extension as cpp_ext

    if cuda_home is not None:
        cpp_ext.CUDA_HOME = str(cuda_home)
    cxx = ["-O3", "-fopenmp", "-Wno-maybe-uninitialized"] if os.name != "nt" else ["/O2", "/openmp"]
    link = ["-fopenmp"] if os.name != "nt" else []
    sources = [f"{CSRC}/{name}" for name in ("bindings.cpp", "ops.cpp", "laclip_cpu.cpp", "cpu/laclip_generic.cpp",
                                                  "cpu/laclip_avx2.cpp", "cpu/laclip_avx512.cpp", "cpu/laclip_amx.cpp",
                                                  "topk_chunks.cpp", "int8_linear.cpp", "int8_bert.cpp", "int8_ops.cpp")]
    if cuda_home is None:
        print("setup.py: building engine._laclip_ext for the CPU only", file=sys.stderr)
        return cpp_ext.CppExtension(
            "engine._laclip_ext", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        ), cpp_ext.BuildExtension
    print(f"setup.py: building engine._laclip_ext with CUDA from {cuda_home} "
          f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPUs>')})", file=sys.stderr)
    return cpp_ext.CUDAExtension(
        "engine._laclip_ext",
        sources + [f"{CSRC}/laclip_cuda.cu"],
        define_macros=[("LACLIP_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
        extra_link_args=link,
    ), cpp_ext.BuildExtension


extension, build_ext = make_extension()

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
