"""Builds the native LACLIP kernel engine._laclip_ext: C++ for the CPU always, CUDA only where it can be used or asked for.

Project metadata lives in pyproject.toml. torch must already be installed; build with
    pip install --no-build-isolation -e .
Environment:
    ENGINE_BUILD_CUDA        unset or "auto": compile the CUDA code when a CUDA toolkit is found AND (torch sees a
                             CUDA GPU OR TORCH_CUDA_ARCH_LIST is set); a toolkit (`nvcc`) alone is not a reason.
                             "1": always (needs a toolkit and a CUDA build of torch). "0": never.
    CUDA_HOME                the CUDA toolkit (otherwise found from `nvcc` on PATH, following wrapper scripts)
    TORCH_CUDA_ARCH_LIST     GPU architectures; with ENGINE_BUILD_CUDA=1, no GPU visible and this unset,
                             DEFAULT_CUDA_ARCHS: machine code for Ampere/Ada (8.0, which also runs on 8.6 and 8.9) and
                             Hopper (9.0), plus 9.0 PTX that the driver compiles for newer GPUs (Blackwell) at first
                             load. Turing (T4) needs TORCH_CUDA_ARCH_LIST="7.5;8.0;9.0+PTX" (each arch adds minutes)
    ENGINE_BUILD_DIR         where compiled objects and the built extension are kept between installs (default
                             build/native): a later `pip install -e ".[extra]"` with unchanged csrc/, flags and torch
                             reuses the built extension instead of compiling again
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

try:
    import torch
except ImportError as exc:  # pragma: no cover - depends on the build environment
    sys.exit(
        "setup.py: torch is not importable ({}). Install torch first (pip install torch==2.14.1), then build with "
        "`pip install --no-build-isolation -e .` so the build uses that torch instead of an isolated environment "
        "without it.".format(exc)
    )

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CPU_SOURCES = ("module.cpp", "ops.cpp", "info_ops.cpp", "laclip_cpu.cpp", "cpu/laclip_generic.cpp",
               "cpu/laclip_avx2.cpp", "cpu/laclip_avx512.cpp", "cpu/laclip_amx.cpp", "topk_chunks.cpp",
               "int8_linear.cpp", "int8_bert.cpp", "int8_ops.cpp")
CUDA_SOURCES = ("laclip_cuda.cu",)
# Measured on a 2-core AMD EPYC (see README "Set-up"); printed so a long quiet build is not a surprise.
EXPECTED_MINUTES = {"cpu": "about 45 s on 2 idle cores, 1.5 minutes on 2 busy ones",
                    "cuda": "about 2 minutes on 2 idle cores (CUDA included)"}
_SWITCH_VALUES = {"": "auto", "auto": "auto", "1": "on", "true": "on", "yes": "on", "on": "on",
                  "0": "off", "false": "off", "no": "off", "off": "off"}


class BuildConfigError(ValueError):
    """The build settings contradict each other or the machine (the message says which and what to do)."""


@dataclass(frozen=True)
class CudaDecision:
    """Whether the CUDA code is compiled, with which toolkit and arch list, and why (printed by the build)."""

    home: Path | None
    arch_list: str | None
    reason: str

    @property
    def enabled(self) -> bool:
        return self.home is not None


def decide_cuda(env: Mapping[str, str], toolkit: Path | None, gpu_visible: bool,
                torch_cuda: str | None) -> CudaDecision:
    """The CUDA decision from ENGINE_BUILD_CUDA / TORCH_CUDA_ARCH_LIST, the toolkit found, a visible GPU and
    torch's CUDA version (None for a CPU build of torch). An nvcc alone never turns CUDA on."""
    raw = env.get("ENGINE_BUILD_CUDA", "")
    switch = _SWITCH_VALUES.get(raw.strip().lower())
    if switch is None:
        raise BuildConfigError(f"ENGINE_BUILD_CUDA={raw!r}: use 1 (always), 0 (never) or auto (unset)")
    archs = env.get("TORCH_CUDA_ARCH_LIST", "").strip() or None
    if switch == "off":
        return CudaDecision(None, None, "ENGINE_BUILD_CUDA=0")
    if switch == "on" and toolkit is None:
        raise BuildConfigError("ENGINE_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
    if switch == "on" and torch_cuda is None:
        raise BuildConfigError(f"ENGINE_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build: install a "
                               "CUDA build of torch")
    if switch == "on":
        chosen = archs or (None if gpu_visible else DEFAULT_CUDA_ARCHS)
        return CudaDecision(toolkit, chosen, "ENGINE_BUILD_CUDA=1")
    if toolkit is None or torch_cuda is None:
        missing = "no CUDA toolkit found" if toolkit is None else "torch is a CPU-only build"
        return CudaDecision(None, None, missing)
    if gpu_visible:
        return CudaDecision(toolkit, archs, "a CUDA GPU is visible")
    if archs is not None:
        return CudaDecision(toolkit, archs, f"TORCH_CUDA_ARCH_LIST={archs}")
    return CudaDecision(None, None, f"no CUDA GPU is visible and TORCH_CUDA_ARCH_LIST is unset (the toolkit at "
                                    f"{toolkit} alone is not a reason; ENGINE_BUILD_CUDA=1 compiles CUDA anyway)")


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


def find_cuda_toolkit() -> Path | None:
    """The CUDA toolkit on this machine (CUDA_HOME, CUDA_PATH, or nvcc on PATH), or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value and (Path(value) / "bin" / "nvcc").exists():
            return _toolkit_from_nvcc(Path(value) / "bin" / "nvcc") or Path(value)
    nvcc = shutil.which("nvcc")
    return _toolkit_from_nvcc(Path(nvcc)) if nvcc else None


def build_stamp(root: Path, settings: Mapping[str, object]) -> str:
    """A hash of every file under csrc/ (names and contents) and the build settings: equal stamps, equal builds."""
    digest = hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode())
    for path in sorted(p for p in (root / CSRC).rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_dir(root: Path, env: Mapping[str, str]) -> Path:
    return Path(env.get("ENGINE_BUILD_DIR") or root / "build" / "native")


def make_extension(decision: CudaDecision):
    """The Extension for `decision`, and the settings that go into its build stamp."""
    if decision.enabled:
        # torch.utils.cpp_extension reads CUDA_HOME (and the arch list) when imported, so set them first.
        os.environ["CUDA_HOME"] = str(decision.home)
        if decision.arch_list:
            os.environ["TORCH_CUDA_ARCH_LIST"] = decision.arch_list
    import torch.utils.cpp_extension as cpp_ext

    # -g0 drops the debug info Python's own CFLAGS (-g) ask for: a third less compile time per torch-heavy source
    cxx = ["-O3", "-g0", "-fopenmp", "-Wno-maybe-uninitialized"] if os.name != "nt" else ["/O2", "/openmp"]
    link = ["-fopenmp"] if os.name != "nt" else []
    sources = [f"{CSRC}/{name}" for name in CPU_SOURCES]
    settings = {"torch": torch.__version__, "python": sysconfig.get_config_var("EXT_SUFFIX"), "cxx": cxx,
                "link": link, "cuda": decision.enabled, "arch_list": decision.arch_list,
                "compilers": [os.environ.get(v, "") for v in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")]}
    if not decision.enabled:
        return cpp_ext.CppExtension("engine._laclip_ext", sources, extra_compile_args={"cxx": cxx},
                                    extra_link_args=link), settings
    cpp_ext.CUDA_HOME = str(decision.home)
    settings["cuda_home"] = str(decision.home)
    return cpp_ext.CUDAExtension("engine._laclip_ext", sources + [f"{CSRC}/{s}" for s in CUDA_SOURCES],
                                 define_macros=[("LACLIP_WITH_CUDA", "1")],
                                 extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=link), settings


def _log(message: str) -> None:
    print(f"setup.py: {message}", file=sys.stderr, flush=True)


def cached_build_ext(decision: CudaDecision, settings: Mapping[str, object]):
    """torch's BuildExtension, plus: objects compiled in a persistent folder (ninja recompiles only what changed),
    and the finished extension kept under its build stamp, so an unchanged extension is copied, not compiled."""
    from torch.utils.cpp_extension import BuildExtension

    base = build_dir(ROOT, os.environ)
    stamp = build_stamp(ROOT, settings)
    kind = "cuda" if decision.enabled else "cpu"

    class CachedBuildExtension(BuildExtension):
        def build_extension(self, ext) -> None:
            target = Path(self.get_ext_fullpath(ext.name))
            cached = base / "ext" / stamp / target.name
            if cached.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(cached, target)
                _log(f"{ext.name} is unchanged (build stamp {stamp}): reusing {cached}, nothing compiled")
                return
            self.build_temp = str(base / f"objects-{kind}")
            what = ("C++ (CPU) and CUDA" if decision.enabled else "C++ for the CPU only") + f" ({decision.reason})"
            _log(f"compiling {ext.name}, {len(ext.sources)} sources, {what}: {EXPECTED_MINUTES[kind]}; "
                 f"objects in {self.build_temp}")
            started = time.monotonic()
            super().build_extension(ext)
            _log(f"compiled {ext.name} in {time.monotonic() - started:.0f} s; kept as {cached}")
            shutil.rmtree(base / "ext", ignore_errors=True)  # only the newest build is worth keeping
            cached.parent.mkdir(parents=True)
            shutil.copy2(target, cached)

    return CachedBuildExtension.with_options(use_ninja=True)


def main() -> None:
    from setuptools import setup

    try:
        decision = decide_cuda(os.environ, find_cuda_toolkit(), torch.cuda.is_available(), torch.version.cuda)
    except BuildConfigError as exc:
        sys.exit(f"setup.py: {exc}")
    if not decision.enabled:
        _log(f"building engine._laclip_ext for the CPU only: {decision.reason}")
    else:
        _log(f"building engine._laclip_ext with CUDA from {decision.home} ({decision.reason}; "
             f"TORCH_CUDA_ARCH_LIST={decision.arch_list or '<the visible GPUs>'})")
    extension, settings = make_extension(decision)
    setup(ext_modules=[extension], cmdclass={"build_ext": cached_build_ext(decision, settings)})


if __name__ == "__main__":
    main()
