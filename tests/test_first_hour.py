"""A new user's first hour: every install hint is a command that works as printed, optional dependencies are
checked before any work starts, and CPU fine-tuning's thread default leaves the cores other work uses."""
from __future__ import annotations

import argparse
import re
import sys
import time
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from engine.errors import CheckpointError, InputError
from engine.finetune import FinetuneConfig, finetune
from engine.finetune.synthetic import make_shapes_dataset
from engine.finetune.threads import MAX_THREADS, default_threads
from engine.install_hints import install_command, require
from engine.models import get_spec, official_checkpoint_path, read_state_dict
from export import export_model

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"])


def _sources() -> list[Path]:
    return sorted(p for d in ("engine", "export", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def test_every_printed_install_hint_keeps_build_isolation_off():
    """`pip install -e ".[x]"` without --no-build-isolation fails ("torch is not importable"): none is printed."""
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in _sources()
           for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
           if re.search(r"pip install (-e|--editable)\b", line)]
    assert not bad, "install hints that fail as printed:\n" + "\n".join(bad)


def test_every_hinted_extra_exists():
    named = {m for p in _sources() for m in re.findall(r"install_command\(['\"]([\w-]+)['\"]\)",
                                                        p.read_text(encoding="utf-8"))}
    assert {"onnx", "finetune", "distributed"} <= named and named <= EXTRAS


def test_install_command_is_the_readme_command():
    assert install_command("onnx") == 'pip install --no-build-isolation -e ".[onnx]"'
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert install_command("serve") in readme


def test_require_names_every_missing_module_and_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # as if not installed
    require(("json",), "finetune", "x")                   # present: no error
    with pytest.raises(InputError, match=re.escape('the plot needs matplotlib (not installed): pip install '
                                                   '--no-build-isolation -e ".[finetune]"')):
        require(("json", "matplotlib"), "finetune", "the plot")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, {"train": 1}, image_size=32, templates=1, seed=1)
    return root


def test_finetune_without_matplotlib_stops_before_any_file_or_step(shapes, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    config = FinetuneConfig(model="tiny", data=shapes, out=out, random_weights=True, stage1_steps=1,
                            stage2_steps=0, batch_size=8, valid_split=None, progress=False)
    with pytest.raises(InputError, match=re.escape(install_command("finetune"))):
        finetune(config)
    assert not out.exists()


def test_export_without_onnx_tools_stops_before_any_work(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    out = tmp_path / "export"
    with pytest.raises(InputError, match=r"an export needs onnxscript \(not installed\): " +
                       re.escape(install_command("onnx"))):
        export_model("tiny", out, tiny_checkpoint)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_benchmarks_without_matplotlib_stop_before_running(tmp_path, monkeypatch, capsys):
    from benchmarks.__main__ import main as bench_main

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit):
        bench_main(["--quick", "--out", str(tmp_path / "out")])
    assert install_command("bench") in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("cores, load, ranks, threads", [
    (2, 0.0, 1, 1),      # 2 cores: one spare for decoding and the rest of the machine
    (2, 3.5, 1, 1),      # busy: never 0
    (8, 0.2, 1, MAX_THREADS),
    (8, 5.0, 1, 3),      # 8 - 5 free cores
    (8, 0.0, 2, 3),      # two ranks share the 7 usable cores
    (64, 0.0, 4, MAX_THREADS),
    (1, 0.0, 1, 1),
])
def test_default_threads_leave_busy_cores_alone(cores, load, ranks, threads):
    assert default_threads(cores, load, ranks) == threads


def test_finetune_uses_the_given_threads_and_restores_the_callers(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen = []
    original = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), original(n)))
    before = torch.get_num_threads()
    config = FinetuneConfig(model="tiny", data=shapes, out=tmp_path / "run", random_weights=True, stage1_steps=1,
                            stage2_steps=0, batch_size=8, valid_split=None, threads=1, progress=None)
    finetune(config)
    assert seen == [1, before] and torch.get_num_threads() == before
    assert "with 1 torch thread(s) per rank (--threads)" in capsys.readouterr().err


@pytest.mark.parametrize("content, words", [
    ({"args": argparse.Namespace(lr=1), "state_dict": {}}, "holds Python objects (argparse.Namespace), not only weights"),
    (b"hello", "is not a PyTorch checkpoint file"),
    (b"", "is an empty file"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_without_torchs_unsafe_advice(tmp_path, content, words):
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(path)
    said = str(caught.value)
    assert said.startswith(f"checkpoint {path} ") and words in said and "weights_only" not in said


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_official_weights_without_a_hub_fail_at_once(tmp_path, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    with pytest.raises(CheckpointError) as caught:
        official_checkpoint_path(get_spec("RN50"), cache_dir=tmp_path)
    assert time.monotonic() - started < 5   # not the hub client's retries (about 23 s)
    said = str(caught.value)
    assert ("127.0.0.1:9 cannot be reached" in said or "HF_HUB_OFFLINE is set" in said)
    assert f"place it at {tmp_path / 'clip_cn_rn50.pt'}" in said


def test_docs_show_the_package_version():
    from engine.serve.app import package_version

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert package_version() == version("cnclip-engine") == pyproject
