"""setup.py's build switch (CUDA only when a GPU is visible, an arch list is given or ENGINE_BUILD_CUDA=1; never
because nvcc exists) and its build cache (an unchanged extension is copied, not compiled)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLKIT = Path("/usr/local/cuda")


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its `setup()` call runs only as a script)."""
    spec = importlib.util.spec_from_file_location("cnclip_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_nvcc_alone_does_not_compile_cuda(setup_py):
    decision = setup_py.decide_cuda({}, TOOLKIT, gpu_visible=False, torch_cuda="13.0")
    assert not decision.enabled
    assert "no CUDA GPU is visible" in decision.reason and "ENGINE_BUILD_CUDA=1" in decision.reason


@pytest.mark.parametrize("env, gpu, archs, reason", [
    ({}, True, None, "a CUDA GPU is visible"),
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, True, "9.0", "a CUDA GPU is visible"),   # the GPU machine's build
    ({"TORCH_CUDA_ARCH_LIST": "8.0;9.0"}, False, "8.0;9.0", "TORCH_CUDA_ARCH_LIST=8.0;9.0"),
    ({"ENGINE_BUILD_CUDA": "1"}, False, "8.0;9.0+PTX", "ENGINE_BUILD_CUDA=1"),
    ({"ENGINE_BUILD_CUDA": "1"}, True, None, "ENGINE_BUILD_CUDA=1"),
    ({"ENGINE_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "7.5"}, False, "7.5", "ENGINE_BUILD_CUDA=1"),
])
def test_cuda_is_compiled_when_a_gpu_or_an_explicit_request_says_so(setup_py, env, gpu, archs, reason):
    decision = setup_py.decide_cuda(env, TOOLKIT, gpu_visible=gpu, torch_cuda="13.0")
    assert decision.enabled and decision.home == TOOLKIT
    assert (decision.arch_list, decision.reason) == (archs, reason)


@pytest.mark.parametrize("env, toolkit, torch_cuda", [
    ({"ENGINE_BUILD_CUDA": "0"}, TOOLKIT, "13.0"),      # off even with a GPU
    ({"ENGINE_BUILD_CUDA": "off", "TORCH_CUDA_ARCH_LIST": "9.0"}, TOOLKIT, "13.0"),
    ({}, None, "13.0"),                                  # a GPU but no toolkit
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, TOOLKIT, None),    # a CPU build of torch
])
def test_cuda_stays_off(setup_py, env, toolkit, torch_cuda):
    assert not setup_py.decide_cuda(env, toolkit, gpu_visible=True, torch_cuda=torch_cuda).enabled


@pytest.mark.parametrize("env, toolkit, torch_cuda, words", [
    ({"ENGINE_BUILD_CUDA": "maybe"}, TOOLKIT, "13.0", "ENGINE_BUILD_CUDA='maybe'"),
    ({"ENGINE_BUILD_CUDA": "1"}, None, "13.0", "no CUDA toolkit"),
    ({"ENGINE_BUILD_CUDA": "1"}, TOOLKIT, None, "CPU-only build"),
])
def test_impossible_requests_are_refused_by_name(setup_py, env, toolkit, torch_cuda, words):
    with pytest.raises(setup_py.BuildConfigError, match=words):
        setup_py.decide_cuda(env, toolkit, gpu_visible=False, torch_cuda=torch_cuda)


def test_build_stamp_follows_sources_and_settings(setup_py, tmp_path):
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "a.cpp").write_text("int a;")
    (tmp_path / "csrc" / "cpu" / "k.h").write_text("#pragma once")
    first = setup_py.build_stamp(tmp_path, {"torch": "2.14.1", "cuda": False})
    assert setup_py.build_stamp(tmp_path, {"cuda": False, "torch": "2.14.1"}) == first
    assert setup_py.build_stamp(tmp_path, {"torch": "2.14.1", "cuda": True}) != first
    assert setup_py.build_stamp(tmp_path, {"torch": "2.15.0", "cuda": False}) != first
    (tmp_path / "csrc" / "cpu" / "k.h").write_text("#pragma once\n#define X 1")   # a header counts too
    assert setup_py.build_stamp(tmp_path, {"torch": "2.14.1", "cuda": False}) != first


def _run_build_ext(setup_py, command_class, tmp_path: Path) -> Path:
    from setuptools import Distribution

    dist = Distribution({"name": "probe", "ext_modules": [setup_py.make_extension(
        setup_py.CudaDecision(None, None, "test"))[0]], "cmdclass": {"build_ext": command_class}})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib = str(tmp_path / "lib")
    cmd.build_temp = str(tmp_path / "temp")
    cmd.ensure_finalized()
    cmd.run()
    return Path(cmd.get_ext_fullpath("engine._laclip_ext"))


def test_an_unchanged_extension_is_copied_from_the_build_cache_not_compiled(setup_py, tmp_path, monkeypatch):
    from torch.utils.cpp_extension import BuildExtension

    monkeypatch.setenv("ENGINE_BUILD_DIR", str(tmp_path / "native"))
    decision = setup_py.CudaDecision(None, None, "test")
    _, settings = setup_py.make_extension(decision)
    command = setup_py.cached_build_ext(decision, settings)
    stamp = setup_py.build_stamp(ROOT, settings)
    name = Path(command(__import__("setuptools").Distribution()).get_ext_filename("engine._laclip_ext")).name
    cached = tmp_path / "native" / "ext" / stamp / name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"built before")

    def no_compiling(self, ext):
        raise AssertionError("compiled although the build stamp matched")

    monkeypatch.setattr(BuildExtension, "build_extension", no_compiling)
    target = _run_build_ext(setup_py, command, tmp_path)
    assert target.read_bytes() == b"built before"


def test_a_changed_build_compiles_in_the_persistent_folder_and_is_kept(setup_py, tmp_path, monkeypatch):
    from torch.utils.cpp_extension import BuildExtension

    monkeypatch.setenv("ENGINE_BUILD_DIR", str(tmp_path / "native"))
    decision = setup_py.CudaDecision(None, None, "test")
    _, settings = setup_py.make_extension(decision)
    command = setup_py.cached_build_ext(decision, settings)
    stale = tmp_path / "native" / "ext" / "0000000000000000" / "old.so"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    seen = {}

    def fake_compile(self, ext):
        seen["build_temp"] = self.build_temp
        target = Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"fresh")

    monkeypatch.setattr(BuildExtension, "build_extension", fake_compile)
    target = _run_build_ext(setup_py, command, tmp_path)
    assert seen["build_temp"] == str(tmp_path / "native" / "objects-cpu")
    kept = tmp_path / "native" / "ext" / setup_py.build_stamp(ROOT, settings) / target.name
    assert kept.read_bytes() == b"fresh" and not stale.exists()
